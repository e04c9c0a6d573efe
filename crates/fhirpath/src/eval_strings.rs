//! `encode` / `decode` / `escape` / `unescape` formats.

use crate::functions::Builtin;

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64_encode(data: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str, alphabet: &[u8; 64]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        if c == b'=' {
            break;
        }
        let v = alphabet.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn html_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn json_escape(s: &str) -> String {
    let quoted = serde_json::Value::String(s.to_string()).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

fn json_unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'u' => {
                let hex: String = chars.by_ref().take(4).collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// The most bytes [`codec`] can produce from `len` bytes with any format: `encode` makes at most
/// two bytes of one (hex) and `escape` six (`"` → `&quot;`, a control character → `\u0001`);
/// `decode` and `unescape` never lengthen.
pub(crate) fn codec_len_bound(f: Builtin, len: usize) -> usize {
    match f {
        Builtin::Encode => len.saturating_mul(2),
        Builtin::Escape => len.saturating_mul(6),
        _ => len,
    }
}

/// Applies `f` (encode/decode/escape/unescape) with `format`; `None` when the input is invalid for
/// the format or the format is unknown.
pub(crate) fn codec(f: Builtin, s: &str, format: &str) -> Option<String> {
    match (f, format) {
        (Builtin::Encode, "base64") => Some(b64_encode(s.as_bytes(), B64)),
        (Builtin::Encode, "urlbase64") => Some(b64_encode(s.as_bytes(), B64URL)),
        (Builtin::Encode, "hex") => Some(s.bytes().map(|b| format!("{b:02x}")).collect()),
        (Builtin::Decode, "base64") => String::from_utf8(b64_decode(s, B64)?).ok(),
        (Builtin::Decode, "urlbase64") => String::from_utf8(b64_decode(s, B64URL)?).ok(),
        (Builtin::Decode, "hex") => String::from_utf8(hex_decode(s)?).ok(),
        (Builtin::Escape, "html") => Some(html_escape(s)),
        (Builtin::Escape, "json") => Some(json_escape(s)),
        (Builtin::Unescape, "html") => Some(html_unescape(s)),
        (Builtin::Unescape, "json") => json_unescape(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips() {
        assert_eq!(
            codec(Builtin::Encode, "test", "base64").unwrap(),
            "dGVzdA=="
        );
        assert_eq!(
            codec(Builtin::Decode, "dGVzdA==", "base64").unwrap(),
            "test"
        );
        assert_eq!(codec(Builtin::Encode, "test", "hex").unwrap(), "74657374");
        assert_eq!(codec(Builtin::Decode, "74657374", "hex").unwrap(), "test");
        assert_eq!(
            codec(Builtin::Escape, "\"1<2\"", "html").unwrap(),
            "&quot;1&lt;2&quot;"
        );
    }
}

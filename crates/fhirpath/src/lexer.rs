//! Tokens of the FHIRPath grammar.

use crate::error::ParseError;

/// Text tokens borrow from the source (an expression is parsed once per compilation, and most
/// tokens are identifiers the parser only looks at); quoted ones own their unescaped text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok<'s> {
    /// A plain identifier (also keywords such as `and`, `div`, `is`: the parser decides).
    Ident(&'s str),
    /// A `` `backtick` `` identifier: never a keyword.
    Delimited(String),
    /// `$this`, `$index`, `$total`.
    Dollar(&'s str),
    Str(String),
    /// Number text as written (`12`, `3.14`).
    Number(&'s str),
    /// Long integer literal `12L`.
    Long(&'s str),
    /// `@...` text without the `@`.
    DateTime(&'s str),
    /// `@T...` text without the `@T`.
    Time(&'s str),
    Percent,
    Dot,
    Comma,
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Plus,
    Minus,
    Star,
    Slash,
    Amp,
    Pipe,
    Eq,
    Tilde,
    NotEq,
    NotTilde,
    Lt,
    Le,
    Gt,
    Ge,
    Eof,
}

impl Tok<'_> {
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("identifier '{s}'"),
            Tok::Delimited(s) => format!("identifier `{s}`"),
            Tok::Dollar(s) => format!("'${s}'"),
            Tok::Str(s) => format!("string '{s}'"),
            Tok::Number(s) | Tok::Long(s) => format!("number {s}"),
            Tok::DateTime(s) => format!("date/time @{s}"),
            Tok::Time(s) => format!("time @T{s}"),
            Tok::Eof => "end of expression".to_string(),
            other => format!("'{}'", other.symbol()),
        }
    }

    fn symbol(&self) -> &'static str {
        match self {
            Tok::Percent => "%",
            Tok::Dot => ".",
            Tok::Comma => ",",
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::LBracket => "[",
            Tok::RBracket => "]",
            Tok::LBrace => "{",
            Tok::RBrace => "}",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Star => "*",
            Tok::Slash => "/",
            Tok::Amp => "&",
            Tok::Pipe => "|",
            Tok::Eq => "=",
            Tok::Tilde => "~",
            Tok::NotEq => "!=",
            Tok::NotTilde => "!~",
            Tok::Lt => "<",
            Tok::Le => "<=",
            Tok::Gt => ">",
            Tok::Ge => ">=",
            _ => "?",
        }
    }
}

/// A token with its byte offset in the source.
#[derive(Debug, Clone)]
pub(crate) struct Token<'s> {
    pub tok: Tok<'s>,
    pub pos: usize,
}

/// Bytes that continue an identifier (`[A-Za-z0-9_]`): one table load per byte of the longest
/// tokens (identifiers are most of an expression's text).
static IDENT: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b == b'_';
        c += 1;
    }
    t
};

pub(crate) fn tokenize(src: &str) -> Result<Vec<Token<'_>>, ParseError> {
    let b = src.as_bytes();
    let mut i = 0;
    // About one token per 4 bytes of source in typical expressions.
    let mut out = Vec::with_capacity(src.len() / 4 + 2);
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let start = i;
            i += 2;
            loop {
                if i + 1 >= b.len() {
                    return Err(ParseError::new(
                        start,
                        "'*/' closing the comment",
                        "end of expression",
                    ));
                }
                if b[i] == b'*' && b[i + 1] == b'/' {
                    i += 2;
                    break;
                }
                i += 1;
            }
            continue;
        }
        let start = i;
        let tok = match c {
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                while i < b.len() && IDENT[usize::from(b[i])] {
                    i += 1;
                }
                Tok::Ident(&src[start..i])
            }
            b'$' => {
                i += 1;
                while i < b.len() && IDENT[usize::from(b[i])] {
                    i += 1;
                }
                Tok::Dollar(&src[start + 1..i])
            }
            b'`' => {
                let (s, next) = quoted(src, i, b'`')?;
                i = next;
                Tok::Delimited(s)
            }
            b'\'' => {
                let (s, next) = quoted(src, i, b'\'')?;
                i = next;
                Tok::Str(s)
            }
            b'0'..=b'9' => {
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    Tok::Number(&src[start..i])
                } else if i < b.len() && b[i] == b'L' {
                    i += 1;
                    Tok::Long(&src[start..i - 1])
                } else {
                    Tok::Number(&src[start..i])
                }
            }
            b'@' => {
                i += 1;
                if b.get(i) == Some(&b'T') {
                    i += 1;
                    let s = i;
                    i = scan_time(b, i);
                    Tok::Time(&src[s..i])
                } else {
                    let s = i;
                    i = scan_datetime(b, i);
                    Tok::DateTime(&src[s..i])
                }
            }
            b'%' => {
                i += 1;
                Tok::Percent
            }
            b'.' => {
                i += 1;
                Tok::Dot
            }
            b',' => {
                i += 1;
                Tok::Comma
            }
            b'(' => {
                i += 1;
                Tok::LParen
            }
            b')' => {
                i += 1;
                Tok::RParen
            }
            b'[' => {
                i += 1;
                Tok::LBracket
            }
            b']' => {
                i += 1;
                Tok::RBracket
            }
            b'{' => {
                i += 1;
                Tok::LBrace
            }
            b'}' => {
                i += 1;
                Tok::RBrace
            }
            b'+' => {
                i += 1;
                Tok::Plus
            }
            b'-' => {
                i += 1;
                Tok::Minus
            }
            b'*' => {
                i += 1;
                Tok::Star
            }
            b'/' => {
                i += 1;
                Tok::Slash
            }
            b'&' => {
                i += 1;
                Tok::Amp
            }
            b'|' => {
                i += 1;
                Tok::Pipe
            }
            b'=' => {
                i += 1;
                Tok::Eq
            }
            b'~' => {
                i += 1;
                Tok::Tilde
            }
            b'!' if b.get(i + 1) == Some(&b'=') => {
                i += 2;
                Tok::NotEq
            }
            b'!' if b.get(i + 1) == Some(&b'~') => {
                i += 2;
                Tok::NotTilde
            }
            b'<' if b.get(i + 1) == Some(&b'=') => {
                i += 2;
                Tok::Le
            }
            b'<' => {
                i += 1;
                Tok::Lt
            }
            b'>' if b.get(i + 1) == Some(&b'=') => {
                i += 2;
                Tok::Ge
            }
            b'>' => {
                i += 1;
                Tok::Gt
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(ParseError::new(i, "a token", &format!("character '{ch}'")));
            }
        };
        out.push(Token { tok, pos: start });
    }
    out.push(Token {
        tok: Tok::Eof,
        pos: src.len(),
    });
    Ok(out)
}

fn digits(b: &[u8], i: usize, n: usize) -> bool {
    i + n <= b.len() && b[i..i + n].iter().all(u8::is_ascii_digit)
}

/// `YYYY[-MM[-DD]][T[time][zone]]`: returns the end offset.
fn scan_datetime(b: &[u8], mut i: usize) -> usize {
    if !digits(b, i, 4) {
        return i;
    }
    i += 4;
    for _ in 0..2 {
        if b.get(i) == Some(&b'-') && digits(b, i + 1, 2) {
            i += 3;
        } else {
            break;
        }
    }
    if b.get(i) == Some(&b'T') {
        i += 1;
        if digits(b, i, 2) {
            i = scan_time(b, i);
            i = scan_zone(b, i);
        }
    }
    i
}

/// `hh[:mm[:ss[.fff]]]`.
fn scan_time(b: &[u8], mut i: usize) -> usize {
    if !digits(b, i, 2) {
        return i;
    }
    i += 2;
    for _ in 0..2 {
        if b.get(i) == Some(&b':') && digits(b, i + 1, 2) {
            i += 3;
        } else {
            return i;
        }
    }
    if b.get(i) == Some(&b'.') && digits(b, i + 1, 1) {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    i
}

fn scan_zone(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(b'Z') => i + 1,
        Some(b'+' | b'-')
            if digits(b, i + 1, 2) && b.get(i + 3) == Some(&b':') && digits(b, i + 4, 2) =>
        {
            i + 6
        }
        _ => i,
    }
}

/// A quoted string or delimited identifier starting at `start` (the quote), with FHIRPath escapes.
fn quoted(src: &str, start: usize, quote: u8) -> Result<(String, usize), ParseError> {
    // Most literals have no escapes: copy them in one piece.
    let rest = &src[start + 1..];
    if let Some(end) = rest.bytes().position(|c| c == quote || c == b'\\')
        && rest.as_bytes()[end] == quote
    {
        return Ok((rest[..end].to_string(), start + 1 + end + 1));
    }
    let mut out = String::new();
    let mut chars = src[start + 1..].char_indices();
    while let Some((off, c)) = chars.next() {
        let at = start + 1 + off;
        if c as u32 == quote as u32 {
            return Ok((out, at + 1));
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some((_, e)) = chars.next() else { break };
        match e {
            '\'' | '"' | '`' | '\\' | '/' => out.push(e),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'f' => out.push('\u{c}'),
            'u' => {
                let mut code = 0u32;
                for _ in 0..4 {
                    let d = chars
                        .next()
                        .and_then(|(_, h)| h.to_digit(16))
                        .ok_or_else(|| {
                            ParseError::new(at, "four hex digits after \\u", "other text")
                        })?;
                    code = code * 16 + d;
                }
                // A UTF-16 surrogate pair spans two escapes.
                if (0xD800..0xDC00).contains(&code) {
                    let mut look = chars.clone();
                    let low = match (look.next(), look.next()) {
                        (Some((_, '\\')), Some((_, 'u'))) => {
                            let hex: String = look.by_ref().take(4).map(|(_, c)| c).collect();
                            u32::from_str_radix(&hex, 16)
                                .ok()
                                .filter(|l| (0xDC00..0xE000).contains(l))
                        }
                        _ => None,
                    };
                    if let Some(low) = low {
                        chars = look;
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                    }
                }
                out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
            }
            other => {
                return Err(ParseError::new(
                    at,
                    "a valid escape sequence",
                    &format!("'\\{other}'"),
                ));
            }
        }
    }
    Err(ParseError::new(
        start,
        if quote == b'`' {
            "closing '`'"
        } else {
            "closing quote"
        },
        "end of expression",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_comments() {
        let t = tokenize("a.b // x\n + 'it\\'s' /* c */ <= @2014-01T @T12:00 5L @2015.is(Date)")
            .unwrap();
        let toks: Vec<_> = t.into_iter().map(|t| t.tok).collect();
        assert_eq!(
            toks,
            vec![
                Tok::Ident("a"),
                Tok::Dot,
                Tok::Ident("b"),
                Tok::Plus,
                Tok::Str("it's".into()),
                Tok::Le,
                Tok::DateTime("2014-01T"),
                Tok::Time("12:00"),
                Tok::Long("5"),
                Tok::DateTime("2015"),
                Tok::Dot,
                Tok::Ident("is"),
                Tok::LParen,
                Tok::Ident("Date"),
                Tok::RParen,
                Tok::Eof
            ]
        );
    }

    #[test]
    fn unterminated() {
        assert!(tokenize("'abc").is_err());
        assert!(tokenize("1 /* x").is_err());
    }
}

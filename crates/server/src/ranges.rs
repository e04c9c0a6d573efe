//! HTTP range requests on export file downloads (RFC 9110 §14, §13.1.5): which bytes of a file a
//! `GET` answers with, given its `Range` and `If-Range` headers and the file's size and
//! validators.
//!
//! - One byte range (`bytes=0-99`, `bytes=100-`, `bytes=-500`) is answered with `206` and
//!   `Content-Range`; its end is cut at the file's end.
//! - Several ranges (`bytes=0-9,20-29`) are answered with the whole file (`200`): the server may
//!   ignore a `Range` header, and multipart/byteranges bodies buy a downloader nothing here.
//! - A range that starts at or beyond the end, a zero suffix, any range of an empty file, and a
//!   malformed `bytes=` value are unsatisfiable: `416` with `Content-Range: bytes */<size>`.
//! - Another unit than `bytes` is ignored (`200`).
//! - `If-Range` with a strong entity tag equal to the file's honours the range; a weak tag, a
//!   different tag, or a date other than the file's exact `Last-Modified` answer the whole file
//!   (`200`), so a client never splices bytes of two versions.

use std::time::SystemTime;

use axum::http::{HeaderMap, header};

/// What a download answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The whole file, `200`.
    Full,
    /// Bytes `start..=end` (inclusive, inside the file), `206`.
    Partial { start: u64, end: u64 },
    /// `416`.
    Unsatisfiable,
}

/// Longest `Range` value looked at; longer ones are ignored (the whole file is sent).
const MAX_RANGE_HEADER: usize = 1024;

/// Decides the answer for a file of `size` bytes with strong validator `etag` (unquoted; empty
/// when there is none) and `last_modified`.
pub fn decide(
    headers: &HeaderMap,
    size: u64,
    etag: &str,
    last_modified: Option<SystemTime>,
) -> Decision {
    let mut ranges = headers.get_all(header::RANGE).iter();
    let (Some(range), None) = (ranges.next(), ranges.next()) else {
        // None, or several Range fields: the whole file.
        return Decision::Full;
    };
    let Ok(range) = range.to_str() else {
        return Decision::Full;
    };
    if range.len() > MAX_RANGE_HEADER {
        return Decision::Full;
    }
    if let Some(if_range) = headers.get(header::IF_RANGE)
        && !if_range_matches(if_range.to_str().unwrap_or(""), etag, last_modified)
    {
        return Decision::Full;
    }
    parse(range, size)
}

/// Whether an `If-Range` validator names this version: a strong entity tag compared strongly,
/// or an HTTP date equal to `Last-Modified` (to the second).
fn if_range_matches(value: &str, etag: &str, last_modified: Option<SystemTime>) -> bool {
    let value = value.trim();
    if value.starts_with('"') {
        return !etag.is_empty() && value == format!("\"{etag}\"");
    }
    if value.starts_with("W/") {
        return false;
    }
    match (httpdate::parse_http_date(value), last_modified) {
        (Ok(date), Some(modified)) => {
            httpdate::fmt_http_date(date) == httpdate::fmt_http_date(modified)
        }
        _ => false,
    }
}

/// A `Range` value against a file of `size` bytes.
fn parse(value: &str, size: u64) -> Decision {
    let Some((unit, set)) = value.trim().split_once('=') else {
        return Decision::Unsatisfiable;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Decision::Full;
    }
    let specs: Vec<&str> = set
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    match specs.as_slice() {
        [] => Decision::Unsatisfiable,
        [one] => single(one, size),
        // Several ranges: refused by answering the whole file.
        _ => Decision::Full,
    }
}

/// Digits as a number; more digits than fit are `u64::MAX` (beyond any file).
fn number(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

fn single(spec: &str, size: u64) -> Decision {
    let Some((first, last)) = spec.split_once('-') else {
        return Decision::Unsatisfiable;
    };
    if first.trim().is_empty() {
        // Suffix: the last n bytes.
        return match number(last) {
            Some(n) if n > 0 && size > 0 => Decision::Partial {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            _ => Decision::Unsatisfiable,
        };
    }
    let Some(start) = number(first) else {
        return Decision::Unsatisfiable;
    };
    let end = if last.trim().is_empty() {
        u64::MAX
    } else {
        match number(last) {
            Some(e) if e >= start => e,
            _ => return Decision::Unsatisfiable,
        }
    };
    if start >= size {
        return Decision::Unsatisfiable;
    }
    Decision::Partial {
        start,
        end: end.min(size - 1),
    }
}

/// The strong `ETag` header value of a download: the file's validator for its identity bytes,
/// a distinct one when the answer may be gzip-encoded by the compression layer (another
/// representation needs another tag, so an `If-Range` taken from a gzip answer never resumes
/// identity bytes).
pub fn etag_header(etag: &str, may_be_gzip: bool) -> Option<String> {
    if etag.is_empty() {
        None
    } else if may_be_gzip {
        Some(format!("\"{etag}.gz\""))
    } else {
        Some(format!("\"{etag}\""))
    }
}

/// Whether the request accepts gzip (leaning to yes: a wrong yes only costs a resume).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',').any(|c| {
                let coding = c.split(';').next().unwrap_or("").trim();
                coding.eq_ignore_ascii_case("gzip") || coding == "*"
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(range: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(range).unwrap());
        h
    }

    fn d(range: &str, size: u64) -> Decision {
        decide(&with(range), size, "abc", None)
    }

    #[test]
    fn single_ranges() {
        use Decision::*;
        assert_eq!(d("bytes=0-99", 1000), Partial { start: 0, end: 99 });
        assert_eq!(
            d("bytes=100-", 1000),
            Partial {
                start: 100,
                end: 999
            }
        );
        assert_eq!(
            d("bytes=-100", 1000),
            Partial {
                start: 900,
                end: 999
            }
        );
        assert_eq!(d("bytes=-5000", 1000), Partial { start: 0, end: 999 });
        assert_eq!(
            d("bytes=990-5000", 1000),
            Partial {
                start: 990,
                end: 999
            }
        );
        assert_eq!(d("Bytes = 5-5 ", 1000), Partial { start: 5, end: 5 });
        assert_eq!(
            d("bytes=999-", 1000),
            Partial {
                start: 999,
                end: 999
            }
        );
        assert_eq!(
            d("bytes=0-99999999999999999999999", 10),
            Partial { start: 0, end: 9 }
        );
        assert_eq!(d("bytes=0-1,", 10), Partial { start: 0, end: 1 });
    }

    #[test]
    fn unsatisfiable_and_invalid() {
        use Decision::*;
        for r in [
            "bytes=1000-",
            "bytes=1000-2000",
            "bytes=-0",
            "bytes=5-4",
            "bytes=abc",
            "bytes=-",
            "bytes=",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes=99999999999999999999999-",
            "bytes",
        ] {
            assert_eq!(d(r, 1000), Unsatisfiable, "{r}");
        }
        assert_eq!(d("bytes=0-", 0), Unsatisfiable);
        assert_eq!(d("bytes=-1", 0), Unsatisfiable);
    }

    #[test]
    fn ignored_ranges_answer_the_whole_file() {
        assert_eq!(d("bytes=0-1,5-6", 1000), Decision::Full);
        assert_eq!(d("items=0-1", 1000), Decision::Full);
        assert_eq!(decide(&HeaderMap::new(), 1000, "abc", None), Decision::Full);
        let mut two = with("bytes=0-1");
        two.append(header::RANGE, HeaderValue::from_static("bytes=2-3"));
        assert_eq!(decide(&two, 1000, "abc", None), Decision::Full);
        assert_eq!(
            d(&format!("bytes=0-1{}", " ".repeat(2000)), 10),
            Decision::Full
        );
    }

    #[test]
    fn if_range_needs_the_same_strong_validator() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let partial = Decision::Partial { start: 0, end: 1 };
        let check = |if_range: &str| {
            let mut h = with("bytes=0-1");
            h.insert(header::IF_RANGE, HeaderValue::from_str(if_range).unwrap());
            decide(&h, 10, "abc", Some(t))
        };
        assert_eq!(check("\"abc\""), partial);
        assert_eq!(check("\"abd\""), Decision::Full);
        assert_eq!(check("W/\"abc\""), Decision::Full);
        assert_eq!(check("\"abc.gz\""), Decision::Full);
        assert_eq!(check(&httpdate::fmt_http_date(t)), partial);
        assert_eq!(
            check(&httpdate::fmt_http_date(
                t + std::time::Duration::from_secs(1)
            )),
            Decision::Full
        );
        assert_eq!(check("garbage"), Decision::Full);
        // No validator of our own: nothing matches.
        let mut h = with("bytes=0-1");
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"\""));
        assert_eq!(decide(&h, 10, "", None), Decision::Full);
    }

    #[test]
    fn gzip_answers_get_their_own_tag() {
        assert_eq!(etag_header("abc", false).as_deref(), Some("\"abc\""));
        assert_eq!(etag_header("abc", true).as_deref(), Some("\"abc.gz\""));
        assert_eq!(etag_header("", false), None);
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, GZIP;q=0.5"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(!accepts_gzip(&h));
    }
}

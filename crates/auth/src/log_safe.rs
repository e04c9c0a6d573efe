//! Client-supplied text in log lines: control characters escaped, length capped, so that a
//! request can neither forge log lines or terminal escape sequences nor flood the log.

/// Characters of a client value kept in a log line; longer values end with `…`.
pub const LOG_VALUE_MAX_CHARS: usize = 256;

/// `value` fit for a log field: control characters (ESC, CR, LF, …) escaped as `\u{1b}`, at
/// most [`LOG_VALUE_MAX_CHARS`] characters, then `…`. Use it for every logged value a client
/// chose: scopes, client ids, `jti`s, paths, parameter values.
pub fn log_safe(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(LOG_VALUE_MAX_CHARS + 8));
    for (n, c) in value.chars().enumerate() {
        if n == LOG_VALUE_MAX_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_caps() {
        assert_eq!(log_safe("a\u{1b}[31mb\n"), "a\\u{1b}[31mb\\u{a}");
        let long = "x".repeat(10_000);
        let safe = log_safe(&long);
        assert_eq!(safe.chars().count(), LOG_VALUE_MAX_CHARS + 1);
        assert!(safe.ends_with('…'));
        assert_eq!(log_safe("system/Patient.rs"), "system/Patient.rs");
    }
}

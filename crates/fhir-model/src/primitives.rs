//! Syntax of the R4 primitive types (the regular expressions of the specification, hand-coded:
//! validation runs on every loaded resource).

use serde_json::Value;

/// The primitive types whose syntax is checked, resolved once from the type name (validation then
/// dispatches on this instead of comparing type names for every value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prim {
    Boolean,
    Integer,
    UnsignedInt,
    PositiveInt,
    Decimal,
    /// `string` and `markdown`.
    String,
    Xhtml,
    Id,
    Code,
    /// `uri`, `url` and `canonical`.
    Uri,
    Oid,
    Uuid,
    Base64Binary,
    Date,
    DateTime,
    Instant,
    Time,
    /// A name this module does not know: no value is valid.
    Unknown,
}

impl Prim {
    pub(crate) fn from_name(type_name: &str) -> Prim {
        match type_name {
            "boolean" => Prim::Boolean,
            "integer" => Prim::Integer,
            "unsignedInt" => Prim::UnsignedInt,
            "positiveInt" => Prim::PositiveInt,
            "decimal" => Prim::Decimal,
            "string" | "markdown" => Prim::String,
            "xhtml" => Prim::Xhtml,
            "id" => Prim::Id,
            "code" => Prim::Code,
            "uri" | "url" | "canonical" => Prim::Uri,
            "oid" => Prim::Oid,
            "uuid" => Prim::Uuid,
            "base64Binary" => Prim::Base64Binary,
            "date" => Prim::Date,
            "dateTime" => Prim::DateTime,
            "instant" => Prim::Instant,
            "time" => Prim::Time,
            _ => Prim::Unknown,
        }
    }

    /// The smallest value of an integer type.
    fn int_min(self) -> Option<i64> {
        match self {
            Prim::Integer => Some(i64::from(i32::MIN)),
            Prim::UnsignedInt => Some(0),
            Prim::PositiveInt => Some(1),
            _ => None,
        }
    }
}

/// Whether a JSON value is a valid representation of a FHIR primitive type.
pub fn primitive_value_ok(type_name: &str, value: &Value) -> bool {
    value_ok(Prim::from_name(type_name), value)
}

pub(crate) fn value_ok(prim: Prim, value: &Value) -> bool {
    if let Some(min) = prim.int_min() {
        return integer_in(value, min);
    }
    match (prim, value) {
        (Prim::Boolean, v) => v.is_boolean(),
        (Prim::Decimal, Value::Number(n)) => decimal_ok(n.as_str()),
        (Prim::Decimal, _) => false,
        (p, Value::String(s)) => text_ok(p, s),
        _ => false,
    }
}

fn integer_in(value: &Value, min: i64) -> bool {
    // With arbitrary_precision the number text is kept; "1.0" is not an integer.
    let Value::Number(number) = value else {
        return false;
    };
    let Some(n) = number.as_i64() else {
        return false;
    };
    n >= min && n <= i64::from(i32::MAX) && !number.as_str().contains(['.', 'e', 'E'])
}

/// Whether a string is valid lexical content for a FHIR primitive type (string-valued types, and
/// the textual forms of the numeric and boolean ones).
pub fn primitive_text_ok(type_name: &str, s: &str) -> bool {
    text_ok(Prim::from_name(type_name), s)
}

pub(crate) fn text_ok(prim: Prim, s: &str) -> bool {
    match prim {
        Prim::String => !s.is_empty() && s.len() <= 1024 * 1024 && !has_control(s),
        Prim::Xhtml => !s.is_empty(),
        Prim::Id => (1..=64).contains(&s.len()) && s.bytes().all(id_byte),
        Prim::Code => code_ok(s),
        Prim::Uri => !s.is_empty() && !s.chars().any(char::is_whitespace),
        Prim::Oid => oid_ok(s),
        Prim::Uuid => uuid_ok(s),
        Prim::Base64Binary => base64_ok(s),
        Prim::Date => date_ok(s),
        Prim::DateTime => date_time_ok(s, false),
        Prim::Instant => date_time_ok(s, true),
        Prim::Time => time_ok(s),
        Prim::Boolean => s == "true" || s == "false",
        Prim::Integer | Prim::UnsignedInt | Prim::PositiveInt => {
            let min = prim.int_min().unwrap_or(0);
            int_text_ok(s)
                && s.parse::<i64>()
                    .is_ok_and(|n| n >= min && n <= i64::from(i32::MAX))
        }
        Prim::Decimal => decimal_ok(s),
        Prim::Unknown => false,
    }
}

fn has_control(s: &str) -> bool {
    // Printable ASCII (the common case) has no control character.
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return false;
    }
    s.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
}

fn id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'.'
}

/// `[^\s]+(\s[^\s]+)*`
fn code_ok(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(char::is_whitespace)
        && !s.ends_with(char::is_whitespace)
        && !s.split(char::is_whitespace).any(str::is_empty)
}

fn oid_ok(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:oid:") else {
        return false;
    };
    let mut parts = rest.split('.');
    let first_ok = matches!(parts.next(), Some("0" | "1" | "2"));
    let mut n = 0;
    for p in parts {
        n += 1;
        if p.is_empty()
            || !p.bytes().all(|b| b.is_ascii_digit())
            || (p.len() > 1 && p.starts_with('0'))
        {
            return false;
        }
    }
    first_ok && n > 0
}

fn uuid_ok(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:uuid:") else {
        return false;
    };
    let groups: Vec<&str> = rest.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| {
            g.len() == n
                && g.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
}

fn base64_ok(s: &str) -> bool {
    let mut n = 0usize;
    for b in s.bytes() {
        if b.is_ascii_whitespace() {
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=') {
            return false;
        }
        n += 1;
    }
    n.is_multiple_of(4)
}

fn int_text_ok(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
fn decimal_ok(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let int_ok = int == "0"
        || (!int.is_empty() && !int.starts_with('0') && int.bytes().all(|b| b.is_ascii_digit()));
    let frac_ok = frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    let exp_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
    });
    // A value beyond f64's range (`1e400`) could be stored but never searched: refused.
    let in_range =
        (exponent.is_none() && int.len() < 300) || s.parse::<f64>().is_ok_and(f64::is_finite);
    int_ok && frac_ok && exp_ok && in_range
}

fn digits(s: &str, n: usize) -> Option<u32> {
    if s.len() == n && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        _ => 28,
    }
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`, a real calendar date, year 0001 or later.
fn date_ok(s: &str) -> bool {
    let mut parts = s.split('-');
    let Some(year) = parts.next().and_then(|y| digits(y, 4)) else {
        return false;
    };
    if year == 0 {
        return false;
    }
    let month = match parts.next() {
        None => return true,
        Some(m) => match digits(m, 2) {
            Some(m @ 1..=12) => m,
            _ => return false,
        },
    };
    let ok = match parts.next() {
        None => true,
        Some(d) => matches!(digits(d, 2), Some(d) if d >= 1 && d <= days_in_month(year, month)),
    };
    ok && parts.next().is_none()
}

/// `hh:mm:ss(.fff)?`
fn time_ok(s: &str) -> bool {
    let (hms, frac) = match s.split_once('.') {
        Some((a, f)) => (a, Some(f)),
        None => (s, None),
    };
    let mut parts = hms.split(':');
    let h = parts.next().and_then(|p| digits(p, 2));
    let m = parts.next().and_then(|p| digits(p, 2));
    let sec = parts.next().and_then(|p| digits(p, 2));
    matches!((h, m, sec), (Some(h), Some(m), Some(sec)) if h <= 23 && m <= 59 && sec <= 60)
        && parts.next().is_none()
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

fn offset_ok(tz: &str) -> bool {
    if tz == "Z" {
        return true;
    }
    let Some(rest) = tz.strip_prefix(['+', '-']) else {
        return false;
    };
    let Some((h, m)) = rest.split_once(':') else {
        return false;
    };
    matches!((digits(h, 2), digits(m, 2)), (Some(h), Some(m)) if (h <= 13 && m <= 59) || (h == 14 && m == 0))
}

/// dateTime: a date (any precision), or a full date with a time and a time zone.
/// instant: a full date with a time (seconds) and a time zone.
fn date_time_ok(s: &str, instant: bool) -> bool {
    let Some((date, rest)) = s.split_once('T') else {
        return !instant && date_ok(s);
    };
    if date.len() != 10 || !date_ok(date) {
        return false;
    }
    let tz_start = rest.find(['Z', '+', '-']);
    let Some(i) = tz_start else {
        return false;
    };
    time_ok(&rest[..i]) && offset_ok(&rest[i..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dates() {
        for ok in ["2020", "2020-02", "2020-02-29", "1900-12-31"] {
            assert!(primitive_text_ok("date", ok), "{ok}");
        }
        for bad in [
            "2020-13-45",
            "2019-02-29",
            "20",
            "2020-1-01",
            "2020-01-01T00:00:00Z",
            "0000",
        ] {
            assert!(!primitive_text_ok("date", bad), "{bad}");
        }
    }

    #[test]
    fn date_times_and_instants() {
        for ok in [
            "2020",
            "2020-01-02",
            "2020-01-02T03:04:05Z",
            "2020-01-02T03:04:05.123+14:00",
            "2017-01-01T00:00:00-05:00",
        ] {
            assert!(primitive_text_ok("dateTime", ok), "{ok}");
        }
        for bad in [
            "2020-01-02T03:04",
            "2020-01-02T03:04:05",
            "2020-01-02T25:04:05Z",
            "2020-01-02T03:04:05+15:00",
        ] {
            assert!(!primitive_text_ok("dateTime", bad), "{bad}");
        }
        assert!(primitive_text_ok("instant", "2020-01-02T03:04:05.1Z"));
        assert!(!primitive_text_ok("instant", "2020-01-02"));
    }

    #[test]
    fn numbers_keep_their_kinds() {
        assert!(primitive_value_ok(
            "decimal",
            &serde_json::from_str::<Value>("1.50").unwrap()
        ));
        assert!(primitive_value_ok("integer", &json!(-3)));
        assert!(!primitive_value_ok(
            "integer",
            &serde_json::from_str::<Value>("1.0").unwrap()
        ));
        assert!(!primitive_value_ok("positiveInt", &json!(0)));
        assert!(primitive_value_ok("unsignedInt", &json!(0)));
        assert!(!primitive_value_ok("integer", &json!("3")));
        assert!(!primitive_value_ok("boolean", &json!("true")));
    }

    #[test]
    fn decimals_beyond_f64_are_refused() {
        for bad in ["1e400", "-1e400", "1E+309", &"9".repeat(400)] {
            let v = serde_json::from_str::<Value>(bad).unwrap();
            assert!(!primitive_value_ok("decimal", &v), "{bad}");
            assert!(!primitive_text_ok("decimal", bad), "{bad}");
        }
        for ok in [
            "1e300",
            "-1.7976931348623157e308",
            "1e-400",
            "0.000001",
            &"9".repeat(299),
        ] {
            let v = serde_json::from_str::<Value>(ok).unwrap();
            assert!(primitive_value_ok("decimal", &v), "{ok}");
        }
    }

    #[test]
    fn strings_ids_codes_uris() {
        assert!(primitive_text_ok("id", "abc-1.2"));
        assert!(!primitive_text_ok("id", "abc_1"));
        assert!(!primitive_text_ok("id", &"a".repeat(65)));
        assert!(primitive_text_ok("code", "a b"));
        assert!(!primitive_text_ok("code", "a  b"));
        assert!(!primitive_text_ok("code", " a"));
        for (code, ok) in [
            ("a", true),
            ("a b c", true),
            ("a\tb", true),
            ("a\u{b}b", true),
            ("", false),
            ("a ", false),
            ("a\u{c}", false),
            ("\na", false),
            ("a \tb", false),
            ("é b", true),
            ("é  b", false),
            ("é\u{85}", false),
            ("a\u{a0}\u{a0}b", false),
        ] {
            assert_eq!(primitive_text_ok("code", code), ok, "{code:?}");
        }
        for (uri, ok) in [
            ("http://x", true),
            ("a\u{b}b", false),
            ("a\rb", false),
            ("é\u{2003}", false),
            ("é", true),
        ] {
            assert_eq!(primitive_text_ok("uri", uri), ok, "{uri:?}");
        }
        assert!(!primitive_text_ok("uri", "a b"));
        assert!(primitive_text_ok("oid", "urn:oid:1.2.840"));
        assert!(primitive_text_ok(
            "uuid",
            "urn:uuid:6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2"
        ));
        assert!(!primitive_text_ok("string", ""));
        assert!(primitive_text_ok("base64Binary", "aGVsbG8="));
        assert!(primitive_text_ok("time", "12:30:00.5"));
        assert!(!primitive_text_ok("time", "24:00:00"));
    }
}

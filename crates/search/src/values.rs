//! Value conversions shared by query parsing and index extraction: FHIR dates to millisecond
//! ranges by precision, decimals with their implicit precision, and string normalization.

use unicode_normalization::UnicodeNormalization;

/// Smallest and largest instants, used for open-ended periods.
pub const MIN_MS: i64 = i64::MIN / 2;
pub const MAX_MS: i64 = i64::MAX / 2;

/// A half-open time range `[lo, hi)` in milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub lo: i64,
    pub hi: i64,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                29
            } else {
                28
            }
        }
    }
}

const DAY_MS: i64 = 86_400_000;

fn digits(s: &str, n: usize) -> Option<u32> {
    if s.len() != n || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a FHIR `date`, `dateTime` or `instant` (or a search value of those forms) into the
/// range its precision covers. A time without a zone is taken as UTC: the server has no other
/// local time, and Synthea data always carries zones.
pub fn parse_date_range(s: &str) -> Result<DateRange, String> {
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let ys = parts.next().unwrap_or_default();
    let y = digits(ys, 4).ok_or_else(|| format!("'{s}' is not a FHIR date (year)"))? as i64;
    let month = parts.next();
    let day = parts.next();
    if parts.next().is_some() {
        return Err(format!("'{s}' is not a FHIR date"));
    }
    let Some(ms) = month else {
        if time.is_some() {
            return Err(format!("'{s}' has a time without a full date"));
        }
        let lo = days_from_civil(y, 1, 1) * DAY_MS;
        return Ok(DateRange {
            lo,
            hi: days_from_civil(y + 1, 1, 1) * DAY_MS,
        });
    };
    let m = digits(ms, 2)
        .filter(|m| (1..=12).contains(m))
        .ok_or_else(|| format!("'{s}' has an invalid month"))?;
    let Some(ds) = day else {
        if time.is_some() {
            return Err(format!("'{s}' has a time without a full date"));
        }
        let lo = days_from_civil(y, m, 1) * DAY_MS;
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        return Ok(DateRange {
            lo,
            hi: days_from_civil(ny, nm, 1) * DAY_MS,
        });
    };
    let d = digits(ds, 2)
        .filter(|d| *d >= 1 && *d <= days_in_month(y, m))
        .ok_or_else(|| format!("'{s}' has an invalid day"))?;
    let day_start = days_from_civil(y, m, d) * DAY_MS;
    let Some(t) = time else {
        return Ok(DateRange {
            lo: day_start,
            hi: day_start + DAY_MS,
        });
    };
    // Split off the zone: 'Z' or ±hh:mm at the end.
    let (clock, offset_ms) = if let Some(c) = t.strip_suffix('Z') {
        (c, 0i64)
    } else if t.len() > 6 && t.is_ascii() && matches!(t.as_bytes()[t.len() - 6], b'+' | b'-') {
        let (c, z) = t.split_at(t.len() - 6);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let zh = digits(&z[1..3], 2).filter(|h| *h <= 14);
        let zm = digits(&z[4..6], 2).filter(|m| *m < 60);
        match (zh, zm, &z[3..4]) {
            (Some(h), Some(mi), ":") => (c, sign * (h as i64 * 3_600_000 + mi as i64 * 60_000)),
            _ => return Err(format!("'{s}' has an invalid time zone")),
        }
    } else {
        (t, 0)
    };
    let mut hms = clock.split(':');
    let hh = hms
        .next()
        .and_then(|h| digits(h, 2))
        .filter(|h| *h < 24)
        .ok_or_else(|| format!("'{s}' has an invalid hour"))?;
    let mm = hms
        .next()
        .and_then(|m| digits(m, 2))
        .filter(|m| *m < 60)
        .ok_or_else(|| format!("'{s}' has an invalid minute"))?;
    let sec = hms.next();
    if hms.next().is_some() {
        return Err(format!("'{s}' has an invalid time"));
    }
    let base = day_start + hh as i64 * 3_600_000 + mm as i64 * 60_000 - offset_ms;
    let Some(sec) = sec else {
        return Ok(DateRange {
            lo: base,
            hi: base + 60_000,
        });
    };
    let (whole, frac) = match sec.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (sec, None),
    };
    let ss = digits(whole, 2)
        .filter(|s| *s < 60)
        .ok_or_else(|| format!("'{s}' has invalid seconds"))?;
    let lo = base + ss as i64 * 1000;
    let Some(frac) = frac else {
        return Ok(DateRange { lo, hi: lo + 1000 });
    };
    if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{s}' has invalid fractional seconds"));
    }
    // Millisecond resolution: further digits refine nothing we store.
    let used = &frac[..frac.len().min(3)];
    let width = 10i64.pow(3 - used.len() as u32);
    let ms: i64 = used.parse::<i64>().unwrap_or(0) * width;
    Ok(DateRange {
        lo: lo + ms,
        hi: lo + ms + width,
    })
}

/// A decimal as written, with the half-open interval its significant digits imply
/// (`100` → `[99.5, 100.5)`, `1.50` → `[1.495, 1.505)`).
///
/// Values and bounds are f64s (the index holds f64s, [`index_number`]). Where the implied
/// interval is narrower than the f64 spacing around the value (`12345678901234567890`, or
/// `1.000000000000000000001`), it is widened to the f64s within one step of the value —
/// `[prev, next]`, as `[prev, next_up(next))` — so it never collapses to nothing: the same
/// decimal, stored, is found, and so is a stored decimal inside the true interval (both round to
/// f64s less than about a step and a half apart). It may also match a stored decimal just
/// outside the interval, by less than two steps: an f64 cannot tell them apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decimal {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

/// Parses a search value of a `number` or `quantity` parameter. Its value is the f64 the index
/// would hold for the same text ([`index_number`]; `1e-400` is the smallest positive f64, not
/// zero); a value beyond the f64 range (`1e400`) is refused, as the model refuses to store one.
pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    let t = s.trim();
    let (value, overflow) = nearest_f64(t).ok_or_else(|| format!("'{s}' is not a number"))?;
    if overflow {
        return Err(format!(
            "'{s}' is beyond the range of numbers the server can search"
        ));
    }
    let (mantissa, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], exponent(&t[i + 1..])),
        None => (t, 0),
    };
    let frac_digits = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i64;
    let decimals = frac_digits.saturating_sub(exp);
    // 0.5 × 10^-decimals, without overflowing `powi`'s exponent: beyond ±400 it is 0 or ∞
    // anyway.
    let half = match decimals {
        401.. => 0.0,
        ..-400 => f64::INFINITY,
        d => 0.5 * 10f64.powi(-(d as i32)),
    };
    let mut lo = (value - half).min(value.next_down());
    let mut hi = (value + half).max(value.next_up().next_up());
    // Zero is exact and an underflow keeps its sign (`index_number`), so the widening never
    // crosses zero: a nonzero value's interval lies on its side of zero, as the true one does.
    if value > 0.0 {
        lo = lo.max(f64::from_bits(1));
    } else if value < 0.0 {
        hi = hi.min(0.0);
    }
    Ok(Decimal { value, lo, hi })
}

/// The value a decimal's text is indexed by (a `number`, or a `quantity`'s value): the nearest
/// f64, except that a nonzero value too small for one (`1e-400`) is the smallest f64 of its
/// sign rather than zero, so it stays on its side of zero for `gt0`/`lt0` and is found by
/// [`parse_decimal`] of the same text; and a value too large (`1e400`, which the model's
/// validation refuses) is `±f64::MAX`, still above (below) every other. `None` when `t` is not
/// a decimal (`NaN`, `inf` and white space included).
pub fn index_number(t: &str) -> Option<f64> {
    nearest_f64(t).map(|(v, _)| v)
}

/// The nearest f64 of a decimal, as [`index_number`] gives it, and whether it overflowed.
fn nearest_f64(t: &str) -> Option<(f64, bool)> {
    let ok = !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        && t.bytes().any(|b| b.is_ascii_digit());
    if !ok {
        return None;
    }
    let v: f64 = t.parse().ok()?;
    if v.is_infinite() {
        return Some((f64::MAX.copysign(v), true));
    }
    if v == 0.0 {
        let mantissa = t.split(['e', 'E']).next().unwrap_or_default();
        if mantissa.bytes().any(|b| matches!(b, b'1'..=b'9')) {
            // Underflow: keep the sign (`-1e-400` parses as -0.0).
            return Some((f64::from_bits(1).copysign(v), false));
        }
    }
    Some((v, false))
}

/// A decimal exponent (`-5`, `+12`, `0003`), saturated far beyond any f64's: huge exponents
/// only ever mean 0 or ∞ digits of precision.
fn exponent(e: &str) -> i64 {
    let (neg, digits) = match e.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, e.strip_prefix('+').unwrap_or(e)),
    };
    let digits = digits.trim_start_matches('0');
    let n = if digits.len() > 12 {
        1_000_000_000_000
    } else {
        digits.parse::<i64>().unwrap_or(0)
    };
    if neg { -n } else { n }
}

/// Normalizes a string for `string` search: accents removed (NFD, combining marks dropped),
/// lower-cased, whitespace runs collapsed. ASCII takes a fast path.
pub fn normalize_string(s: &str) -> String {
    if s.is_ascii() {
        let t = s.trim();
        let mut out = Vec::with_capacity(t.len());
        let mut space = false;
        for &b in t.as_bytes() {
            if b.is_ascii_whitespace() {
                space = true;
                continue;
            }
            if space {
                out.push(b' ');
                space = false;
            }
            out.push(b.to_ascii_lowercase());
        }
        // ASCII in, ASCII out.
        return String::from_utf8(out).unwrap_or_default();
    }
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.trim().nfd() {
        if unicode_normalization::char::is_combining_mark(c) {
            continue;
        }
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.extend(c.to_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_precisions() {
        let y = parse_date_range("2020").unwrap();
        assert_eq!(y.lo, 1_577_836_800_000);
        assert_eq!(y.hi, 1_609_459_200_000);
        let m = parse_date_range("2020-02").unwrap();
        assert_eq!(m.hi - m.lo, 29 * DAY_MS);
        let d = parse_date_range("2020-02-29").unwrap();
        assert_eq!(d.hi - d.lo, DAY_MS);
        let s = parse_date_range("2020-02-29T10:00:00+02:00").unwrap();
        assert_eq!(s.lo, d.lo + 8 * 3_600_000);
        assert_eq!(s.hi - s.lo, 1000);
        let ms = parse_date_range("2020-02-29T10:00:00.5Z").unwrap();
        assert_eq!(ms.hi - ms.lo, 100);
        let mi = parse_date_range("2020-02-29T10:00").unwrap();
        assert_eq!(mi.hi - mi.lo, 60_000);
    }

    #[test]
    fn bad_dates() {
        for s in [
            "2020-13-45",
            "2019-02-29",
            "20",
            "2020-1",
            "2020-01-01T25:00",
            "abc",
            "2020-01-01T10:00:00+2",
            "",
            "2020T10:00",
            "2020-01-01T10:00+é:00",
            "2020-01-01T10:00é",
        ] {
            assert!(parse_date_range(s).is_err(), "{s}");
        }
    }

    #[test]
    fn decimals_have_precision() {
        let d = parse_decimal("100").unwrap();
        assert_eq!((d.lo, d.hi), (99.5, 100.5));
        let d = parse_decimal("1.50").unwrap();
        assert!((d.lo - 1.495).abs() < 1e-12 && (d.hi - 1.505).abs() < 1e-12);
        assert!(parse_decimal("1.2.3").is_err());
        assert!(parse_decimal("x").is_err());
        assert!(parse_decimal("NaN").is_err());
    }

    /// Whether `eq` of the search text `q` matches a stored decimal written `stored`.
    fn eq_matches(q: &str, stored: &str) -> bool {
        let v = index_number(stored).unwrap();
        crate::matching::number_matches(crate::query::Prefix::Eq, v, &parse_decimal(q).unwrap())
    }

    #[test]
    fn decimals_finer_than_an_f64_keep_a_nonempty_interval() {
        let big = "12345678901234567890.123456789";
        let d = parse_decimal(big).unwrap();
        assert!(d.lo < d.value && d.value < d.hi, "{d:?}");
        // Exactly the f64s one step either side of the value.
        assert_eq!(d.lo, d.value.next_down());
        assert_eq!(d.hi, d.value.next_up().next_up());
        assert!(eq_matches(big, big));
        assert!(eq_matches("12345678901234567890", big));
        assert!(eq_matches(big, "12345678901234567890"));
        assert!(eq_matches("1.2345678901234567890123456789e19", big));
        assert!(!eq_matches(big, "12345678901234500000"));
        assert!(!eq_matches(big, "12345678901234600000"));
        let fine = "1.000000000000000000000001";
        assert!(eq_matches(fine, fine));
        assert!(eq_matches(fine, "1"));
        assert!(!eq_matches(fine, "1.0000000001"));
        // Coarser precisions keep their interval.
        assert!(eq_matches("1.5", "1.54"));
        assert!(!eq_matches("1.5", "1.56"));
        assert!(eq_matches("-100", "-100.5"));
        assert!(!eq_matches("-100", "-99.5"));
        assert!(eq_matches("1e2", "149"));
        assert!(!eq_matches("1e2", "150"));
    }

    #[test]
    fn underflow_keeps_the_sign_and_is_found() {
        let tiny = f64::from_bits(1);
        assert_eq!(index_number("1e-400"), Some(tiny));
        assert_eq!(index_number("-1e-400"), Some(-tiny));
        assert_eq!(index_number("0.00000e-400"), Some(0.0));
        assert_eq!(index_number("1e-300"), Some(1e-300));
        assert!(eq_matches("1e-400", "1e-400"));
        assert!(eq_matches("1e-400", "1.2e-400"));
        assert!(eq_matches("-1e-400", "-1e-400"));
        // Zero is exact: the widened interval of a nonzero value stops short of it.
        assert!(!eq_matches("1e-400", "0"));
        assert!(!eq_matches("1e-400", "-1e-400"));
        assert!(!eq_matches("-1e-400", "0"));
        assert!(!eq_matches("-1e-400", "-0"));
        // ... but 1e-400 is within `0`'s interval [-0.5, 0.5).
        assert!(eq_matches("0", "1e-400"));
        assert!(eq_matches("0", "-1e-400"));
        let gt0 = parse_decimal("0").unwrap();
        assert!(crate::matching::number_matches(
            crate::query::Prefix::Gt,
            tiny,
            &gt0
        ));
        // Exponents beyond any i64 saturate.
        let d = parse_decimal("1e-99999999999999999999999").unwrap();
        assert_eq!(d.value, tiny);
        let d = parse_decimal("0e-99999999999999999999999").unwrap();
        assert!(d.lo < 0.0 && 0.0 < d.hi && d.hi < 1e-300, "{d:?}");
        let d = parse_decimal("0e99999999999999999999999").unwrap();
        assert_eq!((d.lo, d.hi), (f64::NEG_INFINITY, f64::INFINITY));
    }

    #[test]
    fn overflow_saturates_in_the_index_and_is_refused_in_a_search() {
        assert_eq!(index_number("1e400"), Some(f64::MAX));
        assert_eq!(index_number("-1e400"), Some(-f64::MAX));
        assert_eq!(index_number("1.7976931348623157e308"), Some(f64::MAX));
        assert!(parse_decimal("1e400").is_err());
        assert!(parse_decimal("-1e99999999999999999999999").is_err());
        let max = parse_decimal("1.7976931348623157e308").unwrap();
        assert_eq!(max.value, f64::MAX);
        assert!(max.lo < f64::MAX && max.hi == f64::INFINITY);
        for s in [
            "NaN",
            "inf",
            "-infinity",
            " 1",
            "",
            "e",
            "1e",
            "0x10",
            "1.2.3",
        ] {
            assert_eq!(index_number(s), None, "{s}");
        }
    }

    #[test]
    fn normalization() {
        assert_eq!(normalize_string("  Émile  Zola "), "emile zola");
        assert_eq!(normalize_string("MÜLLER"), "muller");
        assert_eq!(normalize_string("Smith"), "smith");
        // Trimmed as Unicode white space, collapsed as ASCII white space (vertical tab kept).
        assert_eq!(normalize_string("\u{b} A\t\n B\u{b}C \u{b}"), "a b\u{b}c");
    }
}

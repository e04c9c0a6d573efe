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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decimal {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    let t = s.trim();
    let ok = !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        && t.bytes().any(|b| b.is_ascii_digit());
    let value: f64 = if ok { t.parse().ok() } else { None }
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| format!("'{s}' is not a number"))?;
    let (mantissa, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], t[i + 1..].parse::<i32>().unwrap_or(0)),
        None => (t, 0),
    };
    let decimals = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i32 - exp;
    let half = 0.5 * 10f64.powi(-decimals);
    Ok(Decimal {
        value,
        lo: value - half,
        hi: value + half,
    })
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

    #[test]
    fn normalization() {
        assert_eq!(normalize_string("  Émile  Zola "), "emile zola");
        assert_eq!(normalize_string("MÜLLER"), "muller");
        assert_eq!(normalize_string("Smith"), "smith");
        // Trimmed as Unicode white space, collapsed as ASCII white space (vertical tab kept).
        assert_eq!(normalize_string("\u{b} A\t\n B\u{b}C \u{b}"), "a b\u{b}c");
    }
}

//! Date, DateTime and Time values with partial precision.

use std::cmp::Ordering;
use std::fmt;

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, Timelike};

/// How much of a date/time value is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Precision {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    Millisecond,
}

/// Which FHIRPath type a [`Temporal`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TemporalKind {
    Date,
    DateTime,
    Time,
}

/// A Date, DateTime or Time with the precision it was written with.
///
/// Fields beyond `precision` are zero. For `Time`, the date fields are unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Temporal {
    pub kind: TemporalKind,
    pub year: i32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// Fraction of the second in nanoseconds.
    pub nanos: u32,
    /// Digits of the fraction as written (0 when absent).
    pub frac_digits: u8,
    pub precision: Precision,
    /// Time-zone offset in minutes; `None` when the value has no zone.
    pub offset_minutes: Option<i32>,
}

fn num(s: &str, len: usize) -> Option<(u32, &str)> {
    if s.len() < len || !s.as_bytes()[..len].iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((s[..len].parse().ok()?, &s[len..]))
}

impl Temporal {
    fn empty(kind: TemporalKind) -> Self {
        Temporal {
            kind,
            year: 0,
            month: 0,
            day: 0,
            hour: 0,
            minute: 0,
            second: 0,
            nanos: 0,
            frac_digits: 0,
            precision: Precision::Year,
            offset_minutes: None,
        }
    }

    /// Parses `YYYY[-MM[-DD]]`.
    pub fn parse_date(s: &str) -> Option<Temporal> {
        let mut t = Temporal::empty(TemporalKind::Date);
        let rest = t.read_date(s)?;
        rest.is_empty().then_some(t)
    }

    /// Parses a FHIR dateTime / FHIRPath DateTime literal body: `YYYY[-MM[-DD[Thh[:mm[:ss[.f]]][tz]]]]`,
    /// also accepting a trailing `T` after a partial date (`2015T`).
    pub fn parse_datetime(s: &str) -> Option<Temporal> {
        let mut t = Temporal::empty(TemporalKind::DateTime);
        let rest = t.read_date(s)?;
        if rest.is_empty() {
            return Some(t);
        }
        let rest = rest.strip_prefix('T')?;
        if rest.is_empty() {
            return Some(t);
        }
        if t.precision != Precision::Day {
            return None;
        }
        let rest = t.read_time(rest)?;
        let rest = t.read_zone(rest)?;
        rest.is_empty().then_some(t)
    }

    /// Parses `hh[:mm[:ss[.f]]]`.
    pub fn parse_time(s: &str) -> Option<Temporal> {
        let mut t = Temporal::empty(TemporalKind::Time);
        let rest = t.read_time(s)?;
        rest.is_empty().then_some(t)
    }

    fn read_date<'s>(&mut self, s: &'s str) -> Option<&'s str> {
        let (y, rest) = num(s, 4)?;
        self.year = y as i32;
        self.precision = Precision::Year;
        let Some(r) = rest.strip_prefix('-') else {
            return Some(rest);
        };
        let (m, rest) = num(r, 2)?;
        if !(1..=12).contains(&m) {
            return None;
        }
        self.month = m as u8;
        self.precision = Precision::Month;
        let Some(r) = rest.strip_prefix('-') else {
            return Some(rest);
        };
        let (d, rest) = num(r, 2)?;
        NaiveDate::from_ymd_opt(self.year, m, d)?;
        self.day = d as u8;
        self.precision = Precision::Day;
        Some(rest)
    }

    fn read_time<'s>(&mut self, s: &'s str) -> Option<&'s str> {
        let (h, rest) = num(s, 2)?;
        if h > 23 {
            return None;
        }
        self.hour = h as u8;
        self.precision = Precision::Hour;
        let Some(r) = rest.strip_prefix(':') else {
            return Some(rest);
        };
        let (m, rest) = num(r, 2)?;
        if m > 59 {
            return None;
        }
        self.minute = m as u8;
        self.precision = Precision::Minute;
        let Some(r) = rest.strip_prefix(':') else {
            return Some(rest);
        };
        let (sec, rest) = num(r, 2)?;
        if sec > 59 {
            return None;
        }
        self.second = sec as u8;
        self.precision = Precision::Second;
        let Some(r) = rest.strip_prefix('.') else {
            return Some(rest);
        };
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut nanos: u32 = 0;
        for (i, c) in r[..digits].bytes().enumerate() {
            if i < 9 {
                nanos = nanos * 10 + u32::from(c - b'0');
            }
        }
        for _ in digits..9 {
            nanos *= 10;
        }
        self.nanos = nanos;
        self.frac_digits = digits.min(9) as u8;
        self.precision = Precision::Millisecond;
        Some(&r[digits..])
    }

    fn read_zone<'s>(&mut self, s: &'s str) -> Option<&'s str> {
        if let Some(r) = s.strip_prefix('Z') {
            self.offset_minutes = Some(0);
            return Some(r);
        }
        let sign = match s.as_bytes().first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return Some(s),
        };
        let (h, r) = num(&s[1..], 2)?;
        let r = r.strip_prefix(':')?;
        let (m, r) = num(r, 2)?;
        if h > 14 || m > 59 {
            return None;
        }
        self.offset_minutes = Some(sign * (h as i32 * 60 + m as i32));
        Some(r)
    }

    /// A DateTime from a chrono value, at millisecond precision.
    pub fn from_chrono(dt: &chrono::DateTime<chrono::FixedOffset>) -> Temporal {
        Temporal {
            kind: TemporalKind::DateTime,
            year: dt.year(),
            month: dt.month() as u8,
            day: dt.day() as u8,
            hour: dt.hour() as u8,
            minute: dt.minute() as u8,
            second: dt.second() as u8,
            nanos: dt.nanosecond() / 1_000_000 * 1_000_000,
            frac_digits: 3,
            precision: Precision::Millisecond,
            offset_minutes: Some(dt.offset().local_minus_utc() / 60),
        }
    }

    /// Converts to the given kind, truncating or keeping precision (`toDate`, `toDateTime`).
    pub fn with_kind(mut self, kind: TemporalKind) -> Temporal {
        if kind == TemporalKind::Date && self.precision > Precision::Day {
            self.precision = Precision::Day;
            self.hour = 0;
            self.minute = 0;
            self.second = 0;
            self.nanos = 0;
            self.frac_digits = 0;
            self.offset_minutes = None;
        }
        self.kind = kind;
        self
    }

    /// Second and millisecond count as one precision for comparisons.
    fn cmp_precision(&self) -> Precision {
        self.precision.min(Precision::Second)
    }

    fn naive(&self) -> Option<NaiveDateTime> {
        let date = if self.kind == TemporalKind::Time {
            NaiveDate::from_ymd_opt(2000, 1, 1)?
        } else {
            NaiveDate::from_ymd_opt(
                self.year,
                u32::from(self.month.max(1)),
                u32::from(self.day.max(1)),
            )?
        };
        let time = NaiveTime::from_hms_nano_opt(
            u32::from(self.hour),
            u32::from(self.minute),
            u32::from(self.second),
            self.nanos,
        )?;
        Some(NaiveDateTime::new(date, time))
    }

    fn set_naive(&mut self, n: NaiveDateTime) {
        if self.kind != TemporalKind::Time {
            self.year = n.year();
            if self.precision >= Precision::Month {
                self.month = n.month() as u8;
            }
            if self.precision >= Precision::Day {
                self.day = n.day() as u8;
            }
        }
        if self.precision >= Precision::Hour {
            self.hour = n.hour() as u8;
        }
        if self.precision >= Precision::Minute {
            self.minute = n.minute() as u8;
        }
        if self.precision >= Precision::Second {
            self.second = n.second() as u8;
        }
        if self.precision >= Precision::Millisecond {
            self.nanos = n.nanosecond();
        }
    }

    /// The value shifted to UTC when it carries a zone and time fields.
    fn normalized(&self) -> Temporal {
        match self.offset_minutes {
            Some(off) if off != 0 && self.precision >= Precision::Hour => {
                let mut t = *self;
                if let Some(n) = self.naive()
                    && let Some(shifted) = n.checked_sub_signed(Duration::minutes(i64::from(off)))
                {
                    t.set_naive(shifted);
                }
                t.offset_minutes = Some(0);
                t
            }
            _ => *self,
        }
    }

    /// FHIRPath comparison: `None` when the values differ in precision and agree on what both know.
    pub fn compare(&self, other: &Temporal) -> Option<Ordering> {
        // Values are compared in UTC; a value without a zone counts as UTC (as the Firely engine
        // behind the reference anonymizer does), so `2010-01-01` differs from
        // `2010-01-01T00:00:00+08:00` (= 2009-12-31T16:00Z).
        let (a, b) = (self.normalized(), other.normalized());
        let pa = a.cmp_precision();
        let pb = b.cmp_precision();
        let common = pa.min(pb);
        let fields: [(Precision, i64, i64); 6] = [
            (Precision::Year, i64::from(a.year), i64::from(b.year)),
            (Precision::Month, i64::from(a.month), i64::from(b.month)),
            (Precision::Day, i64::from(a.day), i64::from(b.day)),
            (Precision::Hour, i64::from(a.hour), i64::from(b.hour)),
            (Precision::Minute, i64::from(a.minute), i64::from(b.minute)),
            (
                Precision::Second,
                i64::from(a.second) * 1_000_000_000 + i64::from(a.nanos),
                i64::from(b.second) * 1_000_000_000 + i64::from(b.nanos),
            ),
        ];
        for (p, x, y) in fields {
            if a.kind == TemporalKind::Time && p < Precision::Hour {
                continue;
            }
            if p > common {
                break;
            }
            match x.cmp(&y) {
                Ordering::Equal => {}
                o => return Some(o),
            }
        }
        if pa != pb {
            return None;
        }
        Some(Ordering::Equal)
    }

    /// Adds a calendar duration (`unit` is a calendar keyword: year, month, week, day, hour, minute,
    /// second, millisecond). Fractional amounts are truncated, as the specification requires for
    /// calendar arithmetic; amounts below the value's precision are ignored. `None` when the
    /// result is not a date of the specification's range, years 1 to 9999.
    pub fn add(&self, amount: rust_decimal::Decimal, unit: &str) -> Option<Temporal> {
        let t = self.add_unchecked(amount, unit)?;
        (t.kind == TemporalKind::Time || (1..=9999).contains(&t.year)).then_some(t)
    }

    /// [`Temporal::add`] without the year range; the arithmetic itself is checked, so an amount
    /// too large for it is `None` rather than a wrapped year.
    fn add_unchecked(&self, amount: rust_decimal::Decimal, unit: &str) -> Option<Temporal> {
        use rust_decimal::prelude::ToPrimitive;
        let mut t = *self;
        let whole = amount.trunc().to_i64()?;
        match unit {
            "year" | "month" => {
                if t.kind == TemporalKind::Time {
                    return None;
                }
                let months = if unit == "year" {
                    whole.checked_mul(12)?
                } else {
                    whole
                };
                if unit == "month" && t.precision < Precision::Month {
                    // A year-precision value moves by whole years only.
                    t.year = i32::try_from(i64::from(t.year).checked_add(months / 12)?).ok()?;
                    return Some(t);
                }
                let total =
                    (i64::from(t.year) * 12 + i64::from(t.month.max(1)) - 1).checked_add(months)?;
                t.year = i32::try_from(total.div_euclid(12)).ok()?;
                if t.precision >= Precision::Month {
                    t.month = (total.rem_euclid(12) + 1) as u8;
                }
                if t.precision >= Precision::Day {
                    let last = last_day(t.year, u32::from(t.month))?;
                    t.day = t.day.min(last as u8);
                }
                Some(t)
            }
            "week" | "day" => {
                if t.kind == TemporalKind::Time {
                    return None;
                }
                let days = if unit == "week" {
                    whole.checked_mul(7)?
                } else {
                    whole
                };
                if t.precision < Precision::Day {
                    return Some(t);
                }
                let n = t.naive()?.checked_add_signed(Duration::try_days(days)?)?;
                t.set_naive(n);
                Some(t)
            }
            "hour" | "minute" | "second" | "millisecond" => {
                let d = match unit {
                    "hour" => Duration::try_hours(whole)?,
                    "minute" => Duration::try_minutes(whole)?,
                    "second" => Duration::try_seconds(whole)?,
                    _ => Duration::try_milliseconds(whole)?,
                };
                if t.kind != TemporalKind::Time && t.precision < Precision::Hour {
                    // Time units below the value's precision: whole days only.
                    let days = d.num_days();
                    if t.precision >= Precision::Day {
                        let n = t.naive()?.checked_add_signed(Duration::try_days(days)?)?;
                        t.set_naive(n);
                    }
                    return Some(t);
                }
                // Times wrap around midnight: set_naive ignores the date part for them.
                let n = t.naive()?.checked_add_signed(d)?;
                t.set_naive(n);
                if unit == "millisecond" && t.precision < Precision::Millisecond {
                    t.precision = Precision::Millisecond;
                    t.frac_digits = 3;
                    t.nanos = n.nanosecond();
                }
                Some(t)
            }
            _ => None,
        }
    }

    /// The FHIRPath text form (without `@`).
    pub fn to_text(&self) -> String {
        self.to_string()
    }
}

fn last_day(year: i32, month: u32) -> Option<u32> {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    Some(NaiveDate::from_ymd_opt(ny, nm, 1)?.pred_opt()?.day())
}

impl fmt::Display for Temporal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind != TemporalKind::Time {
            // Four digits: parsing and `add` keep years within 0..=9999.
            write!(f, "{:04}", self.year)?;
            if self.precision >= Precision::Month {
                write!(f, "-{:02}", self.month)?;
            }
            if self.precision >= Precision::Day {
                write!(f, "-{:02}", self.day)?;
            }
            if self.precision < Precision::Hour {
                return Ok(());
            }
            f.write_str("T")?;
        }
        write!(f, "{:02}", self.hour)?;
        if self.precision >= Precision::Minute {
            write!(f, ":{:02}", self.minute)?;
        }
        if self.precision >= Precision::Second {
            write!(f, ":{:02}", self.second)?;
        }
        if self.precision >= Precision::Millisecond {
            let digits = usize::from(self.frac_digits.max(3));
            let frac = format!("{:09}", self.nanos);
            write!(f, ".{}", &frac[..digits])?;
        }
        if self.kind == TemporalKind::DateTime {
            match self.offset_minutes {
                Some(0) => f.write_str("Z")?,
                Some(off) => {
                    let sign = if off < 0 { '-' } else { '+' };
                    write!(f, "{sign}{:02}:{:02}", off.abs() / 60, off.abs() % 60)?;
                }
                None => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    #[test]
    fn parse_and_print() {
        for s in [
            "2015",
            "2015-02",
            "2015-02-07",
            "2015-02-07T13:28:17-05:00",
            "2015-02-07T13:28:17.239+02:00",
        ] {
            assert_eq!(Temporal::parse_datetime(s).unwrap().to_string(), s);
        }
        assert!(Temporal::parse_date("2015-13").is_none());
        assert!(Temporal::parse_date("2015-02-30").is_none());
        assert_eq!(Temporal::parse_time("14:34").unwrap().to_string(), "14:34");
    }

    #[test]
    fn precision_compare() {
        let a = Temporal::parse_datetime("2012-04-15").unwrap();
        let b = Temporal::parse_datetime("2012-04-15T10:00").unwrap();
        assert_eq!(a.compare(&b), None);
        let c = Temporal::parse_datetime("2012-04-16T10:00").unwrap();
        assert_eq!(a.compare(&c), Some(Ordering::Less));
        let x = Temporal::parse_datetime("2017-11-05T01:30:00.0-04:00").unwrap();
        let y = Temporal::parse_datetime("2017-11-05T01:15:00.0-05:00").unwrap();
        assert_eq!(x.compare(&y), Some(Ordering::Less));
    }

    #[test]
    fn calendar_add() {
        let d = Temporal::parse_date("1973-12-25").unwrap();
        assert_eq!(
            d.add(Decimal::from(1), "month").unwrap().to_string(),
            "1974-01-25"
        );
        assert_eq!(
            d.add(Decimal::new(77, 1), "day").unwrap().to_string(),
            "1974-01-01"
        );
        let e = Temporal::parse_date("2016-01-31").unwrap();
        assert_eq!(
            e.add(Decimal::from(1), "month").unwrap().to_string(),
            "2016-02-29"
        );
    }

    /// Calendar arithmetic wrapped (`whole * 12` in release builds) or truncated to 32 bits, and
    /// let years leave 1..=9999: `@2020-01-01 + 4294967296 years` was 2020-01-01 and
    /// `@0001-01-01 - 1 day - 1 year` printed as `-001-12-31`. Such results are now empty.
    #[test]
    fn calendar_add_outside_years_1_to_9999_is_none() {
        let day = |s: &str| Temporal::parse_date(s).unwrap();
        let year = Temporal::parse_date("2020").unwrap();
        for (t, amount, unit) in [
            (day("2020-01-01"), Decimal::from(4_294_967_296_i64), "year"),
            (year, Decimal::from(i64::MAX), "month"),
            (year, Decimal::from(i64::MAX), "year"),
            (day("2020-01-01"), Decimal::from(i64::MAX), "week"),
            (day("9999-12-31"), Decimal::from(1), "year"),
            (day("9999-12-31"), Decimal::from(1), "day"),
            (day("0001-01-01"), Decimal::from(-1), "day"),
            (day("0001-03-01"), Decimal::from(-3), "month"),
            (year, Decimal::from(8000), "year"),
        ] {
            assert_eq!(t.add(amount, unit), None, "{t} + {amount} {unit}");
        }
        for (t, amount, unit, want) in [
            (day("9998-12-31"), Decimal::from(1), "year", "9999-12-31"),
            (day("0002-01-01"), Decimal::from(-1), "year", "0001-01-01"),
            (year, Decimal::from(25), "month", "2022"),
        ] {
            assert_eq!(t.add(amount, unit).unwrap().to_string(), want);
        }
        // Times have no year: they wrap around midnight as before.
        let time = Temporal::parse_time("23:00").unwrap();
        assert_eq!(
            time.add(Decimal::from(2), "hour").unwrap().to_string(),
            "01:00"
        );
    }
}

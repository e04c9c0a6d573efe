//! `lowBoundary()` / `highBoundary()`: the range a value of limited precision stands for.

use rust_decimal::{Decimal, RoundingStrategy};

use crate::quantity::Quantity;
use crate::temporal::{Precision, Temporal, TemporalKind};
use crate::value::SystemValue;

/// The boundary of `v` at `precision` digits (decimal places for numbers, digit count for
/// dates/times); `None` when the precision is out of range or the type has no boundary.
pub(crate) fn boundary<'a>(
    v: &SystemValue<'a>,
    precision: Option<i64>,
    high: bool,
) -> Option<SystemValue<'a>> {
    match v {
        SystemValue::Integer(i) => {
            decimal_boundary(Decimal::from(*i), precision, high).map(SystemValue::Decimal)
        }
        SystemValue::Decimal(d) => decimal_boundary(*d, precision, high).map(SystemValue::Decimal),
        SystemValue::Quantity(q) => decimal_boundary(q.value, precision, high)
            .map(|d| SystemValue::Quantity(Quantity::new(d, q.unit.clone()))),
        SystemValue::Date(t) | SystemValue::DateTime(t) | SystemValue::Time(t) => {
            temporal_boundary(t, precision, high).map(SystemValue::temporal)
        }
        _ => None,
    }
}

fn decimal_boundary(d: Decimal, precision: Option<i64>, high: bool) -> Option<Decimal> {
    let p = precision.unwrap_or(8);
    if !(0..=28).contains(&p) {
        return None;
    }
    // Half a unit in the last written place on either side (none beyond the 28-digit scale limit).
    if d.scale() >= 28 {
        return Some(d);
    }
    let half = Decimal::new(5, d.scale() + 1);
    let edge = if high {
        d.checked_add(half)?
    } else {
        d.checked_sub(half)?
    };
    let strategy = if high {
        RoundingStrategy::ToPositiveInfinity
    } else {
        RoundingStrategy::ToNegativeInfinity
    };
    let mut r = edge.round_dp_with_strategy(p as u32, strategy);
    if r.scale() < p as u32 {
        r.rescale(p as u32);
    }
    Some(r)
}

fn precision_of_digits(kind: TemporalKind, digits: i64) -> Option<Precision> {
    Some(match (kind, digits) {
        (TemporalKind::Time, 2) => Precision::Hour,
        (TemporalKind::Time, 4) => Precision::Minute,
        (TemporalKind::Time, 6) => Precision::Second,
        (TemporalKind::Time, 9) => Precision::Millisecond,
        (TemporalKind::Time, _) => return None,
        (_, 4) => Precision::Year,
        (_, 6) => Precision::Month,
        (_, 8) => Precision::Day,
        (TemporalKind::DateTime, 10) => Precision::Hour,
        (TemporalKind::DateTime, 12) => Precision::Minute,
        (TemporalKind::DateTime, 14) => Precision::Second,
        (TemporalKind::DateTime, 17) => Precision::Millisecond,
        _ => return None,
    })
}

fn temporal_boundary(t: &Temporal, precision: Option<i64>, high: bool) -> Option<Temporal> {
    let digits = precision.unwrap_or(match t.kind {
        TemporalKind::Date => 8,
        TemporalKind::DateTime => 17,
        TemporalKind::Time => 9,
    });
    let target = precision_of_digits(t.kind, digits)?;
    let mut r = *t;
    if target < Precision::Hour && t.kind == TemporalKind::DateTime {
        // A date-precision boundary of a DateTime is reported as a Date.
        r.kind = if precision.is_some() {
            TemporalKind::Date
        } else {
            t.kind
        };
    }
    let fill = |p: Precision| t.precision < p && target >= p;
    if t.kind != TemporalKind::Time {
        if fill(Precision::Month) {
            r.month = if high { 12 } else { 1 };
        }
        if fill(Precision::Day) {
            r.day = if high {
                days_in_month(r.year, r.month)?
            } else {
                1
            };
        }
    }
    if fill(Precision::Hour) {
        r.hour = if high { 23 } else { 0 };
    }
    if fill(Precision::Minute) {
        r.minute = if high { 59 } else { 0 };
    }
    if fill(Precision::Second) {
        r.second = if high { 59 } else { 0 };
    }
    if fill(Precision::Millisecond) {
        r.nanos = if high { 999_000_000 } else { 0 };
        r.frac_digits = 3;
    }
    r.precision = target;
    if target < Precision::Millisecond {
        r.nanos = 0;
        r.frac_digits = 0;
    }
    if target < Precision::Hour {
        r.hour = 0;
        r.minute = 0;
        r.second = 0;
        r.offset_minutes = None;
    }
    if r.kind == TemporalKind::DateTime && target >= Precision::Hour && r.offset_minutes.is_none() {
        // Without a zone the value could be anywhere from UTC+14 to UTC-12.
        r.offset_minutes = Some(if high { -12 * 60 } else { 14 * 60 });
    }
    if target < Precision::Day && t.kind != TemporalKind::Time {
        r.day = 0;
    }
    if target < Precision::Month && t.kind != TemporalKind::Time {
        r.month = 0;
    }
    Some(r)
}

fn days_in_month(year: i32, month: u8) -> Option<u8> {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, u32::from(month) + 1)
    };
    let first_next = chrono::NaiveDate::from_ymd_opt(ny, nm, 1)?;
    Some(chrono::Datelike::day(&first_next.pred_opt()?) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn decimals() {
        assert_eq!(decimal_boundary(d("1.587"), None, false), Some(d("1.5865")));
        assert_eq!(
            decimal_boundary(d("1.587"), Some(2), false),
            Some(d("1.58"))
        );
        assert_eq!(decimal_boundary(d("1.587"), Some(2), true), Some(d("1.59")));
        assert_eq!(decimal_boundary(d("120"), Some(2), false), Some(d("119.5")));
        assert_eq!(decimal_boundary(d("1"), Some(0), true), Some(d("2")));
        assert_eq!(decimal_boundary(d("1"), Some(32), true), None);
    }

    #[test]
    fn dates() {
        let t = Temporal::parse_datetime("2014-01-01T08:05+08:00").unwrap();
        assert_eq!(
            temporal_boundary(&t, Some(17), false).unwrap().to_string(),
            "2014-01-01T08:05:00.000+08:00"
        );
        let y = Temporal::parse_date("2014").unwrap();
        assert_eq!(
            temporal_boundary(&y, Some(6), true).unwrap().to_string(),
            "2014-12"
        );
        let tm = Temporal::parse_time("10:30").unwrap();
        assert_eq!(
            temporal_boundary(&tm, Some(9), true).unwrap().to_string(),
            "10:30:59.999"
        );
    }
}

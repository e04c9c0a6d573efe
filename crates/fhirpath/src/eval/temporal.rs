//! Date and time functions (`now()`, `yearOf()` …) and `precision()` / `lowBoundary()` /
//! `highBoundary()` of decimals and temporals.

use rust_decimal::Decimal;

use crate::functions::Builtin;
use crate::node::Item;
use crate::parser::Expr;
use crate::temporal::{Precision, Temporal, TemporalKind};
use crate::value::SystemValue;

use super::{Env, R, eval, misrouted, single_int, single_sys, val};

use super::conversion::to_temporal;

/// `now()`, `today()`, `timeOfDay()`, `yearOf()` … `timeOf()`, `precision()`, the boundaries.
pub(super) fn call<'a>(
    f: Builtin,
    focus: Vec<Item<'a>>,
    args: &[Expr],
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    use Builtin as F;
    use SystemValue as S;
    match f {
        F::Now => val(S::DateTime(Temporal::from_chrono(&env.ctx.now()))),
        F::Today => val(S::Date(
            Temporal::from_chrono(&env.ctx.now()).with_kind(TemporalKind::Date),
        )),
        F::TimeOfDay => {
            let mut t = Temporal::from_chrono(&env.ctx.now());
            t.kind = TemporalKind::Time;
            t.offset_minutes = None;
            val(S::Time(t))
        }
        F::YearOf
        | F::MonthOf
        | F::DayOf
        | F::HourOf
        | F::MinuteOf
        | F::SecondOf
        | F::MillisecondOf
        | F::TimezoneOffsetOf
        | F::DateOf
        | F::TimeOf => {
            let v = match single_sys(&focus, f.name())? {
                Some(S::String(s)) => to_temporal(S::String(s), TemporalKind::DateTime),
                other => other,
            };
            let t = match v {
                Some(S::Date(t) | S::DateTime(t) | S::Time(t)) => t,
                _ => return Ok(Vec::new()),
            };
            Ok(temporal_component(f, &t)
                .map(Item::Value)
                .into_iter()
                .collect())
        }
        F::Precision => {
            let Some(v) = single_sys(&focus, "precision")? else {
                return Ok(Vec::new());
            };
            let p = match v {
                S::Decimal(d) => d.scale() as i64,
                S::Integer(_) => 0,
                S::Date(t) | S::DateTime(t) | S::Time(t) => temporal_digits(&t) as i64,
                _ => return Ok(Vec::new()),
            };
            val(S::Integer(p))
        }
        F::LowBoundary | F::HighBoundary => {
            let Some(v) = single_sys(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let precision = match args.first() {
                Some(a) => single_int(&eval(a, env, input)?, f.name())?,
                None => None,
            };
            Ok(
                crate::boundary::boundary(&v, precision, f == F::HighBoundary)
                    .map(Item::Value)
                    .into_iter()
                    .collect(),
            )
        }
        _ => Err(misrouted(f)),
    }
}

/// `yearOf()` … `timeOf()`: a component when the value is precise enough to have it.
fn temporal_component<'a>(f: Builtin, t: &Temporal) -> Option<SystemValue<'a>> {
    use Builtin as F;
    let is_time = t.kind == TemporalKind::Time;
    let int = |p: Precision, v: i64| (t.precision >= p).then_some(SystemValue::Integer(v));
    match f {
        F::YearOf if !is_time => int(Precision::Year, i64::from(t.year)),
        F::MonthOf if !is_time => int(Precision::Month, i64::from(t.month)),
        F::DayOf if !is_time => int(Precision::Day, i64::from(t.day)),
        F::HourOf if t.kind != TemporalKind::Date => int(Precision::Hour, i64::from(t.hour)),
        F::MinuteOf if t.kind != TemporalKind::Date => int(Precision::Minute, i64::from(t.minute)),
        F::SecondOf if t.kind != TemporalKind::Date => int(Precision::Second, i64::from(t.second)),
        F::MillisecondOf if t.kind != TemporalKind::Date => {
            int(Precision::Millisecond, i64::from(t.nanos / 1_000_000))
        }
        F::TimezoneOffsetOf if t.kind == TemporalKind::DateTime => t
            .offset_minutes
            .map(|m| SystemValue::Decimal(Decimal::from(m) / Decimal::from(60))),
        F::DateOf if !is_time => Some(SystemValue::Date(t.with_kind(TemporalKind::Date))),
        F::TimeOf if t.kind == TemporalKind::DateTime && t.precision >= Precision::Hour => {
            let mut r = *t;
            r.kind = TemporalKind::Time;
            r.offset_minutes = None;
            Some(SystemValue::Time(r))
        }
        _ => None,
    }
}

fn temporal_digits(t: &Temporal) -> usize {
    let date = match t.precision {
        Precision::Year => 4,
        Precision::Month => 6,
        _ => 8,
    };
    let time = match t.precision {
        Precision::Year | Precision::Month | Precision::Day => 0,
        Precision::Hour => 2,
        Precision::Minute => 4,
        Precision::Second => 6,
        Precision::Millisecond => 9,
    };
    match t.kind {
        TemporalKind::Time => time,
        _ => date + time,
    }
}

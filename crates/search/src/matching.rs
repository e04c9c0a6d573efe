//! The meaning of every search value against indexed values, evaluated in memory. The SQL
//! translation in the store implements the same comparisons; tests hold the two together.

use crate::extract::IndexValue;
use crate::query::{Prefix, StringMatch, Value};
use crate::values::Decimal;

/// Date comparison of a resource range `[rlo, rhi)` with a search range `[plo, phi)`.
pub fn date_matches(prefix: Prefix, rlo: i64, rhi: i64, plo: i64, phi: i64) -> bool {
    match prefix {
        // The search range fully contains the resource range.
        Prefix::Eq => plo <= rlo && rhi <= phi,
        Prefix::Ne => !(plo <= rlo && rhi <= phi),
        Prefix::Gt => rhi > phi,
        Prefix::Lt => rlo < plo,
        Prefix::Ge => rhi > plo,
        Prefix::Le => rlo < phi,
        Prefix::Sa => rlo >= phi,
        Prefix::Eb => rhi <= plo,
        // Approximately: the ranges overlap.
        Prefix::Ap => rlo < phi && rhi > plo,
    }
}

/// Number comparison of a resource value with a search decimal (its precision gives `eq` a range).
pub fn number_matches(prefix: Prefix, v: f64, p: &Decimal) -> bool {
    match prefix {
        Prefix::Eq => p.lo <= v && v < p.hi,
        Prefix::Ne => !(p.lo <= v && v < p.hi),
        Prefix::Gt | Prefix::Sa => v > p.value,
        Prefix::Lt | Prefix::Eb => v < p.value,
        Prefix::Ge => v >= p.value,
        Prefix::Le => v <= p.value,
        Prefix::Ap => {
            let (low, high) = store::plan::ap_range(p.value, p.lo, p.hi);
            low <= v && v <= high
        }
    }
}

fn token_matches(
    system: &Option<String>,
    code: &Option<String>,
    es: &Option<String>,
    ec: &Option<String>,
) -> bool {
    let sys_ok = match system.as_deref() {
        None => true,
        Some("") => es.is_none(),
        Some(s) => es.as_deref() == Some(s),
    };
    let code_ok = match code {
        None => true,
        Some(c) => ec.as_deref() == Some(c.as_str()),
    };
    sys_ok && code_ok
}

/// Whether one indexed value satisfies one search value.
pub fn value_matches(v: &Value, e: &IndexValue) -> bool {
    match (v, e) {
        (
            Value::Token { system, code },
            IndexValue::Token {
                system: es,
                code: ec,
            },
        ) => token_matches(system, code, es, ec),
        (Value::TokenText(t), IndexValue::TokenText(et)) => et.starts_with(t.as_str()),
        (Value::String { value, mode }, IndexValue::String { normalized, exact }) => match mode {
            StringMatch::Prefix => normalized.starts_with(value.as_str()),
            StringMatch::Contains => normalized.contains(value.as_str()),
            StringMatch::Exact => exact == value,
        },
        (Value::Date { prefix, range }, IndexValue::Date { lo, hi }) => {
            date_matches(*prefix, *lo, *hi, range.lo, range.hi)
        }
        (Value::Number { prefix, value }, IndexValue::Number(n)) => {
            number_matches(*prefix, *n, value)
        }
        (
            Value::Quantity {
                prefix,
                value,
                system,
                code,
            },
            IndexValue::Quantity {
                value: n,
                system: es,
                code: ec,
                unit,
            },
        ) => {
            let sys_ok = system.is_none() || system == es;
            // Without a system the code may also name the unit as written.
            let code_ok = match code {
                None => true,
                Some(c) => ec.as_ref() == Some(c) || (system.is_none() && unit.as_ref() == Some(c)),
            };
            sys_ok && code_ok && number_matches(*prefix, *n, value)
        }
        (
            Value::Reference { target_type, id },
            IndexValue::Reference {
                target_type: et,
                id: eid,
            },
        ) => eid == id && target_type.as_ref().is_none_or(|t| t == et),
        (Value::ReferenceUrl(u), IndexValue::ReferenceUrl(eu)) => u == eu,
        (
            Value::ReferenceIdentifier { system, code },
            IndexValue::ReferenceIdentifier {
                system: es,
                value: ev,
            },
        ) => token_matches(system, code, es, ev),
        (Value::Uri(u), IndexValue::Uri(eu)) => u == eu,
        (Value::Uri(u), IndexValue::ReferenceUrl(eu)) => u == eu,
        _ => false,
    }
}

/// Whether a parameter's indexed values satisfy an OR list (negated for `:not`).
pub fn param_matches(values: &[Value], negate: bool, entries: &[&IndexValue]) -> bool {
    let any = values
        .iter()
        .any(|v| entries.iter().any(|e| value_matches(v, e)));
    any != negate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::parse_date_range;

    /// Review: `ap` of a number whose precision range overflows (`ap` of `f64::MAX`: its `hi` is
    /// +∞) had an infinite tolerance and matched every number, negative ones included.
    #[test]
    fn ap_near_the_largest_number_matches_only_numbers_near_it() {
        let near_max = crate::values::parse_decimal("1.7976931348623157e308").unwrap();
        assert!(near_max.hi.is_infinite());
        for v in [1.79e308, 1.65e308, f64::MAX] {
            assert!(number_matches(Prefix::Ap, v, &near_max), "{v}");
        }
        for v in [0.0, -5.0, -f64::MAX, 1e300, 1.5e308] {
            assert!(!number_matches(Prefix::Ap, v, &near_max), "{v}");
        }
        let neg = crate::values::parse_decimal("-1.7976931348623157e308").unwrap();
        assert!(neg.lo.is_infinite());
        assert!(number_matches(Prefix::Ap, -1.7e308, &neg));
        assert!(!number_matches(Prefix::Ap, 0.0, &neg));
        // Ordinary values keep their 10 % (`ap100` reaches 90..=110).
        let hundred = crate::values::parse_decimal("100").unwrap();
        assert!(number_matches(Prefix::Ap, 110.0, &hundred));
        assert!(!number_matches(Prefix::Ap, 110.5, &hundred));
    }

    #[test]
    fn date_prefixes() {
        let day = parse_date_range("2020-06-15").unwrap();
        let inst = parse_date_range("2020-06-15T12:00:00Z").unwrap();
        let year = parse_date_range("2020").unwrap();
        assert!(date_matches(Prefix::Eq, inst.lo, inst.hi, day.lo, day.hi));
        assert!(!date_matches(Prefix::Eq, year.lo, year.hi, day.lo, day.hi));
        assert!(date_matches(Prefix::Ge, inst.lo, inst.hi, day.lo, day.hi));
        assert!(!date_matches(Prefix::Gt, inst.lo, inst.hi, day.lo, day.hi));
        assert!(date_matches(Prefix::Lt, day.lo, day.hi, inst.lo, inst.hi));
        assert!(date_matches(
            Prefix::Sa,
            inst.lo,
            inst.hi,
            parse_date_range("2019").unwrap().lo,
            parse_date_range("2019").unwrap().hi
        ));
    }

    #[test]
    fn tokens_respect_system_forms() {
        let e = IndexValue::Token {
            system: Some("s".into()),
            code: Some("c".into()),
        };
        let t = |s: Option<&str>, c: Option<&str>| Value::Token {
            system: s.map(Into::into),
            code: c.map(Into::into),
        };
        assert!(value_matches(&t(None, Some("c")), &e));
        assert!(value_matches(&t(Some("s"), Some("c")), &e));
        assert!(value_matches(&t(Some("s"), None), &e));
        assert!(!value_matches(&t(Some(""), Some("c")), &e));
        assert!(!value_matches(&t(Some("x"), Some("c")), &e));
    }
}

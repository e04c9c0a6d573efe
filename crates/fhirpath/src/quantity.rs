//! Quantities: a decimal value with a UCUM unit or a calendar-duration keyword, and unit conversion
//! for the common UCUM units.

use std::cmp::Ordering;
use std::fmt;

use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};

/// A FHIRPath Quantity. `unit` is a UCUM code (`'mg'`, `'1'`) or a calendar keyword in the singular
/// (`year`, `month`, `week`, `day`, `hour`, `minute`, `second`, `millisecond`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Quantity {
    pub value: Decimal,
    pub unit: String,
}

/// Calendar keywords, singular and plural, to their singular form.
pub fn calendar_unit(word: &str) -> Option<&'static str> {
    Some(match word {
        "year" | "years" => "year",
        "month" | "months" => "month",
        "week" | "weeks" => "week",
        "day" | "days" => "day",
        "hour" | "hours" => "hour",
        "minute" | "minutes" => "minute",
        "second" | "seconds" => "second",
        "millisecond" | "milliseconds" => "millisecond",
        _ => return None,
    })
}

pub fn is_calendar(unit: &str) -> bool {
    calendar_unit(unit) == Some(unit)
}

/// The calendar keyword a definite UCUM time unit corresponds to, for date arithmetic.
pub fn ucum_to_calendar(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "wk" => "week",
        "d" => "day",
        "h" => "hour",
        "min" => "minute",
        "s" => "second",
        "ms" => "millisecond",
        _ => return None,
    })
}

/// Dimension exponents: m, s, g, mol, K, A, cd, and a separate "calendar month" axis so that
/// calendar years/months compare only with each other.
type Dims = [i8; 9];

/// A unit reduced to a factor (relative to the base units) and dimensions.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reduced {
    factor: f64,
    dims: Dims,
}

const NONE: Dims = [0; 9];

fn atom(name: &str) -> Option<(f64, Dims, bool)> {
    // (factor, dims, metric: accepts prefixes)
    let d = |i: usize| {
        let mut x = NONE;
        x[i] = 1;
        x
    };
    Some(match name {
        "m" => (1.0, d(0), true),
        "s" => (1.0, d(1), true),
        "g" => (1.0, d(2), true),
        "mol" => (1.0, d(3), true),
        "K" => (1.0, d(4), true),
        "A" => (1.0, d(5), true),
        "cd" => (1.0, d(6), true),
        "L" | "l" => (1e-3, [3, 0, 0, 0, 0, 0, 0, 0, 0], true),
        "min" => (60.0, d(1), false),
        "h" => (3600.0, d(1), false),
        "d" => (86400.0, d(1), false),
        "wk" => (604800.0, d(1), false),
        "mo" => (2629800.0, d(1), false),
        "a" => (31557600.0, d(1), false),
        "[in_i]" => (0.0254, d(0), false),
        "[ft_i]" => (0.3048, d(0), false),
        "[yd_i]" => (0.9144, d(0), false),
        "[mi_i]" => (1609.344, d(0), false),
        "[lb_av]" => (453.59237, d(2), false),
        "[oz_av]" => (28.349523125, d(2), false),
        "Pa" => (1000.0, [-1, -2, 1, 0, 0, 0, 0, 0, 0], true),
        "bar" => (1e8, [-1, -2, 1, 0, 0, 0, 0, 0, 0], true),
        "mm[Hg]" => (133322.387415, [-1, -2, 1, 0, 0, 0, 0, 0, 0], false),
        "N" => (1000.0, [1, -2, 1, 0, 0, 0, 0, 0, 0], true),
        "J" => (1000.0, [2, -2, 1, 0, 0, 0, 0, 0, 0], true),
        "cal" => (4184.0, [2, -2, 1, 0, 0, 0, 0, 0, 0], true),
        "W" => (1000.0, [2, -3, 1, 0, 0, 0, 0, 0, 0], true),
        "Hz" => (1.0, [0, -1, 0, 0, 0, 0, 0, 0, 0], true),
        "eq" => (1.0, d(3), true),
        "U" => (1.0e-6 / 60.0, [0, -1, 0, 1, 0, 0, 0, 0, 0], true),
        "[IU]" | "[iU]" => (1.0, d(8), true),
        "%" => (0.01, NONE, false),
        "[ppm]" => (1e-6, NONE, false),
        "10*3" => (1e3, NONE, false),
        "10*6" => (1e6, NONE, false),
        "10*9" => (1e9, NONE, false),
        "10*12" => (1e12, NONE, false),
        "1" => (1.0, NONE, false),
        _ => return None,
    })
}

fn prefix(p: &str) -> Option<f64> {
    Some(match p {
        "Y" => 1e24,
        "Z" => 1e21,
        "E" => 1e18,
        "P" => 1e15,
        "T" => 1e12,
        "G" => 1e9,
        "M" => 1e6,
        "k" => 1e3,
        "h" => 1e2,
        "da" => 1e1,
        "d" => 1e-1,
        "c" => 1e-2,
        "m" => 1e-3,
        "u" => 1e-6,
        "n" => 1e-9,
        "p" => 1e-12,
        "f" => 1e-15,
        _ => return None,
    })
}

/// One UCUM component such as `mg`, `m2`, `10*3`, `{beats}`, `[in_i]`.
fn component(c: &str) -> Option<Reduced> {
    if c.starts_with('{') && c.ends_with('}') {
        return Some(Reduced {
            factor: 1.0,
            dims: NONE,
        });
    }
    // Strip a trailing annotation: `mL{total}`.
    let c = match c.find('{') {
        Some(i) if c.ends_with('}') => &c[..i],
        _ => c,
    };
    if let Some((f, dims, _)) = atom(c) {
        return Some(Reduced { factor: f, dims });
    }
    // A pure number (`1000`).
    if c.bytes().all(|b| b.is_ascii_digit()) && !c.is_empty() {
        return Some(Reduced {
            factor: c.parse::<f64>().ok()?,
            dims: NONE,
        });
    }
    // Exponent: trailing digits possibly with sign, e.g. `m2`, `s-1`.
    let digits_start = c
        .char_indices()
        .rev()
        .take_while(|(_, ch)| ch.is_ascii_digit())
        .last()
        .map(|(i, _)| i);
    let (base, exp) = match digits_start {
        Some(i) if i > 0 && !c.ends_with(']') => {
            let mut i = i;
            if c.as_bytes()[i - 1] == b'-' || c.as_bytes()[i - 1] == b'+' {
                i -= 1;
            }
            (&c[..i], c[i..].parse::<i32>().ok()?)
        }
        _ => (c, 1),
    };
    let base_unit = if let Some((f, dims, _)) = atom(base) {
        Reduced { factor: f, dims }
    } else {
        let mut found = None;
        for plen in [1usize, 2] {
            if base.len() > plen && base.is_char_boundary(plen) {
                let (p, rest) = base.split_at(plen);
                if let (Some(pf), Some((f, dims, true))) = (prefix(p), atom(rest)) {
                    found = Some(Reduced {
                        factor: pf * f,
                        dims,
                    });
                    break;
                }
            }
        }
        found?
    };
    let mut dims = base_unit.dims;
    for d in &mut dims {
        *d = (*d as i32 * exp) as i8;
    }
    Some(Reduced {
        factor: base_unit.factor.powi(exp),
        dims,
    })
}

/// Reduces a UCUM expression (`mg/dL`, `kg.m-2`, `/min`) or a calendar keyword.
fn reduce(unit: &str) -> Option<Reduced> {
    match unit {
        "year" => {
            let mut d = NONE;
            d[7] = 1;
            return Some(Reduced {
                factor: 12.0,
                dims: d,
            });
        }
        "month" => {
            let mut d = NONE;
            d[7] = 1;
            return Some(Reduced {
                factor: 1.0,
                dims: d,
            });
        }
        _ => {}
    }
    if let Some(c) = calendar_unit(unit).filter(|c| *c == unit) {
        let ucum = match c {
            "week" => "wk",
            "day" => "d",
            "hour" => "h",
            "minute" => "min",
            "second" => "s",
            _ => "ms",
        };
        return reduce(ucum);
    }
    let mut factor = 1.0;
    let mut dims = NONE;
    let mut rest = unit;
    let mut divide = false;
    if let Some(r) = rest.strip_prefix('/') {
        rest = r;
        divide = true;
    }
    loop {
        // Split at the next '.' or '/' outside brackets/braces.
        let mut depth = 0i32;
        let mut split = None;
        for (i, ch) in rest.char_indices() {
            match ch {
                '[' | '{' | '(' => depth += 1,
                ']' | '}' | ')' => depth -= 1,
                '.' | '/' if depth == 0 => {
                    split = Some((i, ch));
                    break;
                }
                _ => {}
            }
        }
        let (part, next) = match split {
            Some((i, ch)) => (&rest[..i], Some((ch, &rest[i + 1..]))),
            None => (rest, None),
        };
        let r = component(part)?;
        if divide {
            factor /= r.factor;
            for (d, x) in dims.iter_mut().zip(r.dims) {
                *d -= x;
            }
        } else {
            factor *= r.factor;
            for (d, x) in dims.iter_mut().zip(r.dims) {
                *d += x;
            }
        }
        match next {
            Some((ch, r)) => {
                divide = ch == '/';
                rest = r;
            }
            None => break,
        }
    }
    Some(Reduced { factor, dims })
}

impl Quantity {
    pub fn new(value: Decimal, unit: impl Into<String>) -> Self {
        Quantity {
            value,
            unit: unit.into(),
        }
    }

    /// This quantity expressed in `unit`, when the units are commensurable.
    pub fn convert_to(&self, unit: &str) -> Option<Quantity> {
        if self.unit == unit {
            return Some(self.clone());
        }
        let from = reduce(&self.unit)?;
        let to = reduce(unit)?;
        if from.dims != to.dims {
            return None;
        }
        let ratio = from.factor / to.factor;
        let value = if (ratio - ratio.round()).abs() < 1e-12 && ratio.abs() < 1e15 {
            self.value
                .checked_mul(Decimal::from_i64(ratio.round() as i64)?)?
        } else {
            let inverse = to.factor / from.factor;
            if (inverse - inverse.round()).abs() < 1e-9 && inverse.abs() >= 1.0 {
                self.value
                    .checked_div(Decimal::from_i64(inverse.round() as i64)?)?
            } else {
                Decimal::from_f64(self.value.to_f64()? * ratio)?
            }
        };
        Some(Quantity::new(value, unit))
    }

    /// Compares after converting `other` into this unit; `None` when not commensurable.
    pub fn compare(&self, other: &Quantity) -> Option<Ordering> {
        let o = other.convert_to(&self.unit)?;
        Some(self.value.cmp(&o.value))
    }

    /// Multiplies or divides the units (for `*` and `/`).
    pub fn combine_unit(a: &str, b: &str, divide: bool) -> String {
        let a = if a == "1" { "" } else { a };
        let b = if b == "1" { "" } else { b };
        match (a.is_empty(), b.is_empty(), divide) {
            (true, true, _) => "1".to_string(),
            (false, true, _) => a.to_string(),
            (true, false, false) => b.to_string(),
            (true, false, true) => format!("/{b}"),
            (false, false, false) => format!("{a}.{b}"),
            (false, false, true) => format!("{a}/{b}"),
        }
    }

    /// The dimensionless factor of `a / b` when the units are commensurable (`g/mg` = 1000).
    pub fn unit_ratio(a: &str, b: &str) -> Option<f64> {
        let x = reduce(a)?;
        let y = reduce(b)?;
        (x.dims == y.dims).then(|| x.factor / y.factor)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_calendar(&self.unit) {
            write!(f, "{} {}", self.value, self.unit)
        } else {
            write!(f, "{} '{}'", self.value, self.unit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: &str, u: &str) -> Quantity {
        Quantity::new(v.parse().unwrap(), u)
    }

    #[test]
    fn conversions() {
        assert_eq!(
            q("1", "g").convert_to("mg").unwrap().value,
            Decimal::from(1000)
        );
        assert_eq!(
            q("1000", "mg").convert_to("g").unwrap().value,
            Decimal::from(1)
        );
        assert_eq!(
            q("7", "day").compare(&q("1", "week")),
            Some(Ordering::Equal)
        );
        assert_eq!(q("1", "wk").compare(&q("7", "d")), Some(Ordering::Equal));
        assert_eq!(q("1", "year").compare(&q("1", "a")), None);
        assert_eq!(
            q("1", "year").compare(&q("12", "month")),
            Some(Ordering::Equal)
        );
        assert_eq!(
            q("1", "mg/dL").convert_to("g/L").unwrap().value,
            "0.01".parse::<Decimal>().unwrap()
        );
        assert_eq!(
            q("1", "m2").convert_to("cm2").unwrap().value,
            Decimal::from(10000)
        );
        assert!(q("1", "kg").compare(&q("1", "m")).is_none());
    }
}

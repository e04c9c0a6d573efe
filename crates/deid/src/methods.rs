//! The de-identification methods (§2) on one node's value — redact, dateShift, cryptoHash,
//! encrypt, perturb, substitute (on a primitive), generalize, keep — and the security label each
//! leaves (§3.6). Both walkers call these: the rule-by-rule walker (engine.rs) and the compiled
//! plan's walks over the tree and over the bytes (plan.rs, plan/stream.rs); which node a method
//! applies to, and what an earlier rule already processed, is theirs to decide.
//!
//! Depends on `config`, `error` and `transforms` only (the string- and number-level work).

use chrono::NaiveDate;
use fhirpath::{EvalContext, NodePath};
use serde_json::{Map, Value as Json};

use crate::config::{Method, Parameters, Rule};
use crate::error::{DeidError, rule_err};
use crate::transforms::{self, NumberKind, Shifted};

/// Operation bits recorded per resource; their order is the label order (§3.6).
pub(crate) const REDACT: u8 = 1;
pub(crate) const ABSTRACT: u8 = 2;
pub(crate) const CRYPTOHASH: u8 = 4;
pub(crate) const ENCRYPT: u8 = 8;
pub(crate) const PERTURB: u8 = 16;
pub(crate) const SUBSTITUTE: u8 = 32;
pub(crate) const GENERALIZE: u8 = 64;

/// The code system of the REDACTED, ABSTRED, CRYTOHASH and MASKED labels.
pub(crate) const V3: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
const LABELS: [(u8, &str, Option<&str>, &str); 7] = [
    (REDACT, "REDACTED", Some(V3), "redacted"),
    (ABSTRACT, "ABSTRED", Some(V3), "abstracted"),
    // The reference spells the code CRYTOHASH (QUIRKS.md).
    (
        CRYPTOHASH,
        "CRYTOHASH",
        Some(V3),
        "cryptographic hash function",
    ),
    (ENCRYPT, "MASKED", Some(V3), "masked"),
    (
        PERTURB,
        "PERTURBED",
        None,
        "exact value is replaced with another exact value",
    ),
    (
        SUBSTITUTE,
        "SUBSTITUTED",
        None,
        "exact value is replaced with a predefined value",
    ),
    (
        GENERALIZE,
        "GENERALIZED",
        None,
        "exact value is replaced with a general value",
    ),
];

/// What a method does to one value.
pub(crate) enum Change {
    /// Left as it is (the operation still counts for the labels).
    Keep,
    Set(Json),
    /// Removed (an array slot becomes null).
    Remove,
}

/// A primitive value's text as the reference's methods read it.
pub(crate) fn primitive_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        // .NET bool.ToString()
        Json::Bool(b) => Some(if *b { "True" } else { "False" }.into()),
        _ => None,
    }
}

/// The change a redact, dateShift, cryptoHash or encrypt rule makes to one non-empty primitive
/// value (§2), with the operation bit for the labels; `None` for any other method or a value the
/// method leaves alone. `parent` gives the FHIR type of the element holding the value (`Age`,
/// `Reference`), `offset` the date-shift offset from the prefix and key (§2.3); both are only
/// asked for when needed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn primitive_change(
    rule: &Rule,
    params: &Parameters,
    text: &str,
    ty: &str,
    name: &str,
    parent: &dyn Fn() -> String,
    offset: &dyn Fn() -> i64,
    today: NaiveDate,
) -> Result<Option<(Change, u8)>, DeidError> {
    if text.is_empty() {
        return Ok(None);
    }
    let is_date = ty == "date" || ty == "dateTime" || ty == "instant";
    Ok(Some(match &rule.method {
        Method::Redact => {
            if is_date {
                match transforms::redact_date(
                    text,
                    ty == "date",
                    params.enable_partial_dates_for_redact,
                    today,
                ) {
                    Some(y) => (Change::Set(Json::String(y)), REDACT),
                    None => (Change::Remove, REDACT),
                }
            } else if ty == "decimal" && name == "value" && parent() == "Age" {
                if params.enable_partial_ages_for_redact {
                    // int.Parse in the reference: a non-integral text is a hard failure. The
                    // message leaves the age out: it reaches error files and job status.
                    let age: i64 = text
                        .parse()
                        .map_err(|_| rule_err(rule, "an Age value is not an integer".into()))?;
                    if age <= 89 {
                        return Ok(Some((Change::Keep, REDACT)));
                    }
                }
                (Change::Remove, REDACT)
            } else if name.eq_ignore_ascii_case("postalCode") {
                if params.enable_partial_zip_codes_for_redact {
                    let z = transforms::redact_postal_code(
                        text,
                        &params.restricted_zip_code_tabulation_areas,
                    );
                    (Change::Set(Json::String(z)), ABSTRACT)
                } else {
                    (Change::Remove, REDACT)
                }
            } else {
                (Change::Remove, REDACT)
            }
        }
        Method::DateShift => {
            if !is_date {
                return Ok(None);
            }
            let offset = match params.date_shift_fixed_offset_in_days {
                Some(d) => d,
                None => offset(),
            };
            match transforms::shift_date(
                text,
                ty == "date",
                offset,
                params.enable_partial_dates_for_redact,
                today,
            ) {
                Shifted::Value(v) => (Change::Set(Json::String(v)), PERTURB),
                Shifted::Redacted(Some(v)) => (Change::Set(Json::String(v)), REDACT),
                Shifted::Redacted(None) => (Change::Remove, REDACT),
                Shifted::Unchanged => return Ok(None),
                Shifted::OutOfRange => {
                    return Err(rule_err(
                        rule,
                        "the shifted date falls outside years 0001 to 9999".to_string(),
                    ));
                }
            }
        }
        Method::CryptoHash => {
            let key = &params.crypto_hash_key;
            let out = if name == "reference" && parent() == "Reference" {
                transforms::hash_reference(key, text)
            } else {
                transforms::crypto_hash(key, text)
            };
            (Change::Set(Json::String(out)), CRYPTOHASH)
        }
        Method::Encrypt => {
            let out = transforms::encrypt(&params.encrypt_key, text)
                .map_err(|e| rule_err(rule, e.to_string()))?;
            (Change::Set(Json::String(out)), ENCRYPT)
        }
        _ => return Ok(None),
    }))
}

/// Where `perturb` applies on a node of a FHIR type (§2.5).
#[derive(Debug, Clone, Copy)]
pub(crate) enum PerturbTarget {
    /// The node's own number.
    Number(NumberKind),
    /// A quantity's `value` (a decimal); the quantity is sealed either way.
    QuantityValue,
}

/// Where `perturb` applies on a node of type `ty`; `None`: it leaves the node alone (unsealed).
pub(crate) fn perturb_target(ty: &str) -> Option<PerturbTarget> {
    Some(match ty {
        "decimal" => PerturbTarget::Number(NumberKind::Decimal),
        "integer" => PerturbTarget::Number(NumberKind::Integer),
        "positiveInt" => PerturbTarget::Number(NumberKind::PositiveInt),
        "unsignedInt" => PerturbTarget::Number(NumberKind::UnsignedInt),
        "Age" | "Count" | "Duration" | "Distance" | "Money" | "Quantity" | "SimpleQuantity"
        | "MoneyQuantity" => PerturbTarget::QuantityValue,
        _ => return None,
    })
}

impl PerturbTarget {
    /// The kind of the number perturbed.
    pub(crate) fn kind(self) -> NumberKind {
        match self {
            PerturbTarget::Number(k) => k,
            PerturbTarget::QuantityValue => NumberKind::Decimal,
        }
    }
}

/// `perturb` of rule `rule` (a perturb rule) on a number's text: the new number (label bit
/// [`PERTURB`]).
pub(crate) fn perturb(rule: &Rule, text: &str, kind: NumberKind) -> Result<Json, DeidError> {
    let Method::Perturb {
        span,
        proportional,
        round_to,
    } = &rule.method
    else {
        return Err(rule_err(rule, "not a perturb rule".into()));
    };
    let out = transforms::perturb(
        text,
        kind,
        *span,
        *proportional,
        *round_to,
        rand::random::<f64>(),
    )
    .map_err(|e| rule_err(rule, e.to_string()))?;
    let num: serde_json::Number = out
        .to_string()
        .parse()
        .map_err(|_| rule_err(rule, "the perturbed value is not a JSON number".into()))?;
    Ok(Json::Number(num))
}

/// `substitute` on a primitive value (§2.6; label bit [`SUBSTITUTE`]): `replaceWith` as text,
/// or the value removed for a `null` replacement.
pub(crate) fn substitute_primitive(with: &Json) -> Change {
    match with {
        Json::Null => Change::Remove,
        v => {
            let s = primitive_text(v)
                .unwrap_or_else(|| serde_json::to_string_pretty(v).unwrap_or_default());
            Change::Set(Json::String(s))
        }
    }
}

/// `generalize` (§2.7; label bit [`GENERALIZE`]) of rule `rule` on the primitive node at `path`
/// of `root`: the first case whose condition holds gives the value (none: removed), or no case
/// holds and the value is kept or removed. Evaluation failures are [`DeidError::Processing`].
pub(crate) fn generalize(
    rule: &Rule,
    cases: &[(fhirpath::Expression, fhirpath::Expression)],
    keep_other_values: bool,
    root: &Json,
    path: &NodePath,
) -> Result<Change, DeidError> {
    let proc_err = |m: String| DeidError::Processing {
        rule: rule.index,
        path: rule.path.clone(),
        message: format!("Generalize failed when processing {path}: {m}"),
    };
    let ctx = EvalContext::new(root)
        .with_focus_path(path)
        .map_err(|e| proc_err(e.to_string()))?;
    for (cond, val) in cases {
        // Firely's Predicate(): empty counts as true.
        let hit = cond
            .evaluate_bool(&ctx)
            .map_err(|e| proc_err(e.to_string()))?
            .unwrap_or(true);
        if !hit {
            continue;
        }
        let out = val.evaluate(&ctx).map_err(|e| proc_err(e.to_string()))?;
        return match out.as_slice() {
            [] => Ok(Change::Remove),
            [one] => Ok(Change::Set(one.as_json())),
            _ => Err(proc_err("more than one result".into())),
        };
    }
    Ok(if keep_other_values {
        Change::Keep
    } else {
        Change::Remove
    })
}

/// `meta.lastUpdated` after the reference's `Meta` round trip: `Z` → `+00:00`, trailing zero
/// fractions dropped (QUIRKS.md).
pub(crate) fn requote_instant(s: &str) -> String {
    let (body, zone) = if let Some(b) = s.strip_suffix('Z') {
        (b, "+00:00")
    } else if s.len() > 6
        && (s.as_bytes()[s.len() - 6] == b'+' || s.as_bytes()[s.len() - 6] == b'-')
    {
        s.split_at(s.len() - 6)
    } else {
        return s.to_string();
    };
    // Pushed into one string (once per labelled resource: no formatting machinery).
    let mut out = String::with_capacity(s.len() + zone.len());
    match body.split_once('.') {
        Some((main, frac)) => {
            out.push_str(main);
            let f = frac.trim_end_matches('0');
            if !f.is_empty() {
                out.push('.');
                out.push_str(f);
            }
        }
        None => out.push_str(body),
    }
    out.push_str(zone);
    out
}

/// Adds the labels of the operation bits `ops` to a resource's `meta.security` (§3.6), the ones
/// not there yet, in label order; requotes `meta.lastUpdated`.
pub(crate) fn add_labels(obj: &mut Map<String, Json>, ops: u8) {
    let meta = obj
        .entry("meta")
        .or_insert_with(|| Json::Object(Map::new()));
    let Json::Object(meta) = meta else { return };
    if let Some(Json::String(lu)) = meta.get_mut("lastUpdated") {
        *lu = requote_instant(lu);
    }
    let sec = meta
        .entry("security")
        .or_insert_with(|| Json::Array(Vec::new()));
    let Json::Array(sec) = sec else { return };
    for (bit, code, system, display) in LABELS {
        if ops & bit == 0 {
            continue;
        }
        let present = sec.iter().any(|c| {
            c.get("code")
                .and_then(|v| v.as_str())
                .is_some_and(|v| v.eq_ignore_ascii_case(code))
        });
        if present {
            continue;
        }
        sec.push(Json::Object(label_object(system, code, display)));
    }
}

fn label_object(system: Option<&str>, code: &str, display: &str) -> Map<String, Json> {
    let mut c = Map::new();
    if let Some(s) = system {
        c.insert("system".into(), Json::String(s.into()));
    }
    c.insert("code".into(), Json::String(code.into()));
    c.insert("display".into(), Json::String(display.into()));
    c
}

/// The security label of each operation bit, in label order (§3.6), as [`add_labels`] adds it.
pub(crate) fn label_objects() -> Vec<(u8, Map<String, Json>)> {
    LABELS
        .iter()
        .map(|(bit, code, system, display)| (*bit, label_object(*system, code, display)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quirk_last_updated() {
        assert_eq!(
            requote_instant("2020-01-01T10:00:30.000Z"),
            "2020-01-01T10:00:30+00:00"
        );
        assert_eq!(
            requote_instant("2020-01-01T10:00:30.120-05:00"),
            "2020-01-01T10:00:30.12-05:00"
        );
        assert_eq!(
            requote_instant("2020-01-01T10:00:30Z"),
            "2020-01-01T10:00:30+00:00"
        );
        assert_eq!(
            requote_instant("2020-01-01T10:00:30.5+01:00"),
            "2020-01-01T10:00:30.5+01:00"
        );
        assert_eq!(requote_instant("2020-01-01"), "2020-01-01");
    }
}

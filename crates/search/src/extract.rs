//! Conversion of the values a search parameter's FHIRPath expression selects into index values.
//!
//! The same conversion feeds the store's index tables (through [`crate::indexer`]) and the
//! in-memory [`crate::Predicate`], so a database search and an export `_typeFilter` agree.

use fhir_model::SearchParamType;
use serde_json::Value as Json;

use crate::values::{self, MAX_MS, MIN_MS};

/// Index values are the store's: each variant has its own index table.
pub use store::IndexValue;

fn s(v: &Json, key: &str) -> Option<String> {
    get(v, key).and_then(Json::as_str).map(str::to_string)
}

/// `v.get(key)`; small objects are scanned instead of hashing the key (the indexing hot path).
fn get<'a>(v: &'a Json, key: &str) -> Option<&'a Json> {
    crate::evaluate::member(v.as_object()?, key)
}

/// The indexed value of a decimal (a number, or a number written as a string), as the search
/// side reads the same text (`values::index_number`: an underflow is not zero, an overflow is
/// `±f64::MAX`, not infinite).
fn f(v: &Json) -> Option<f64> {
    match v {
        // The text as written (`arbitrary_precision`), not `as_f64`, which gives `None` above
        // the f64 range and 0 below it.
        Json::Number(n) => values::index_number(n.as_str()),
        Json::String(t) => values::index_number(t),
        _ => None,
    }
}

/// Guesses the FHIR type of a JSON value from its shape, for items whose type the evaluator
/// did not report.
fn infer_type(v: &Json) -> &'static str {
    match v {
        Json::Bool(_) => "boolean",
        Json::Number(_) => "decimal",
        Json::String(_) => "string",
        Json::Object(o) => {
            if o.contains_key("coding") || o.contains_key("text") && o.len() == 1 {
                "CodeableConcept"
            } else if o.contains_key("reference")
                || o.contains_key("identifier") && o.contains_key("type")
            {
                "Reference"
            } else if o.contains_key("start") || o.contains_key("end") {
                "Period"
            } else if o.contains_key("family") || o.contains_key("given") {
                "HumanName"
            } else if o.contains_key("line")
                || o.contains_key("city")
                || o.contains_key("postalCode")
            {
                "Address"
            } else if o.contains_key("value")
                && (o.contains_key("unit") || o.contains_key("currency"))
            {
                "Quantity"
            } else if o.contains_key("value") && o.contains_key("system") && !o.contains_key("code")
            {
                "Identifier"
            } else if o.contains_key("code") || o.contains_key("system") {
                "Coding"
            } else {
                ""
            }
        }
        _ => "",
    }
}

/// Converts one selected item (JSON value with its FHIR type name, when known) for a parameter
/// of type `kind`, appending index values to `out`.
pub fn convert(
    kind: SearchParamType,
    type_name: Option<&str>,
    v: &Json,
    out: &mut Vec<IndexValue>,
) {
    let ty = match type_name {
        Some(t) => t.strip_prefix("FHIR.").unwrap_or(t),
        None => infer_type(v),
    };
    match kind {
        SearchParamType::Token => token(ty, v, out),
        SearchParamType::String => string(ty, v, out),
        SearchParamType::Date => date(ty, v, out),
        SearchParamType::Reference => reference(ty, v, out),
        SearchParamType::Quantity => quantity(ty, v, out),
        SearchParamType::Number => {
            if let Some(n) = f(v) {
                out.push(IndexValue::Number(n));
            }
        }
        SearchParamType::Uri => {
            if let Some(t) = v.as_str() {
                out.push(IndexValue::Uri(t.to_string()));
            }
        }
        SearchParamType::Composite | SearchParamType::Special => {}
    }
}

fn push_text(text: Option<&str>, out: &mut Vec<IndexValue>) {
    if let Some(t) = text.filter(|t| !t.is_empty()) {
        out.push(IndexValue::TokenText(values::normalize_string(t)));
    }
}

fn coding(c: &Json, out: &mut Vec<IndexValue>) {
    let system = s(c, "system");
    let code = s(c, "code");
    if system.is_some() || code.is_some() {
        out.push(IndexValue::Token { system, code });
    }
    push_text(get(c, "display").and_then(Json::as_str), out);
}

fn token(ty: &str, v: &Json, out: &mut Vec<IndexValue>) {
    match (ty, v) {
        (_, Json::Bool(b)) => out.push(IndexValue::Token {
            system: None,
            code: Some(b.to_string()),
        }),
        (_, Json::String(t)) => out.push(IndexValue::Token {
            system: None,
            code: Some(t.clone()),
        }),
        ("CodeableConcept", _) => {
            for c in get(v, "coding")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                coding(c, out);
            }
            push_text(get(v, "text").and_then(Json::as_str), out);
        }
        ("Coding", _) => coding(v, out),
        ("Identifier", _) => {
            let system = s(v, "system");
            let code = s(v, "value");
            if system.is_some() || code.is_some() {
                out.push(IndexValue::Token { system, code });
            }
            push_text(
                get(v, "type")
                    .and_then(|t| get(t, "text"))
                    .and_then(Json::as_str),
                out,
            );
        }
        ("ContactPoint", _) => {
            if let Some(val) = s(v, "value") {
                out.push(IndexValue::Token {
                    system: None,
                    code: Some(val),
                });
            }
        }
        ("Quantity" | "Age" | "Duration" | "Distance" | "Count", _) => {
            if let Some(code) = s(v, "code") {
                out.push(IndexValue::Token {
                    system: s(v, "system"),
                    code: Some(code),
                });
            }
        }
        _ => {}
    }
}

fn push_string(t: &str, out: &mut Vec<IndexValue>) {
    if t.is_empty() {
        return;
    }
    out.push(IndexValue::String {
        normalized: values::normalize_string(t),
        exact: t.to_string(),
    });
}

fn string(ty: &str, v: &Json, out: &mut Vec<IndexValue>) {
    let parts: &[&str] = match (ty, v) {
        (_, Json::String(t)) => {
            push_string(t, out);
            return;
        }
        ("HumanName", _) => &["text", "family", "given", "prefix", "suffix"],
        ("Address", _) => &[
            "text",
            "line",
            "city",
            "district",
            "state",
            "postalCode",
            "country",
        ],
        _ => return,
    };
    for key in parts {
        match get(v, key) {
            Some(Json::String(t)) => push_string(t, out),
            Some(Json::Array(a)) => a
                .iter()
                .filter_map(Json::as_str)
                .for_each(|t| push_string(t, out)),
            _ => {}
        }
    }
}

fn range_of(v: Option<&Json>) -> Option<values::DateRange> {
    v.and_then(Json::as_str)
        .and_then(|t| values::parse_date_range(t).ok())
}

fn date(ty: &str, v: &Json, out: &mut Vec<IndexValue>) {
    match (ty, v) {
        (_, Json::String(t)) => {
            if let Ok(r) = values::parse_date_range(t) {
                out.push(IndexValue::Date { lo: r.lo, hi: r.hi });
            }
        }
        ("Period", _) => {
            let start = range_of(get(v, "start"));
            let end = range_of(get(v, "end"));
            if start.is_none() && end.is_none() {
                return;
            }
            out.push(IndexValue::Date {
                lo: start.map_or(MIN_MS, |r| r.lo),
                hi: end.map_or(MAX_MS, |r| r.hi),
            });
        }
        ("Timing", _) => {
            let events: Vec<values::DateRange> = get(v, "event")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str().and_then(|t| values::parse_date_range(t).ok()))
                .collect();
            if let (Some(lo), Some(hi)) = (
                events.iter().map(|r| r.lo).min(),
                events.iter().map(|r| r.hi).max(),
            ) {
                out.push(IndexValue::Date { lo, hi });
            } else if let Some(b) = get(v, "repeat").and_then(|r| get(r, "boundsPeriod")) {
                date("Period", b, out);
            }
        }
        _ => {}
    }
}

/// Splits a reference string into a typed relative reference when it has the `Type/id` shape.
pub fn split_reference(r: &str) -> Option<(&str, &str)> {
    let mut parts = r.split('/');
    let (t, id) = (parts.next()?, parts.next()?);
    match parts.next() {
        None => {}
        Some("_history") => {}
        Some(_) => return None,
    }
    let typed = t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && !id.is_empty()
        && fhir_model::r4()
            .resource_types()
            .binary_search_by(|x| x.as_str().cmp(t))
            .is_ok();
    typed.then_some((t, id))
}

fn reference(ty: &str, v: &Json, out: &mut Vec<IndexValue>) {
    match (ty, v) {
        (_, Json::String(t)) => {
            // canonical / uri used as a reference target
            out.push(IndexValue::ReferenceUrl(t.clone()));
        }
        _ => {
            if let Some(r) = get(v, "reference").and_then(Json::as_str) {
                if r.starts_with('#') {
                    // contained resources are not searchable targets here
                } else if let Some((t, id)) = split_reference(r) {
                    out.push(IndexValue::Reference {
                        target_type: t.to_string(),
                        id: id.to_string(),
                    });
                } else {
                    out.push(IndexValue::ReferenceUrl(r.to_string()));
                }
            }
            if let Some(i) = get(v, "identifier") {
                let system = s(i, "system");
                let value = s(i, "value");
                if system.is_some() || value.is_some() {
                    out.push(IndexValue::ReferenceIdentifier { system, value });
                }
            }
        }
    }
}

fn quantity(ty: &str, v: &Json, out: &mut Vec<IndexValue>) {
    match ty {
        "Money" => {
            if let Some(n) = get(v, "value").and_then(f) {
                out.push(IndexValue::Quantity {
                    value: n,
                    system: Some("urn:iso:std:iso:4217".into()),
                    code: s(v, "currency"),
                    unit: None,
                });
            }
        }
        "Range" => {
            for k in ["low", "high"] {
                if let Some(q) = get(v, k) {
                    quantity("Quantity", q, out);
                }
            }
        }
        "SampledData" => {}
        _ => {
            if let Some(n) = get(v, "value").and_then(f) {
                out.push(IndexValue::Quantity {
                    value: n,
                    system: s(v, "system"),
                    code: s(v, "code"),
                    unit: s(v, "unit"),
                });
            } else if let Some(n) = f(v) {
                out.push(IndexValue::Quantity {
                    value: n,
                    system: None,
                    code: None,
                    unit: None,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(kind: SearchParamType, ty: Option<&str>, v: Json) -> Vec<IndexValue> {
        let mut out = Vec::new();
        convert(kind, ty, &v, &mut out);
        out
    }

    #[test]
    fn tokens() {
        let cc = json!({"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}],"text":"Heart Rate"});
        let out = conv(SearchParamType::Token, Some("CodeableConcept"), cc.clone());
        assert_eq!(
            out[0],
            IndexValue::Token {
                system: Some("http://loinc.org".into()),
                code: Some("8867-4".into())
            }
        );
        assert_eq!(out[1], IndexValue::TokenText("heart rate".into()));
        assert_eq!(conv(SearchParamType::Token, None, cc).len(), 3);
        assert_eq!(
            conv(SearchParamType::Token, Some("boolean"), json!(true)),
            vec![IndexValue::Token {
                system: None,
                code: Some("true".into())
            }]
        );
        let id = json!({"system":"s","value":"v"});
        assert_eq!(
            conv(SearchParamType::Token, Some("Identifier"), id)[0],
            IndexValue::Token {
                system: Some("s".into()),
                code: Some("v".into())
            }
        );
    }

    #[test]
    fn strings_and_dates() {
        let n = json!({"family":"Müller","given":["Anna","Lena"]});
        let out = conv(SearchParamType::String, Some("HumanName"), n);
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[0],
            IndexValue::String {
                normalized: "muller".into(),
                exact: "Müller".into()
            }
        );
        let p = conv(
            SearchParamType::Date,
            Some("Period"),
            json!({"start":"2020-01-01"}),
        );
        assert!(matches!(p[0], IndexValue::Date { hi, .. } if hi == MAX_MS));
    }

    #[test]
    fn references() {
        let out = conv(
            SearchParamType::Reference,
            Some("Reference"),
            json!({"reference":"Patient/123"}),
        );
        assert_eq!(
            out,
            vec![IndexValue::Reference {
                target_type: "Patient".into(),
                id: "123".into()
            }]
        );
        let out = conv(
            SearchParamType::Reference,
            Some("Reference"),
            json!({"reference":"http://x/Patient/1"}),
        );
        assert_eq!(
            out,
            vec![IndexValue::ReferenceUrl("http://x/Patient/1".into())]
        );
    }
}

//! `dateShiftScope: "patient"` (our extension of the reference's scopes): which patient a
//! resource belongs to, from the R4 Patient CompartmentDefinition (fhir-model's table of the
//! search parameters that link each type to a Patient).
//!
//! A resource's patient is the Patient itself, or the one Patient its compartment parameters
//! reference: the parameters are tried in the order `patient`, `subject`, `beneficiary`, then
//! the definition's order, and the first that references any Patient decides — if it references
//! exactly one. A resource referencing several patients through that parameter (a Group's
//! members) has no single patient and falls back to `resource` scope, like a resource outside
//! every compartment (Organization, Medication). Contained resources take their container's
//! patient. Membership is read on the input, before any rule changes references or ids.

use std::sync::LazyLock;

use rustc_hash::FxHashMap;
use serde_json::{Map, Value as Json};

/// Per resource type, the member paths of its compartment parameters, by priority.
static PATHS: LazyLock<FxHashMap<String, Vec<Vec<Vec<String>>>>> = LazyLock::new(|| {
    let model = fhir_model::r4();
    let mut out = FxHashMap::default();
    for ty in model.resource_types() {
        if ty == "Patient" {
            continue;
        }
        let Some(codes) = model.patient_compartment(ty) else {
            continue;
        };
        let mut codes: Vec<&String> = codes.iter().collect();
        let rank = |c: &str| match c {
            "patient" => 0,
            "subject" => 1,
            "beneficiary" => 2,
            _ => 3,
        };
        codes.sort_by_key(|c| rank(c));
        let mut params = Vec::new();
        for code in codes {
            let Some(expr) = model
                .search_param(ty, code)
                .and_then(|p| p.expression.as_deref())
            else {
                continue;
            };
            let paths: Vec<Vec<String>> = expr
                .split('|')
                .filter_map(|alt| member_path(ty, alt.trim()))
                .collect();
            if !paths.is_empty() {
                params.push(paths);
            }
        }
        out.insert(ty.clone(), params);
    }
    out
});

/// `Type.a.b` or `Type.a.b.where(resolve() is Patient)` as member names; `None` for anything
/// else (no R4 compartment expression is anything else).
fn member_path(ty: &str, expr: &str) -> Option<Vec<String>> {
    let expr = expr
        .strip_suffix(".where(resolve() is Patient)")
        .unwrap_or(expr);
    let rest = expr.strip_prefix(ty)?.strip_prefix('.')?;
    let segs: Vec<String> = rest.split('.').map(str::to_string).collect();
    segs.iter()
        .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
        .then_some(segs)
}

/// The Patient id a reference string points at: `Patient/x`, `Patient/x/_history/2`,
/// `https://base/Patient/x`, or a Bundle entry's `fullUrl` that holds a Patient.
fn patient_id(reference: &str, bundle: &FxHashMap<String, String>) -> Option<String> {
    if let Some(id) = bundle.get(reference) {
        return Some(id.clone());
    }
    let segs: Vec<&str> = reference.split('/').collect();
    (0..segs.len().saturating_sub(1))
        .rev()
        .find(|&i| {
            segs[i] == "Patient"
                && !segs[i + 1].is_empty()
                && (i + 2 == segs.len() || segs[i + 2] == "_history")
        })
        .map(|i| segs[i + 1].to_string())
}

fn collect_refs<'a>(v: &'a Json, path: &[String], out: &mut Vec<&'a str>) {
    match v {
        Json::Array(a) => a.iter().for_each(|e| collect_refs(e, path, out)),
        Json::Object(o) => match path.split_first() {
            Some((first, rest)) => {
                if let Some(c) = o.get(first.as_str()) {
                    collect_refs(c, rest, out);
                }
            }
            None => {
                if let Some(Json::String(r)) = o.get("reference") {
                    out.push(r);
                }
            }
        },
        _ => {}
    }
}

/// The patient a resource belongs to (see the module documentation). `bundle` maps the
/// `fullUrl`s of the enclosing Bundle's Patient entries to their ids.
pub(crate) fn patient_of(
    resource: &Map<String, Json>,
    bundle: &FxHashMap<String, String>,
) -> Option<String> {
    let ty = resource.get("resourceType")?.as_str()?;
    if ty == "Patient" {
        return match resource.get("id") {
            Some(Json::String(id)) if !id.is_empty() => Some(id.clone()),
            _ => None,
        };
    }
    for paths in PATHS.get(ty)? {
        let mut refs = Vec::new();
        for p in paths {
            if let Some((first, rest)) = p.split_first()
                && let Some(c) = resource.get(first.as_str())
            {
                collect_refs(c, rest, &mut refs);
            }
        }
        let mut ids: Vec<String> = refs
            .into_iter()
            .filter_map(|r| patient_id(r, bundle))
            .collect();
        ids.sort();
        ids.dedup();
        match ids.len() {
            0 => continue,
            1 => return ids.pop(),
            _ => return None,
        }
    }
    None
}

/// For a Bundle: its Patient entries' `fullUrl` → id, so that `urn:uuid:` references resolve.
pub(crate) fn bundle_patients(root: &Json) -> FxHashMap<String, String> {
    let mut out = FxHashMap::default();
    if root.get("resourceType").and_then(Json::as_str) != Some("Bundle") {
        return out;
    }
    for e in root
        .get("entry")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(Json::String(url)), Some(r)) = (e.get("fullUrl"), e.get("resource")) else {
            continue;
        };
        if r.get("resourceType").and_then(Json::as_str) == Some("Patient")
            && let Some(Json::String(id)) = r.get("id")
        {
            out.insert(url.clone(), id.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of(v: Json) -> Option<String> {
        patient_of(v.as_object().unwrap(), &FxHashMap::default())
    }

    #[test]
    fn patients_of_resources() {
        assert_eq!(
            of(json!({"resourceType": "Patient", "id": "p1"})).as_deref(),
            Some("p1")
        );
        assert_eq!(
            of(json!({"resourceType": "Encounter", "subject": {"reference": "Patient/p1"}}))
                .as_deref(),
            Some("p1")
        );
        // `.where(resolve() is Patient)`: only Patient references count.
        assert_eq!(
            of(json!({"resourceType": "Condition", "subject": {"reference": "Group/g"}})),
            None
        );
        assert_eq!(
            of(json!({"resourceType": "Observation",
                "subject": {"reference": "https://x.org/fhir/Patient/p2/_history/3"},
                "performer": [{"reference": "Patient/other"}]}))
            .as_deref(),
            Some("p2")
        );
        // The beneficiary decides for a Coverage, whoever holds the policy.
        assert_eq!(
            of(
                json!({"resourceType": "Coverage", "beneficiary": {"reference": "Patient/b"},
                "policyHolder": {"reference": "Patient/h"}})
            )
            .as_deref(),
            Some("b")
        );
        // Several patients through one parameter: no single patient.
        assert_eq!(
            of(json!({"resourceType": "Group", "member": [
                {"entity": {"reference": "Patient/a"}}, {"entity": {"reference": "Patient/b"}}]})),
            None
        );
        assert_eq!(of(json!({"resourceType": "Organization", "id": "o"})), None);
        let bundle = json!({"resourceType": "Bundle", "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "p9"}}]});
        let urls = bundle_patients(&bundle);
        let enc = json!({"resourceType": "Encounter", "subject": {"reference": "urn:uuid:1"}});
        assert_eq!(
            patient_of(enc.as_object().unwrap(), &urls).as_deref(),
            Some("p9")
        );
    }
}

//! `_elements`: keep only the named top-level elements of a resource (plus `resourceType`, `id`,
//! `meta` and the type's mandatory elements) and tag the result `SUBSETTED`.

use serde_json::{Map, Value as Json, json};

const SUBSETTED: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Returns the subset of `resource` that `_elements` asks for.
pub fn apply_elements(resource: &Json, elements: &[String]) -> Json {
    let Some(obj) = resource.as_object() else {
        return resource.clone();
    };
    let ty = obj
        .get("resourceType")
        .and_then(Json::as_str)
        .unwrap_or_default();
    let model = fhir_model::r4();
    let mandatory = |key: &str| {
        let name = key.trim_start_matches('_');
        model
            .type_def(ty)
            .and_then(|t| {
                t.elements
                    .iter()
                    .find(|e| name == e.name || (e.choice && name.starts_with(e.name.as_str())))
            })
            .is_some_and(|e| e.min > 0)
    };
    let wanted = |key: &str| {
        let name = key.trim_start_matches('_');
        matches!(name, "resourceType" | "id" | "meta")
            || mandatory(key)
            || elements.iter().any(|e| {
                e == name
                    // choice elements: `_elements=value` keeps `valueQuantity`
                    || (name.starts_with(e.as_str())
                        && name[e.len()..].starts_with(|c: char| c.is_ascii_uppercase())
                        && model.element(ty, e).is_some_and(|d| d.choice))
            })
    };
    let mut out = Map::new();
    for (k, v) in obj {
        if wanted(k) {
            out.insert(k.clone(), v.clone());
        }
    }
    let meta = out.entry("meta").or_insert_with(|| json!({}));
    if let Some(m) = meta.as_object_mut() {
        let tags = m.entry("tag").or_insert_with(|| json!([]));
        if let Some(a) = tags.as_array_mut() {
            a.push(json!({"system": SUBSETTED, "code": "SUBSETTED"}));
        }
    }
    Json::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_requested_and_mandatory() {
        let obs = json!({"resourceType":"Observation","id":"1","status":"final","code":{"text":"x"},
            "valueQuantity":{"value":1},"subject":{"reference":"Patient/1"},"note":[{"text":"n"}]});
        let out = apply_elements(&obs, &["value".into(), "subject".into()]);
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "resourceType",
                "id",
                "status",
                "code",
                "valueQuantity",
                "subject",
                "meta"
            ]
        );
        assert_eq!(out["meta"]["tag"][0]["code"], "SUBSETTED");
    }
}

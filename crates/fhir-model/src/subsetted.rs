//! The `SUBSETTED` tag: a resource read with `_summary` or `_elements` (or exported with
//! `_elements`) carries it in `meta.tag`, and such a resource is incomplete — FHIR says it "may
//! not be suitable for use as the basis of a record update".

use serde_json::Value;

/// The system of the `SUBSETTED` tag.
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// The code of the `SUBSETTED` tag.
pub const SUBSETTED_CODE: &str = "SUBSETTED";

/// The index in `meta.tag` of the resource's `SUBSETTED` tag, if it has one.
pub fn subsetted_tag(resource: &Value) -> Option<usize> {
    resource
        .get("meta")?
        .get("tag")?
        .as_array()?
        .iter()
        .position(|t| {
            t.get("system").and_then(Value::as_str) == Some(SUBSETTED_SYSTEM)
                && t.get("code").and_then(Value::as_str) == Some(SUBSETTED_CODE)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_the_tag_by_system_and_code() {
        let tagged = json!({"resourceType": "Patient", "meta": {"tag": [
            {"system": "http://example.org", "code": "SUBSETTED"},
            {"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]}});
        assert_eq!(subsetted_tag(&tagged), Some(1));
        for other in [
            json!({"resourceType": "Patient"}),
            json!({"resourceType": "Patient", "meta": {"tag": [{"code": "SUBSETTED"}]}}),
            json!({"resourceType": "Patient", "meta": {"security": [
                {"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]}}),
            json!({"resourceType": "Patient", "meta": {"tag": {"system": SUBSETTED_SYSTEM}}}),
        ] {
            assert_eq!(subsetted_tag(&other), None, "{other}");
        }
    }
}

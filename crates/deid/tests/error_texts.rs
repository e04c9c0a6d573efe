//! Errors of the engine reach the error files, job status and logs of de-identified exports:
//! they name the rule and the place, never a value of the resource (security review).

use deid::Engine;

fn error_of(config: &str, resource: &str) -> String {
    Engine::from_config_text(config)
        .expect("config")
        .anonymize_str(resource)
        .expect_err("the resource cannot be de-identified")
        .to_string()
}

#[test]
fn a_non_integral_age_is_not_echoed() {
    let text = error_of(
        r#"{"fhirPathRules": [{"path": "nodesByType('Age')", "method": "redact"}],
            "parameters": {"enablePartialAgesForRedact": true}}"#,
        r#"{"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
            "onsetAge": {"value": 67.25, "unit": "a"}}"#,
    );
    assert!(text.contains("rule 0"), "{text}");
    assert!(!text.contains("67.25"), "{text}");
}

#[test]
fn a_negative_value_under_a_proportional_span_is_not_echoed() {
    let text = error_of(
        r#"{"fhirPathRules": [{"path": "Observation.value", "method": "perturb", "span": 0.1, "rangeType": "proportional"}]}"#,
        r#"{"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
            "valueQuantity": {"value": -1234.5678}}"#,
    );
    assert!(text.contains("rule 0"), "{text}");
    assert!(!text.contains("1234"), "{text}");
}

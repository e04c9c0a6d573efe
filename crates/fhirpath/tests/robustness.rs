//! No input panics: every prefix of every expression of the HL7 suite is compiled, and evaluated
//! when it compiles, against a resource; errors are fine, panics are not.

use fhirpath::{EvalContext, Expression, FunctionRegistry};
use serde_json::Value;

#[test]
fn prefixes_of_suite_expressions_never_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let text = std::fs::read_to_string(dir.join("cases/fhir-r4.yaml")).unwrap();
    let doc: Value = serde_norway::from_str(&text).unwrap();
    let patient: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("resources/r4/patient-example.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    collect(&doc, &mut exprs);
    assert!(exprs.len() > 900);
    let reg = FunctionRegistry::with_anonymizer_functions();
    let ctx = EvalContext::new(&patient);
    let mut evaluated = 0;
    for e in &exprs {
        for (i, _) in e.char_indices().chain(std::iter::once((e.len(), ' '))) {
            if let Ok(x) = Expression::compile_with(&e[..i], &reg) {
                let _ = x.evaluate(&ctx);
                evaluated += 1;
            }
        }
    }
    assert!(evaluated > 1000);
}

fn collect(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(e)) = m.get("expression") {
                out.push(e.clone());
            }
            m.values().for_each(|x| collect(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
        _ => {}
    }
}

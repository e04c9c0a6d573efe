//! The search crate evaluates search-parameter expressions with its own compiled walker (the
//! indexing hot path). This checks it against the fhirpath crate's full engine on the Synthea
//! data: for every parameter of every resource type present, the index values must be the same.

mod support;

use search::extract::{IndexValue, convert};
use search::registry;

fn via_fhirpath(ty: &str, code: &str, r: &serde_json::Value) -> Vec<IndexValue> {
    let kind = fhir_model::r4().search_param(ty, code).expect("param").kind;
    let mut out = Vec::new();
    for (path, ref_type) in registry::param_branches(ty, code) {
        let expr = fhirpath::Expression::compile(&path).expect("compiles");
        let items = expr
            .evaluate(&fhirpath::EvalContext::new(r))
            .expect("evaluates");
        for item in &items {
            let json = item.as_json();
            let mut vals = Vec::new();
            convert(kind, Some(item.type_name()), &json, &mut vals);
            if let Some(t) = &ref_type {
                vals.retain(|v| match v {
                    IndexValue::Reference { target_type, .. } => target_type == t,
                    IndexValue::ReferenceUrl(u) => u.contains(&format!("/{t}/")),
                    _ => true,
                });
            }
            out.extend(vals);
        }
    }
    out
}

#[test]
fn evaluator_matches_the_fhirpath_engine_on_synthea() {
    let resources = support::synthea::load();
    let mut checked = 0;
    let mut mismatches = Vec::new();
    // every 5th resource keeps the debug-build run short; every type is still covered
    for r in resources
        .iter()
        .step_by(5)
        .chain(resources.iter().filter(|r| r["resourceType"] == "Patient"))
    {
        let ty = r["resourceType"].as_str().unwrap_or_default();
        let Some(ti) = registry::type_index(ty) else {
            continue;
        };
        for p in &ti.params {
            let mine = registry::extract_param(ty, &p.code, r);
            let theirs = via_fhirpath(ty, &p.code, r);
            checked += 1;
            if mine != theirs && mismatches.len() < 20 {
                mismatches.push(format!(
                    "{ty}/{} {}: {mine:?} vs {theirs:?}",
                    r["id"], p.code
                ));
            }
        }
    }
    assert!(checked > 100_000, "{checked}");
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

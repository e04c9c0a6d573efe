//! The FHIRPath side of the anonymizer's `generalize` method, checked against the upstream unit-test
//! vectors (`tests/data/generalize.json`): conditions evaluated on a typed primitive node as `$this`,
//! first case whose condition is true or empty wins, the value expression gives the new value.

use fhirpath::{EvalContext, Expression, FunctionRegistry, Item, Node};
use serde_json::Value;

fn vectors() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/generalize.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `Ok(Some(v))` new value, `Ok(None)` value removed, `Err` a processing error.
fn generalize(
    ty: &str,
    input: &Value,
    cases: &serde_json::Map<String, Value>,
    keep: bool,
) -> Result<Option<Value>, String> {
    let reg = FunctionRegistry::with_anonymizer_functions();
    let node = Item::Node(Node::detached(input, ty));
    let ctx = EvalContext::new(input).with_focus(node);
    for (cond, value) in cases {
        let cond = Expression::compile_with(cond, &reg).map_err(|e| e.to_string())?;
        let out = cond.evaluate(&ctx).map_err(|e| e.to_string())?;
        let matched = match out.as_slice() {
            [] => true,
            [one] => one.as_json() != Value::Bool(false),
            _ => return Err("condition gave several items".into()),
        };
        if !matched {
            continue;
        }
        let src = value
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        let expr = Expression::compile_with(&src, &reg).map_err(|e| e.to_string())?;
        let out = expr.evaluate(&ctx).map_err(|e| e.to_string())?;
        return match out.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.as_json())),
            _ => Err("value expression gave several items".into()),
        };
    }
    Ok(if keep { Some(input.clone()) } else { None })
}

fn same(expected: &Value, actual: &Option<Value>) -> bool {
    match (expected, actual) {
        (Value::Null, None) => true,
        (Value::Number(e), Some(Value::Number(a))) => {
            e.to_string().parse::<f64>().ok() == a.to_string().parse::<f64>().ok()
        }
        (e, Some(a)) => e == a,
        _ => false,
    }
}

#[test]
fn generalize_vectors() {
    let v = vectors();
    let mut checked = 0;
    let mut failures = Vec::new();
    for (group, g) in v["groups"].as_object().unwrap() {
        let Some(rows) = g.get("rows").and_then(Value::as_array) else {
            continue;
        };
        let expect_error =
            g.get("expect").and_then(Value::as_str) == Some("AnonymizerProcessingException");
        for row in rows {
            let cases = row
                .get("cases")
                .or_else(|| g.get("cases"))
                .and_then(Value::as_object)
                .unwrap();
            let ty = row["type"].as_str().unwrap();
            let keep = row.get("otherValues").and_then(Value::as_str) == Some("keep");
            let got = generalize(ty, &row["input"], cases, keep);
            checked += 1;
            let ok = match (&got, expect_error) {
                (Err(_), true) => true,
                (Ok(a), false) => same(&row["expected"], a),
                _ => false,
            };
            if !ok {
                failures.push(format!("{group}: {row} -> {got:?}"));
            }
        }
    }
    assert!(checked > 60, "{checked} rows");
    assert!(
        failures.is_empty(),
        "{} of {checked} rows differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

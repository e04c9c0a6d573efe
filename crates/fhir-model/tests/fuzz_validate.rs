//! Property tests (fuzzing) of structural validation: the official R4 examples of the FHIRPath
//! corpus (crates/fhirpath/tests/corpus/resources/r4) mutated as JSON — values replaced by odd
//! ones, arrays unwrapped or wrapped, unknown and `_shadow` keys added, deep nesting spliced
//! in. Properties: never a panic or stack overflow; the report stays bounded (at most 100
//! issues); validation is deterministic.
//!
//! `PROPTEST_CASES` sets the cases per property, `FUZZ_SCALE` multiplies the small defaults
//! below (CI runs them as they are; the long run is `scripts/fuzz-long.sh`). Failures are not
//! persisted: a failing case is printed, minimized, and becomes a named regression test.

use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let scale: u32 = std::env::var("FUZZ_SCALE")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            default_cases.saturating_mul(scale)
        });
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn examples() -> &'static Vec<Value> {
    static E: OnceLock<Vec<Value>> = OnceLock::new();
    E.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fhirpath/tests/corpus/resources/r4");
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        let v: Vec<Value> = paths
            .iter()
            .filter_map(|p| serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok())
            .collect();
        assert!(v.len() > 20);
        v
    })
}

fn slots(v: &Value, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                here.push(k.clone());
                slots(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(i.to_string());
                slots(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn at<'v>(v: &'v mut Value, path: &[String]) -> &'v mut Value {
    path.iter().fold(v, |v, seg| match v {
        Value::Array(a) => &mut a[seg.parse::<usize>().unwrap()],
        other => &mut other[seg.as_str()],
    })
}

fn deep(n: usize) -> Value {
    let mut v = json!(1);
    for i in 0..n {
        v = if i % 2 == 0 {
            json!([v])
        } else {
            json!({"extension": v})
        };
    }
    v
}

#[derive(Debug, Clone)]
enum Edit {
    Replace(Value),
    Wrap,
    Unwrap,
    AddKey(String, Value),
    Deep(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let odd = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        Just(serde_json::from_str::<Value>("1.50").unwrap()),
        Just(serde_json::from_str::<Value>("1e400").unwrap()),
        "\\PC{0,16}".prop_map(Value::String),
        Just(json!("")),
        Just(json!(" padded ")),
        Just(json!({})),
        Just(json!([])),
        Just(json!([null])),
        Just(json!({"resourceType": "Patient", "id": "x"})),
        Just(json!({"resourceType": 7})),
        Just(json!({"id": "x", "extension": [{"url": "u", "valueString": "v"}]})),
    ];
    prop_oneof![
        4 => odd.clone().prop_map(Edit::Replace),
        1 => Just(Edit::Wrap),
        1 => Just(Edit::Unwrap),
        2 => (
            prop::sample::select(&["_id", "_birthDate", "_given", "valueFoo", "value", "extension", "modifierExtension", "contained", "resourceType", "x", "_", "fhir_comments"][..]),
            odd,
        ).prop_map(|(k, v)| Edit::AddKey(k.to_string(), v)),
        1 => prop_oneof![1usize..70, 60usize..1000].prop_map(Edit::Deep),
    ]
}

fn mutated() -> impl Strategy<Value = Value> {
    (
        any::<prop::sample::Index>(),
        prop::collection::vec((any::<prop::sample::Index>(), edit()), 1..5),
    )
        .prop_map(|(pick, edits)| {
            let ex = examples();
            let mut r = ex[pick.index(ex.len())].clone();
            for (i, e) in edits {
                let mut all = Vec::new();
                slots(&r, &mut Vec::new(), &mut all);
                let path = &all[i.index(all.len())];
                let slot = at(&mut r, path);
                match e {
                    Edit::Replace(v) => *slot = v,
                    Edit::Wrap => *slot = Value::Array(vec![slot.take()]),
                    Edit::Unwrap => {
                        if let Value::Array(a) = slot
                            && !a.is_empty()
                        {
                            *slot = a.swap_remove(0);
                        }
                    }
                    Edit::AddKey(k, v) => {
                        if let Value::Object(m) = slot {
                            m.insert(k, v);
                        }
                    }
                    Edit::Deep(n) => *slot = deep(n),
                }
            }
            r
        })
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn mutated_examples_validate_without_panic_and_with_bounded_reports(r in mutated()) {
        let model = fhir_model::r4();
        let first = model.validate(&r);
        if let Err(issues) = &first {
            prop_assert!(!issues.is_empty() && issues.len() <= 100, "{}", issues.len());
        }
        prop_assert_eq!(model.validate(&r), first);
    }
}

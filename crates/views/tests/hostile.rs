//! No panic on any ViewDefinition: every view of the official suite, mutated at every node (each
//! value replaced by null, numbers, strings, FHIRPath oddities, arrays, objects and deep nesting),
//! is compiled and, when it compiles, run over the suite file's resources; each must end in rows
//! or a typed error, and the rows generated one at a time must be the held ones. Deterministic:
//! the mutations are enumerated, not random.

use serde_json::{Value as Json, json};
use views::View;

fn replacements() -> Vec<Json> {
    let mut deep = json!({"select": []});
    for _ in 0..40 {
        deep = json!({"select": [deep]});
    }
    vec![
        Json::Null,
        json!(0),
        json!(-1.5e300),
        json!(true),
        json!(""),
        json!("@@"),
        json!("%"),
        json!("%rowIndex"),
        json!("name.repeat($this)"),
        json!("descendants()"),
        json!("'\u{0}\u{ffff}'"),
        json!("a".repeat(5000)),
        json!("getReferenceKey(1, 2)"),
        json!("getResourceKey().getReferenceKey(Patient)"),
        json!([]),
        json!([null]),
        json!({}),
        json!({"path": 1}),
        deep,
    ]
}

/// Every node path of `v` (object keys and array indexes), the root included.
fn paths(v: &Json, here: &mut Vec<Json>, out: &mut Vec<Vec<Json>>) {
    out.push(here.clone());
    match v {
        Json::Object(m) => {
            for (k, c) in m {
                here.push(json!(k));
                paths(c, here, out);
                here.pop();
            }
        }
        Json::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(json!(i));
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn replaced(v: &Json, path: &[Json], with: &Json) -> Json {
    let mut out = v.clone();
    let mut cur = &mut out;
    for seg in path {
        cur = match seg {
            Json::String(k) => cur.get_mut(k.as_str()).unwrap(),
            Json::Number(i) => cur.get_mut(i.as_u64().unwrap() as usize).unwrap(),
            _ => unreachable!(),
        };
    }
    *cur = with.clone();
    out
}

#[test]
fn mutated_suite_views_end_in_rows_or_typed_errors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json") && !p.ends_with("tests.schema.json"))
        .collect();
    files.sort();
    let with = replacements();
    let (mut compiled, mut refused, mut row_errors) = (0usize, 0usize, 0usize);
    for f in &files {
        let suite: Json = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let resources = suite["resources"].as_array().cloned().unwrap_or_default();
        for case in suite["tests"].as_array().unwrap() {
            let view = &case["view"];
            let mut all = Vec::new();
            paths(view, &mut Vec::new(), &mut all);
            for p in &all {
                for w in &with {
                    let mutated = replaced(view, p, w);
                    match View::compile(&mutated) {
                        Err(e) => {
                            assert!(!e.to_string().is_empty());
                            refused += 1;
                        }
                        Ok(v) => {
                            compiled += 1;
                            for r in &resources {
                                let held = v.rows(r).map_err(|e| e.to_string());
                                if held.is_err() {
                                    row_errors += 1;
                                }
                                // Generated one at a time (nothing held): the same rows in the
                                // same order, or the same error with no row before it.
                                let mut one_by_one = Vec::new();
                                let each = v.for_each_row_holding(r, 1, |row| -> Result<(), ()> {
                                    one_by_one.push(row.to_vec());
                                    Ok(())
                                });
                                let each = match each {
                                    Ok(_) => Ok(one_by_one),
                                    Err(views::EachRowError::Row(e)) => {
                                        assert!(one_by_one.is_empty(), "rows before {e}");
                                        Err(e.to_string())
                                    }
                                    Err(views::EachRowError::Sink(())) => unreachable!(),
                                };
                                assert_eq!(each, held, "{mutated}");
                            }
                        }
                    }
                }
            }
        }
    }
    println!("{compiled} mutated views compiled, {refused} refused, {row_errors} row errors");
    assert!(compiled > 1000 && refused > 1000);
}

/// Review: each FHIRPath evaluation had its own budget and a view may list any number of
/// expressions, so one resource of a view of many costly `where` clauses took minutes (one
/// `$viewdefinition-run` about an hour), and `=` of two long strings cost one unit. Now string
/// comparisons are charged by their bytes and all of one resource's evaluations share
/// `views::MAX_RESOURCE_WORK`: the resource ends in a typed error, and a view of few clauses
/// still gives its rows.
#[test]
fn the_evaluations_of_one_resource_share_one_budget() {
    let long = "x".repeat(64 * 1024);
    let clause = json!({"path": "%a.repeat($this).select(%a = %b).count() > 0"});
    let view = |clauses: usize| {
        json!({"resourceType": "ViewDefinition", "resource": "Patient", "status": "active",
            "constant": [{"name": "a", "valueString": long}, {"name": "b", "valueString": long}],
            "where": vec![clause.clone(); clauses],
            "select": [{"column": [{"name": "id", "path": "id"}]}]})
    };
    let patient = json!({"resourceType": "Patient", "id": "p"});
    // One clause: 4,096 units for its 64 KiB comparison, far within every budget.
    let few = View::compile(&view(3)).expect("compiles");
    assert_eq!(few.rows(&patient).expect("rows").len(), 1);
    // Each clause within its own budget, together beyond the resource's.
    let many = View::compile(&view(5_000)).expect("compiles");
    let e = many
        .rows(&patient)
        .expect_err("beyond the resource's budget");
    assert!(e.to_string().contains("evaluation steps"), "{e}");
}

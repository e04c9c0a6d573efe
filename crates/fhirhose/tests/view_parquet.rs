//! `fhirhose view --format parquet` through the real binary, read back by an independent reader
//! (pyarrow from PyPI, installed by scripts/pyarrow.sh; its python in FHIRHOSE_TEST_PYARROW):
//! typed columns from the ViewDefinition's column types, nulls, a LIST column, row counts; and a
//! value that does not convert to its column's type fails naming the column and the row.

mod common;

use std::path::Path;
use std::process::{Command, Output};

const VIEW: &str = r#"{"resourceType": "ViewDefinition", "name": "typed",
  "resource": "Observation", "status": "active",
  "select": [{"column": [
    {"name": "id", "path": "getResourceKey()", "type": "id"},
    {"name": "status", "path": "status", "type": "code"},
    {"name": "value", "path": "value.ofType(Quantity).value", "type": "decimal"},
    {"name": "count", "path": "value.ofType(integer)", "type": "integer"},
    {"name": "flag", "path": "value.ofType(boolean)", "type": "boolean"},
    {"name": "issued", "path": "issued", "type": "instant"},
    {"name": "effective", "path": "effective.ofType(dateTime)", "type": "dateTime"},
    {"name": "codes", "path": "code.coding.code", "type": "code", "collection": true},
    {"name": "untyped", "path": "code.text"}]}]}"#;

const DATA: &str = concat!(
    r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"BP","coding":[{"code":"a"},{"code":"b"}]},"valueQuantity":{"value":1.50},"issued":"2020-01-02T03:04:05.678Z","effectiveDateTime":"2020-03"}"#,
    "\n",
    r#"{"resourceType":"Observation","id":"o2","status":"amended","code":{"coding":[{"code":"c"}]},"valueInteger":42}"#,
    "\n",
    r#"{"resourceType":"Observation","id":"o3","status":"final","code":{"text":"none"},"valueBoolean":true}"#,
    "\n",
    r#"{"resourceType":"Patient","id":"p1"}"#,
    "\n"
);

/// Reads the file with pyarrow; prints the schema's field types, the row count and the rows.
const READER: &str = r#"
import json, sys
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
print(json.dumps({
  "types": {f.name: str(f.type) for f in t.schema},
  "rows": t.num_rows,
  "data": t.to_pylist(),
}, default=str))
"#;

fn pyarrow() -> Option<String> {
    test_support::external::external("FHIRHOSE_TEST_PYARROW", "scripts/pyarrow.sh")
}

/// The binary in `dir`, with a clean environment.
fn fhirhose(args: &[&str], dir: &Path) -> Output {
    common::fhirhose()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run fhirhose")
}

#[test]
fn parquet_has_typed_columns_read_back_by_pyarrow() {
    let Some(python) = pyarrow() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("view.json"), VIEW).unwrap();
    std::fs::write(dir.join("obs.ndjson"), DATA).unwrap();
    let out = fhirhose(
        &[
            "view",
            "view.json",
            "obs.ndjson",
            "--format",
            "parquet",
            "--out",
            "out",
            "--quiet",
        ],
        dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.join("out/typed.parquet");
    let names: Vec<_> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("typed.parquet")],
        "no temporary file left"
    );

    let read = Command::new(&python)
        .args(["-c", READER, file.to_str().unwrap()])
        .output()
        .expect("run pyarrow's python");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(
        got["types"],
        serde_json::json!({
            "id": "string", "status": "string", "value": "double", "count": "int32",
            "flag": "bool", "issued": "string", "effective": "string",
            "codes": "list<element: string>", "untyped": "string"
        })
    );
    assert_eq!(got["rows"], 3);
    let data = &got["data"];
    assert_eq!(data[0]["id"], "o1");
    assert_eq!(data[0]["value"], 1.5);
    assert_eq!(data[0]["count"], serde_json::Value::Null);
    assert_eq!(data[0]["issued"], "2020-01-02T03:04:05.678Z");
    assert_eq!(
        data[0]["effective"], "2020-03",
        "partial dates kept as written"
    );
    assert_eq!(data[0]["codes"], serde_json::json!(["a", "b"]));
    assert_eq!(data[1]["count"], 42);
    assert_eq!(data[1]["codes"], serde_json::json!(["c"]));
    assert_eq!(data[1]["untyped"], serde_json::Value::Null);
    assert_eq!(data[2]["flag"], true);
    assert_eq!(
        data[2]["codes"],
        serde_json::json!([]),
        "an empty collection is an empty list"
    );
}

#[test]
fn a_value_that_does_not_convert_fails_naming_column_and_row() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // `status` declared integer: the second row's "final" does not convert.
    std::fs::write(
        dir.join("view.json"),
        r#"{"resourceType": "ViewDefinition", "name": "bad", "resource": "Observation",
            "select": [{"column": [{"name": "n", "path": "status", "type": "integer"}]}]}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("obs.ndjson"),
        concat!(
            r#"{"resourceType":"Observation","id":"o1"}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"o2","status":"final"}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = fhirhose(
        &[
            "view",
            "view.json",
            "obs.ndjson",
            "--format",
            "parquet",
            "--out",
            "out",
            "--quiet",
        ],
        dir,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("row 2") && err.contains("'n'") && err.contains("'final'"),
        "{err}"
    );
    let left = std::fs::read_dir(dir.join("out")).unwrap().count();
    assert_eq!(left, 0, "a failed run leaves no output");
}

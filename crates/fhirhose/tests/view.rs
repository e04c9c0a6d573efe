//! `fhirhose view` through the real binary: a ViewDefinition over NDJSON, `.ndjson.gz` and Bundle
//! files in folders, to CSV (header, RFC 4180 quoting, empty for null) and NDJSON; an invalid view
//! and a resource the view cannot take fail with the element and the reason, leaving no output.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Output;

const VIEW: &str = r#"{"resourceType": "ViewDefinition", "name": "patient_names",
  "resource": "Patient", "status": "active",
  "select": [
    {"column": [{"name": "id", "path": "getResourceKey()", "type": "id"},
                {"name": "birth", "path": "birthDate", "type": "date"}]},
    {"forEachOrNull": "name",
     "column": [{"name": "family", "path": "family", "type": "string"},
                {"name": "given", "path": "given.join(' ')", "type": "string"}]}]}"#;

/// The binary in `dir`, with a clean environment.
fn fhirhose(args: &[&str], dir: &Path) -> Output {
    common::fhirhose()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run fhirhose")
}

/// in/a.ndjson (two Patients, an Observation, a blank line), in/sub/b.ndjson.gz (one Patient),
/// in/sub/c.json (a Bundle with one Patient).
fn inputs(dir: &Path) {
    std::fs::create_dir_all(dir.join("in/sub")).unwrap();
    std::fs::write(dir.join("view.json"), VIEW).unwrap();
    std::fs::write(
        dir.join("in/a.ndjson"),
        concat!(
            r#"{"resourceType":"Patient","id":"p1","birthDate":"1970-06","name":[{"family":"Smith, Jr.","given":["A","B"]},{"family":"Say \"hi\"\nthere"}]}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"Patient"}}"#,
            "\n\n",
            r#"{"resourceType":"Patient","id":"p2"}"#,
            "\n"
        ),
    )
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(dir.join("in/sub/b.ndjson.gz")).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(b"{\"resourceType\":\"Patient\",\"id\":\"p3\",\"name\":[{\"family\":\"Gz\"}]}\n")
        .unwrap();
    gz.finish().unwrap();
    std::fs::write(
        dir.join("in/sub/c.json"),
        r#"{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":"Patient","id":"p4"}}]}"#,
    )
    .unwrap();
}

#[test]
fn view_over_folders_to_csv_and_ndjson() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    inputs(dir);

    let out = fhirhose(
        &["view", "view.json", "in", "--out", "out", "--format", "csv"],
        dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(dir.join("out/patient_names.csv")).unwrap();
    assert_eq!(
        csv,
        concat!(
            "id,birth,family,given\n",
            "p1,1970-06,\"Smith, Jr.\",A B\n",
            "p1,1970-06,\"Say \"\"hi\"\"\nthere\",\"\"\n",
            "p2,,,\n",
            "p3,,Gz,\"\"\n",
            "p4,,,\n",
        )
    );
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(
        summary.contains("3 files, 5 resources (4 of type Patient), 5 rows"),
        "{summary}"
    );

    let out = fhirhose(
        &[
            "view",
            "view.json",
            "in/a.ndjson",
            "--out",
            "out",
            "--format",
            "ndjson",
            "--quiet",
        ],
        dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("out/patient_names.ndjson"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(
        lines,
        vec![
            serde_json::json!({"id": "p1", "birth": "1970-06", "family": "Smith, Jr.", "given": "A B"}),
            serde_json::json!({"id": "p1", "birth": "1970-06", "family": "Say \"hi\"\nthere", "given": ""}),
            serde_json::json!({"id": "p2", "birth": null, "family": null, "given": null}),
        ]
    );
    // Only the output files: no temporary file left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["patient_names.csv", "patient_names.ndjson"]);
}

#[test]
fn invalid_views_and_bad_resources_fail_with_the_element_and_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    inputs(dir);

    std::fs::write(
        dir.join("bad.json"),
        r#"{"resource": "Patient", "select": [{"column": [{"name": "a", "path": "name.family.bogus()"}]}]}"#,
    )
    .unwrap();
    let out = fhirhose(&["view", "bad.json", "in", "--out", "out"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("select[0].column[0].path") && err.contains("unknown function 'bogus'"),
        "{err}"
    );

    // Two family names in a column that is not a collection: an error naming the resource and
    // the column, and no output file; with --skip-errors the resource is counted and skipped.
    std::fs::write(
        dir.join("multi.json"),
        r#"{"resource": "Patient", "select": [{"column": [{"name": "family", "path": "name.family"}]}]}"#,
    )
    .unwrap();
    let out = fhirhose(
        &["view", "multi.json", "in", "--out", "out", "--quiet"],
        dir,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a.ndjson:1")
            && err.contains("Patient/p1")
            && err.contains("'family' has 2 values"),
        "{err}"
    );
    assert!(!dir.join("out/multi.csv").exists());
    assert_eq!(std::fs::read_dir(dir.join("out")).unwrap().count(), 0);

    let out = fhirhose(
        &[
            "view",
            "multi.json",
            "in",
            "--out",
            "out",
            "--quiet",
            "--skip-errors",
        ],
        dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 skipped for errors"));
    assert_eq!(
        std::fs::read_to_string(dir.join("out/multi.csv")).unwrap(),
        "family\n\nGz\n\n"
    );
}

#[test]
fn rows_keep_input_order_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("view.json"), VIEW).unwrap();
    let mut lines = String::new();
    for i in 0..3000 {
        lines.push_str(&format!(
            r#"{{"resourceType":"Patient","id":"p{i}","name":[{{"family":"F{i}"}},{{"family":"G{i}"}}]}}"#
        ));
        lines.push('\n');
    }
    std::fs::write(dir.join("many.ndjson"), lines).unwrap();
    let mut outputs = Vec::new();
    for threads in ["1", "3"] {
        let out_dir = format!("out{threads}");
        let out = fhirhose(
            &[
                "view",
                "view.json",
                "many.ndjson",
                "--out",
                &out_dir,
                "--threads",
                threads,
                "--quiet",
            ],
            dir,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs
            .push(std::fs::read_to_string(dir.join(&out_dir).join("patient_names.csv")).unwrap());
    }
    assert_eq!(outputs[0], outputs[1]);
    let rows: Vec<&str> = outputs[0].lines().collect();
    assert_eq!(rows.len(), 6001);
    assert_eq!(rows[1], "p0,,F0,\"\"");
    assert_eq!(rows[6000], "p2999,,G2999,\"\"");
}

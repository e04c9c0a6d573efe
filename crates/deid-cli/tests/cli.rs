//! End-to-end: NDJSON through the shipped R4 sample config, order kept, no temp files left.

use std::path::PathBuf;

use deid_cli::{AnonymizeArgs, run};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn args(input: PathBuf, output: PathBuf) -> AnonymizeArgs {
    AnonymizeArgs {
        bulk: true,
        threads: Some(2),
        ..AnonymizeArgs::new(input, output, data("r4-configuration-sample.json"))
    }
}

#[test]
fn ndjson_file_and_gz() {
    let dir = std::env::temp_dir().join(format!("deid-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.ndjson.gz");
    let s = run(&args(data("Patient-1.ndjson"), out.clone())).unwrap();
    assert!(s.resources >= 1);
    assert!(out.exists());
    let leftovers = std::fs::read_dir(&dir).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")
    });
    assert_eq!(leftovers.count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn same_input_and_output_folder_is_refused() {
    let dir = data("");
    assert!(run(&args(dir.clone(), dir)).is_err());
}

/// `--dry-run` writes no data and reports rules, untouched fields, residual PHI and risk
/// (issue 21 items 3 and 4).
#[test]
fn dry_run_reports_instead_of_writing() {
    let synthea = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&synthea)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    let a = AnonymizeArgs {
        input: None,
        input_arg: Some(files[0].clone()),
        output: None,
        dry_run: true,
        report_format: "json".into(),
        k: 2,
        ..AnonymizeArgs::new(
            PathBuf::new(),
            PathBuf::new(),
            data("r4-configuration-sample.json"),
        )
    };
    let s = run(&a).unwrap();
    let r = s.report.expect("report");
    assert!(r.resources > 100, "the Bundle's entries are measured");
    assert!(
        r.rules
            .iter()
            .any(|x| x.path == "Resource.id" && x.nodes >= r.resources)
    );
    assert!(
        r.unmatched_rules
            .iter()
            .any(|i| r.rules[*i].path == "Bundle.entry.fullUrl")
    );
    // The sample configuration keeps Patient.gender and Organization telecoms.
    assert!(
        r.untouched_fields["Patient"]
            .iter()
            .any(|f| f.field == "gender")
    );
    assert!(
        r.residual_phi
            .iter()
            .any(|x| x.resource_type == "Organization" && x.category == "phone")
    );
    assert_eq!(r.risk.patients, 1);
    assert_eq!(r.risk.k, 2);
    assert_eq!(r.risk.patients_below_k, 1);
    // Quasi-identifiers are checked.
    let bad = AnonymizeArgs {
        quasi_identifiers: vec!["shoeSize".into()],
        ..a
    };
    assert!(run(&bad).unwrap_err().to_string().contains("shoeSize"));
}

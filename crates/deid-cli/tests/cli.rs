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

/// The entries of the first Synthea Bundles as NDJSON lines (`n` lines or fewer).
fn synthea_lines(n: usize) -> Vec<String> {
    use std::io::Read;
    let synthea = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&synthea)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    let mut lines = Vec::new();
    for f in files {
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(f).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let bundle: serde_json::Value = serde_json::from_str(&text).unwrap();
        for e in bundle["entry"].as_array().unwrap() {
            lines.push(e["resource"].to_string());
            if lines.len() == n {
                return lines;
            }
        }
    }
    lines
}

/// The sample configuration with fixed keys (its empty keys draw random ones per engine).
fn fixed_key_config(dir: &std::path::Path) -> PathBuf {
    let mut c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data("r4-configuration-sample.json")).unwrap(),
    )
    .unwrap();
    c["parameters"]["cryptoHashKey"] = "test-hash-key".into();
    c["parameters"]["encryptKey"] = "0123456789abcdef0123456789abcdef".into();
    c["parameters"]["dateShiftKey"] = "test-shift-key".into();
    let p = dir.join("config.json");
    std::fs::write(&p, c.to_string()).unwrap();
    p
}

/// NDJSON of several batches: the reader, worker and writer threads give the bytes, line order
/// and counts of one thread (issue 24: the threads now overlap reading, anonymizing and writing).
#[test]
fn threads_write_what_one_thread_writes() {
    let dir = std::env::temp_dir().join(format!("deid-cli-threads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = fixed_key_config(&dir);
    let lines = synthea_lines(5_000);
    assert!(lines.len() > 3_000, "several batches of 1,024 lines");
    let input = dir.join("in.ndjson");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let mut outputs = Vec::new();
    for threads in [1, 2, 3] {
        let out = dir.join(format!("out-{threads}.ndjson"));
        let s = run(&AnonymizeArgs {
            bulk: true,
            threads: Some(threads),
            ..AnonymizeArgs::new(input.clone(), out.clone(), config.clone())
        })
        .unwrap();
        assert_eq!(s.resources, lines.len() as u64);
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text.lines().count(), lines.len());
        outputs.push((text, s.rule_hits));
    }
    // Same order: the n-th output line is the n-th input resource (ids are hashed, types kept).
    let first = &outputs[0].0;
    for (l, input) in first.lines().zip(&lines) {
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(l).unwrap(),
            serde_json::from_str(input).unwrap(),
        );
        assert_eq!(a["resourceType"], b["resourceType"]);
    }
    for (text, hits) in &outputs[1..] {
        assert!(text == first, "output differs from one thread's");
        assert_eq!(hits, &outputs[0].1);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bad line in a late batch fails the run with its line number, whatever the thread count,
/// and leaves neither the output nor a temporary file.
#[test]
fn a_bad_line_in_a_late_batch_fails_with_its_number() {
    let dir = std::env::temp_dir().join(format!("deid-cli-badline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = fixed_key_config(&dir);
    let mut lines = synthea_lines(3_000);
    lines[2_499] = "{\"resourceType\": \"Patient\", ".into();
    lines[2_800] = "not json either".into();
    let input = dir.join("in.ndjson");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    for threads in [1, 2, 4] {
        let out = dir.join("out.ndjson");
        let e = run(&AnonymizeArgs {
            bulk: true,
            threads: Some(threads),
            ..AnonymizeArgs::new(input.clone(), out.clone(), config.clone())
        })
        .unwrap_err();
        assert!(e.to_string().contains(":2500:"), "{threads} threads: {e}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("out"))
            .collect();
        assert!(left.is_empty(), "{threads} threads left {left:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

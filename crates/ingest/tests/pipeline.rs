//! The loader's pipeline (reading thread, parsing threads, writer in input order): order across
//! many units and files, `strict`, and what a progress callback sees.

mod support;

use std::io::Write;

use ingest::{LoadError, LoadOptions, load_into_store};
use serde_json::Value;

fn patient_line(id: &str, n: usize) -> String {
    format!(
        r#"{{"resourceType":"Patient","id":"{id}","birthDate":"1970-01-01","name":[{{"family":"F{n}"}}]}}"#
    )
}

#[test]
fn updates_spread_over_many_units_apply_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    // 5,000 lines (several parsing units) updating 7 patients round-robin, in two files, with
    // a blank line and an empty file between them.
    let mut expected = std::collections::BTreeMap::new();
    let mut versions = std::collections::BTreeMap::new();
    let mut n = 0;
    for name in ["a.ndjson", "b.ndjson"] {
        let mut f = std::fs::File::create(input.join(name)).unwrap();
        for _ in 0..2500 {
            let id = format!("p{}", n % 7);
            writeln!(f, "{}", patient_line(&id, n)).unwrap();
            if n == 10 {
                writeln!(f).unwrap();
            }
            expected.insert(id.clone(), format!("F{n}"));
            *versions.entry(id).or_insert(0) += 1;
            n += 1;
        }
    }
    std::fs::File::create(input.join("aa-empty.ndjson")).unwrap();

    let (_d, store) = support::temp_store();
    let mut seen = Vec::new();
    let summary = load_into_store(
        &*store,
        &[input],
        &LoadOptions {
            chunk_size: 300,
            ..LoadOptions::default()
        },
        &mut |p| seen.push((p.files_done, p.resources)),
    )
    .unwrap();
    assert_eq!(summary.written(), 5000);
    assert_eq!(summary.invalid, 0);
    for (id, family) in &expected {
        let r = store.read("Patient", id).unwrap();
        let v: Value = serde_json::from_slice(&r.json).unwrap();
        assert_eq!(v["name"][0]["family"], family.as_str(), "{id}");
        assert_eq!(r.version, versions[id], "{id}");
    }
    // Progress only moves forward and ends with every file done.
    assert!(
        seen.windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
    );
    assert_eq!(seen.last(), Some(&(3, 5000)));
}

#[test]
fn strict_writes_what_precedes_the_first_invalid_resource_and_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.ndjson");
    let mut f = std::fs::File::create(&file).unwrap();
    for n in 0..3000 {
        if n == 2100 {
            writeln!(
                f,
                r#"{{"resourceType":"Patient","id":"bad","unknownElement":1}}"#
            )
            .unwrap();
        }
        writeln!(f, "{}", patient_line(&format!("s{n}"), n)).unwrap();
    }
    drop(f);
    let (_d, store) = support::temp_store();
    let err = load_into_store(
        &*store,
        std::slice::from_ref(&file),
        &LoadOptions {
            strict: true,
            chunk_size: 500,
            ..LoadOptions::default()
        },
        &mut |_| {},
    )
    .unwrap_err();
    match err {
        LoadError::Invalid { location, message } => {
            assert!(location.ends_with("x.ndjson:2101"), "{location}");
            assert!(message.contains("unknownElement"), "{message}");
        }
        other => panic!("expected Invalid, got {other}"),
    }
    assert!(store.read("Patient", "s2099").is_ok());
    assert!(store.read("Patient", "s2100").is_err());
    assert_eq!(store.count_type("Patient", i64::MAX).unwrap(), 2100);

    // Without strict the same file loads all but the invalid line, reported with its line.
    let (_d2, store) = support::temp_store();
    let summary = load_into_store(&*store, &[file], &LoadOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(summary.written(), 3000);
    assert_eq!(summary.invalid, 1);
    assert!(summary.problems[0].location.ends_with("x.ndjson:2101"));
}

/// A repeated key is refused as REST refuses it (serde_json kept the last value): the line is
/// reported with its file and line and skipped, and `strict` stops there.
#[test]
fn a_line_with_a_duplicate_key_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dup.ndjson");
    let mut f = std::fs::File::create(&file).unwrap();
    writeln!(f, "{}", patient_line("a", 0)).unwrap();
    writeln!(
        f,
        r#"{{"resourceType":"Patient","id":"x","gender":"male","gender":"female"}}"#
    )
    .unwrap();
    writeln!(f, "{}", patient_line("b", 1)).unwrap();
    drop(f);

    let (_d, store) = support::temp_store();
    let summary = load_into_store(
        &*store,
        std::slice::from_ref(&file),
        &LoadOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(summary.written(), 2);
    assert_eq!(summary.invalid, 1);
    let problem = &summary.problems[0];
    assert!(problem.location.ends_with("dup.ndjson:2"), "{problem:?}");
    assert!(
        problem.message.contains("duplicate key \"gender\""),
        "{problem:?}"
    );
    assert!(store.read("Patient", "x").is_err());
    assert!(store.read("Patient", "b").is_ok());

    let (_d2, store) = support::temp_store();
    let err = load_into_store(
        &*store,
        &[file],
        &LoadOptions {
            strict: true,
            ..LoadOptions::default()
        },
        &mut |_| {},
    )
    .unwrap_err();
    match err {
        LoadError::Invalid { location, message } => {
            assert!(location.ends_with("dup.ndjson:2"), "{location}");
            assert!(message.contains("duplicate key \"gender\""), "{message}");
        }
        other => panic!("expected Invalid, got {other}"),
    }
    assert!(store.read("Patient", "x").is_err());
    assert!(store.read("Patient", "b").is_err());
}

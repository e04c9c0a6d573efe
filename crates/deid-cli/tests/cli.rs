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
        input,
        output,
        config: data("r4-configuration-sample.json"),
        bulk: true,
        recursive: false,
        skip: false,
        threads: Some(2),
        decrypt: false,
        quiet: true,
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

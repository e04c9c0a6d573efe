//! `synth` output: fresh ids, consistent references, loadable.

mod support;

use ingest::{LoadOptions, SynthOptions, load_into_store, synthesize};

#[test]
fn synthetic_patients_load_with_all_references_resolved() {
    let out = tempfile::tempdir().unwrap();
    let mut options = SynthOptions::new(7, out.path().to_path_buf());
    options.seed_dir = support::testdata("synthea-seed");
    let summary = synthesize(&options, &mut |_| {}).unwrap();
    assert_eq!(summary.per_type["Patient"], 7);
    assert_eq!(summary.per_type["Group"], 1);
    assert!(
        summary
            .files
            .iter()
            .any(|f| f.ends_with("Observation.ndjson"))
    );

    // Same seed, same bytes.
    let out2 = tempfile::tempdir().unwrap();
    let mut again = options.clone();
    again.out_dir = out2.path().to_path_buf();
    synthesize(&again, &mut |_| {}).unwrap();
    assert_eq!(
        std::fs::read(out.path().join("Patient.ndjson")).unwrap(),
        std::fs::read(out2.path().join("Patient.ndjson")).unwrap()
    );

    let (_d, store) = support::temp_store();
    let loaded = load_into_store(
        &*store,
        &[out.path().to_path_buf()],
        &LoadOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(loaded.invalid, 0, "{:?}", loaded.problems.first());
    assert_eq!(loaded.per_type, summary.per_type);
    let (current, broken) = support::check_references(&*store);
    assert!(broken.is_empty(), "{:?}", &broken[..3.min(broken.len())]);
    assert_eq!(current["Patient"], 7);
    // Every written resource has an id of its own: as many current resources as lines written.
    for (ty, n) in &summary.per_type {
        assert_eq!(current.get(ty), Some(n), "{ty}: repeated ids");
    }
    // Patients 0 and 5 come from the same seed patient but share no id.
    assert_eq!(
        store
            .count_type("Patient", store.current_seq().unwrap())
            .unwrap(),
        7
    );
    let seed_ids = [
        "fdedcde9-3aa5-411f-bbdc-85052ec4ef7f",
        "1ad52ff0-428a-4048-aff8-f7196a2da649",
    ];
    for id in seed_ids {
        assert!(store.read("Patient", id).is_err());
    }
}

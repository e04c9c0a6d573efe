//! `$import`'s chunk write ([`ingest::import::import_lines`]) against a real store: what an
//! InitialLoad line may keep of its `meta` (issue: a `lastUpdated` in the future was kept).

mod support;

use ingest::import::{ChunkOutcome, ImportMode, import_lines};
use serde_json::{Value, json};
use store::Store;

/// The job's start as `import_lines` gets it: what a line without `lastUpdated` keeps.
const JOB_START_MS: i64 = 1_700_000_000_000;

fn patient(id: &str, meta: Value) -> Vec<u8> {
    json!({"resourceType": "Patient", "id": id, "meta": meta, "gender": "female"})
        .to_string()
        .into_bytes()
}

fn initial_load(store: &dyn Store, lines: Vec<Vec<u8>>) -> ChunkOutcome {
    let numbered: Vec<(u64, Vec<u8>)> = (1..).zip(lines).collect();
    import_lines(
        store,
        &numbered,
        "Patient",
        ImportMode::InitialLoad,
        JOB_START_MS,
    )
    .unwrap()
}

fn stored_meta(store: &dyn Store, id: &str) -> Value {
    let json: Value = serde_json::from_slice(&store.read("Patient", id).unwrap().json).unwrap();
    json["meta"].clone()
}

/// The message of the error of `line`, which must be the one error of that line.
fn error_of(outcome: &ChunkOutcome, line: u64) -> String {
    let errors: Vec<_> = outcome.errors.iter().filter(|e| e.line == line).collect();
    assert_eq!(errors.len(), 1, "line {line}: {:?}", outcome.errors);
    errors[0].message.clone()
}

#[test]
fn initial_load_refuses_a_last_updated_in_the_future() {
    let (_d, store) = support::temp_store();
    let now = store.now_ms().unwrap();
    let tomorrow = store::format_instant_ms(now + 86_400_000);
    let outcome = initial_load(
        &*store,
        vec![
            patient("future", json!({"versionId": "2", "lastUpdated": tomorrow})),
            patient(
                "far-future",
                json!({"versionId": "1", "lastUpdated": "9999-12-31T23:59:59.999Z"}),
            ),
            // The same instant as the first, written with an offset.
            patient(
                "offset",
                json!({"lastUpdated": store::format_instant_ms(now + 86_400_000)
                    .replace('Z', "+00:00")}),
            ),
            patient(
                "past",
                json!({"versionId": "3", "lastUpdated": "2021-05-06T07:08:09.123Z"}),
            ),
        ],
    );
    assert_eq!(outcome.loaded, 1, "{:?}", outcome.errors);
    assert_eq!(outcome.errors.len(), 3, "{:?}", outcome.errors);
    for line in 1..=3 {
        let message = error_of(&outcome, line);
        assert!(message.contains("is in the future"), "{message}");
        assert!(message.contains("IncrementalLoad"), "{message}");
    }
    // The error file's line names the line and the resource.
    let outcome_json = outcome.errors[0].to_outcome();
    let diagnostics = outcome_json["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        diagnostics.starts_with("line 1 (Patient/future): meta.lastUpdated"),
        "{diagnostics}"
    );
    assert_eq!(outcome_json["issue"][0]["code"], "invalid");
    for id in ["future", "far-future", "offset"] {
        assert!(store.read("Patient", id).is_err(), "{id} was stored");
    }
    assert_eq!(
        stored_meta(&*store, "past"),
        json!({"versionId": "3", "lastUpdated": "2021-05-06T07:08:09.123Z"})
    );
    // Nothing written carries an instant after the store's now.
    let watermark = store.watermark().unwrap();
    assert!(
        store::parse_instant_ms(watermark.last_updated.as_deref().unwrap()).unwrap()
            >= store::parse_instant_ms("2021-05-06T07:08:09.123Z").unwrap()
    );
}

#[test]
fn initial_load_keeps_a_last_updated_up_to_now_and_far_in_the_past() {
    let (_d, store) = support::temp_store();
    let just_before = store::format_instant_ms(store.now_ms().unwrap() - 1);
    let outcome = initial_load(
        &*store,
        vec![
            patient("recent", json!({"lastUpdated": just_before})),
            patient("year-one", json!({"lastUpdated": "0001-01-01T00:00:00Z"})),
            patient(
                "offset",
                json!({"versionId": "12", "lastUpdated": "1900-01-01T00:30:00.5+01:00"}),
            ),
            patient("none", json!({"versionId": "4"})),
            patient(
                "largest-version",
                json!({"versionId": "9007199254740991", "lastUpdated": "2020-02-29T12:00:00Z"}),
            ),
        ],
    );
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    assert_eq!(outcome.loaded, 5);
    assert_eq!(stored_meta(&*store, "recent")["lastUpdated"], just_before);
    assert_eq!(
        stored_meta(&*store, "year-one"),
        json!({"versionId": "1", "lastUpdated": "0001-01-01T00:00:00.000Z"})
    );
    assert_eq!(
        stored_meta(&*store, "offset"),
        json!({"versionId": "12", "lastUpdated": "1899-12-31T23:30:00.500Z"})
    );
    assert_eq!(
        stored_meta(&*store, "none"),
        json!({"versionId": "4", "lastUpdated": store::format_instant_ms(JOB_START_MS)})
    );
    assert_eq!(
        store.read("Patient", "largest-version").unwrap().version,
        9_007_199_254_740_991
    );
    // The chunk run again (after a crash) finds its versions: loaded, nothing written twice.
    let before = store.current_seq().unwrap();
    let again = initial_load(
        &*store,
        vec![
            patient("recent", json!({"lastUpdated": just_before})),
            patient("year-one", json!({"lastUpdated": "0001-01-01T00:00:00Z"})),
        ],
    );
    assert!(again.errors.is_empty(), "{:?}", again.errors);
    assert_eq!(again.loaded, 2);
    assert_eq!(store.current_seq().unwrap(), before);
}

/// A `lastUpdated` that is no FHIR instant, or before year 1, is a line error, not a panic and
/// not a guess.
#[test]
fn initial_load_refuses_a_last_updated_that_is_no_instant() {
    let (_d, store) = support::temp_store();
    let bad: Vec<Value> = vec![
        json!("yesterday"),
        json!(""),
        json!("2020"),
        json!("2020-01-01"),
        // No time zone.
        json!("2020-01-01T00:00:00"),
        json!("2020-01-01T00:00:00.123"),
        // No seconds.
        json!("2020-01-01T00:00Z"),
        json!("2020-01-01 00:00:00Z"),
        json!("2020-01-01t00:00:00z"),
        json!("2020-13-01T00:00:00Z"),
        json!("2020-02-30T00:00:00Z"),
        json!("2020-01-01T25:00:00Z"),
        json!("2020-01-01T00:00:00+25:00"),
        // Before 0001-01-01T00:00:00Z.
        json!("0001-01-01T00:00:00+01:00"),
        json!("0000-06-01T00:00:00Z"),
        json!("-0001-01-01T00:00:00Z"),
        json!("+12020-01-01T00:00:00Z"),
        json!("99999-01-01T00:00:00Z"),
        json!(20200101),
        json!(null),
        json!({"value": "2020-01-01T00:00:00Z"}),
    ];
    let lines: Vec<Vec<u8>> = bad
        .iter()
        .enumerate()
        .map(|(i, t)| patient(&format!("p{i}"), json!({"lastUpdated": t})))
        .collect();
    let n = lines.len() as u64;
    let outcome = initial_load(&*store, lines);
    assert_eq!(outcome.loaded, 0, "{:?}", outcome.errors);
    for (line, text) in (1..=n).zip(&bad) {
        let message = error_of(&outcome, line);
        assert!(message.contains("lastUpdated"), "{text}: {message}");
    }
    assert_eq!(store.current_seq().unwrap(), 0);
}

/// `versionId` is kept only as the text of a version this server writes, and small enough that
/// later updates cannot overflow it.
#[test]
fn initial_load_refuses_a_version_id_it_cannot_keep() {
    let (_d, store) = support::temp_store();
    let bad = [
        "0",
        "01",
        "+1",
        "-1",
        " 1",
        "1.0",
        "",
        "x",
        "9007199254740992",
        "9223372036854775807",
        "99999999999999999999",
    ];
    let lines: Vec<Vec<u8>> = bad
        .iter()
        .enumerate()
        .map(|(i, v)| patient(&format!("p{i}"), json!({"versionId": v})))
        .collect();
    let outcome = initial_load(&*store, lines);
    assert_eq!(outcome.loaded, 0, "{:?}", outcome.errors);
    for (line, text) in (1..).zip(bad) {
        let message = error_of(&outcome, line);
        assert!(message.contains("versionId"), "{text}: {message}");
    }
    let outcome = initial_load(&*store, vec![patient("n", json!({"versionId": 3}))]);
    assert!(error_of(&outcome, 1).contains("versionId"));
    assert_eq!(store.current_seq().unwrap(), 0);
}

/// IncrementalLoad stamps the time of its write whatever the line's `meta` says.
#[test]
fn incremental_load_stamps_its_own_last_updated() {
    let (_d, store) = support::temp_store();
    let line = patient(
        "f",
        json!({"versionId": "7", "lastUpdated": "9999-12-31T23:59:59Z"}),
    );
    let outcome = import_lines(
        &*store,
        &[(1, line)],
        "Patient",
        ImportMode::IncrementalLoad,
        JOB_START_MS,
    )
    .unwrap();
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    let meta = stored_meta(&*store, "f");
    assert_eq!(meta["versionId"], "1");
    let stored = store::parse_instant_ms(meta["lastUpdated"].as_str().unwrap()).unwrap();
    assert!(stored <= store.now_ms().unwrap(), "{meta}");
}

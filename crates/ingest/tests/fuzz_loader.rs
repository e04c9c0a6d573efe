//! Property tests (fuzzing) of the loader's JSON reading, the loader over generated input files
//! and `POST /` Bundle processing, on Synthea resources (testdata/synthea-r4-100) mutated as text
//! (cuts, stray brackets and quotes, bad escapes and numbers, deep nesting, invalid UTF-8) and as
//! JSON. Properties:
//! - the loader's own JSON reader gives exactly what `serde_json` gives (values, key order,
//!   number text, error messages), and its streaming of Bundle entries, once its restarts are
//!   applied, gives exactly the items of the whole-document path;
//! - a load of generated NDJSON / Bundle / gzip files never panics, accounts for every line, and
//!   stores every valid resource byte-identical to its input (only `id`/`meta` stamped);
//! - `process_bundle` never panics, answers one entry per request entry, and a transaction
//!   that fails writes nothing.
//!
//! `PROPTEST_CASES` sets the cases per property, `FUZZ_SCALE` multiplies the small defaults
//! below (CI runs them as they are; the long run is `scripts/fuzz-long.sh`). Failures are not persisted: a failing case is printed, minimized, and
//! becomes a named regression test.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use ingest::source::{Unit, UnitEvent, stream_unit_items, unit_items};
use ingest::{BundleOptions, LoadOptions, load_into_store, process_bundle};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Map, Value, json};

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            // `FUZZ_SCALE` multiplies every property's own default (scripts/fuzz-long.sh).
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

/// Resources of a few Synthea patients, every type represented.
fn resources() -> &'static Vec<Value> {
    static R: OnceLock<Vec<Value>> = OnceLock::new();
    R.get_or_init(|| {
        let dir = support::testdata("synthea-r4-100");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
            .collect();
        files.sort();
        let mut out = Vec::new();
        for f in files.iter().take(3) {
            let mut text = String::new();
            flate2::read::GzDecoder::new(std::fs::File::open(f).unwrap())
                .read_to_string(&mut text)
                .unwrap();
            let b: Value = serde_json::from_str(&text).unwrap();
            for e in b["entry"].as_array().unwrap() {
                out.push(e["resource"].clone());
            }
        }
        assert!(out.len() > 300);
        out
    })
}

fn resource() -> impl Strategy<Value = Value> {
    any::<prop::sample::Index>().prop_map(|i| {
        let r = resources();
        r[i.index(r.len())].clone()
    })
}

const PIECES: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u",
    "\\ud800",
    "\\uDC00x",
    "1e999999",
    "-0",
    "0.10000000000000000000001",
    "01",
    "NaN",
    "null",
    "true",
    "\u{0}",
    "\u{feff}",
    "é",
    " ",
    "\"resourceType\":\"Bundle\",",
    "\"type\":\"collection\",",
    "\"entry\":[{}],",
    "\"id\":\"x\",",
    "\"$serde_json::private::Number\":\"1\",",
    "\"$serde_json::private::RawValue\":\"[1]\",",
];

/// JSON text of a resource with text-level edits.
fn mutated_text() -> impl Strategy<Value = Vec<u8>> {
    (
        resource(),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                0u8..6,
                prop::sample::select(PIECES),
                1usize..400,
            ),
            1..4,
        ),
    )
        .prop_map(|(r, edits)| {
            let mut t = serde_json::to_vec(&r).unwrap();
            for (at, kind, piece, n) in edits {
                let i = at.index(t.len() + 1);
                match kind {
                    0 | 1 => {
                        t.splice(i..i, piece.bytes());
                    }
                    2 => {
                        let end = (i + n).min(t.len());
                        t.drain(i..end);
                    }
                    3 => t.truncate(i),
                    4 => {
                        // Deep nesting in place of whatever is here.
                        let deep = format!("{}1{}", "[".repeat(n), "]".repeat(n));
                        t.splice(i..i, deep.bytes());
                    }
                    _ => {
                        // Not UTF-8.
                        t.splice(i..i, [0xff, 0xc3]);
                    }
                }
            }
            t
        })
}

/// A resource with JSON-level edits (odd values in real places).
fn mutated_resource() -> impl Strategy<Value = Value> {
    let odd = prop_oneof![
        Just(Value::Null),
        Just(json!([])),
        Just(json!({})),
        Just(json!([null])),
        Just(json!("")),
        Just(json!(" x ")),
        Just(serde_json::from_str::<Value>("1.50").unwrap()),
        Just(serde_json::from_str::<Value>("-1e400").unwrap()),
        Just(json!({"resourceType": "Patient"})),
        Just(json!({"extension": [{"url": 1}]})),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    (
        resource(),
        prop::collection::vec((any::<prop::sample::Index>(), odd), 1..4),
    )
        .prop_map(|(mut r, edits)| {
            for (at, v) in edits {
                let mut slots = Vec::new();
                paths(&r, &mut Vec::new(), &mut slots);
                let path = &slots[at.index(slots.len())];
                *pointer(&mut r, path) = v;
            }
            r
        })
}

fn paths(v: &Value, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                here.push(k.clone());
                paths(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(i.to_string());
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn pointer<'v>(v: &'v mut Value, path: &[String]) -> &'v mut Value {
    path.iter().fold(v, |v, seg| match v {
        Value::Array(a) => &mut a[seg.parse::<usize>().unwrap()],
        other => &mut other[seg.as_str()],
    })
}

fn file() -> Arc<Path> {
    Arc::from(Path::new("input.json"))
}

/// What a list of items is, as text.
fn describe(item: &Result<ingest::source::Item, (ingest::source::Location, String)>) -> String {
    format!("{item:?}")
}

/// The items of `unit_items`, as text.
fn whole_items(unit: Unit) -> Vec<String> {
    let mut out = Vec::new();
    unit_items(&file(), unit, &mut |item| {
        out.push(describe(&item));
        Ok(())
    })
    .unwrap();
    out
}

/// The items of `stream_unit_items`, restarts applied, as text.
fn streamed_items(unit: Unit) -> Vec<String> {
    let mut out = Vec::new();
    stream_unit_items(&file(), unit, &mut |event| {
        match event {
            UnitEvent::Item(item) => out.push(describe(&item)),
            UnitEvent::Restart => out.clear(),
        }
        Ok(())
    })
    .unwrap();
    out
}

/// A Bundle document around real and mutated entries, with `resourceType`/`type` before or
/// after `entry`, and sometimes repeated.
fn bundle_document() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(
            prop_oneof![
                resource().prop_map(|r| serde_json::to_vec(&json!({"resource": r})).unwrap()),
                mutated_resource().prop_map(|r| serde_json::to_vec(
                    &json!({"fullUrl": "urn:uuid:1", "resource": r})
                )
                .unwrap()),
                Just(b"{\"request\":{\"method\":\"DELETE\",\"url\":\"Patient/1\"}}".to_vec()),
                Just(b"{\"request\":{\"method\":\"DELETE\",\"url\":\"/Patient/a/b\"}}".to_vec()),
                Just(b"7".to_vec()),
                Just(b"{}".to_vec()),
            ],
            0..5,
        ),
        prop::sample::select(
            &[
                "transaction",
                "batch",
                "collection",
                "searchset",
                "document",
                "",
            ][..],
        ),
        0u8..5,
        any::<prop::sample::Index>(),
        mutated_text(),
    )
        .prop_map(|(entries, ty, layout, at, junk)| {
            let entries = format!(
                "[{}]",
                entries
                    .iter()
                    .map(|e| String::from_utf8_lossy(e).into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let head = format!("\"resourceType\":\"Bundle\",\"type\":\"{ty}\"");
            let mut doc = match layout {
                0 => format!("{{{head},\"entry\":{entries}}}").into_bytes(),
                1 => format!("{{\"entry\":{entries},{head}}}").into_bytes(),
                2 => format!("{{{head},\"entry\":{entries},\"entry\":[]}}").into_bytes(),
                3 => format!("{{{head},\"entry\":{entries},\"type\":\"document\"}}").into_bytes(),
                _ => format!(
                    "{{{head},\"entry\":{entries},\"x\":{}}}",
                    String::from_utf8_lossy(&junk)
                )
                .into_bytes(),
            };
            if layout == 4 {
                // And sometimes a cut in the middle.
                let i = at.index(doc.len() + 1);
                if i % 3 == 0 {
                    doc.truncate(i);
                }
            }
            doc
        })
}

/// The stored JSON the loader must produce for `r`: its own bytes, with `resourceType`, `id`
/// and `meta` (versionId and lastUpdated first) moved to the front.
fn expected_stored(r: &Value, stored: &store::StoredResource) -> Vec<u8> {
    let src = r.as_object().unwrap();
    let mut meta = Map::new();
    meta.insert("versionId".into(), json!(stored.version.to_string()));
    meta.insert("lastUpdated".into(), json!(stored.last_updated));
    if let Some(Value::Object(m)) = src.get("meta") {
        for (k, v) in m {
            if k != "versionId" && k != "lastUpdated" {
                meta.insert(k.clone(), v.clone());
            }
        }
    }
    let mut out = Map::new();
    out.insert("resourceType".into(), src["resourceType"].clone());
    out.insert("id".into(), src["id"].clone());
    out.insert("meta".into(), Value::Object(meta));
    for (k, v) in src {
        if !matches!(k.as_str(), "resourceType" | "id" | "meta") {
            out.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&Value::Object(out)).unwrap()
}

/// One input line of an NDJSON file.
#[derive(Debug, Clone)]
enum Line {
    /// A real resource, given a fresh id: it must be stored byte-identical.
    Valid(Value),
    /// Anything else; may or may not load.
    Other(Vec<u8>),
    Blank,
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        4 => resource().prop_map(Line::Valid),
        2 => mutated_text().prop_map(|mut t| {
            t.retain(|b| *b != b'\n');
            Line::Other(t)
        }),
        2 => mutated_resource().prop_map(|r| Line::Other(serde_json::to_vec(&r).unwrap())),
        1 => Just(Line::Blank),
    ]
}

fn write_file(path: &Path, bytes: &[u8], gzip: bool) {
    let mut f = std::fs::File::create(path).unwrap();
    if gzip {
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap();
    } else {
        f.write_all(bytes).unwrap();
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// One NDJSON line: the loader's reader agrees with `ingest::strict_json` exactly (`from_str`
    /// on the trimmed text, `from_slice` on a line that is not UTF-8), and what it reads is what
    /// `serde_json` reads (which also takes a repeated key, keeping its last value).
    #[test]
    fn ndjson_lines_read_exactly_as_serde_json(text in mutated_text()) {
        let mut line = text;
        line.retain(|b| *b != b'\n');
        let items = whole_items(Unit::Lines { first_line: 7, lines: vec![line.clone()] });
        let expected = match std::str::from_utf8(&line) {
            Ok(t) if t.trim().is_empty() => {
                prop_assert!(items.is_empty());
                return Ok(());
            }
            Ok(t) => ingest::strict_json::from_str(t.trim()),
            Err(_) => ingest::strict_json::from_slice(line.trim_ascii()),
        };
        if let Ok(v) = &expected {
            let serde = serde_json::from_slice::<Value>(line.trim_ascii()).ok();
            prop_assert_eq!(serde.as_ref(), Some(v));
        }
        prop_assert_eq!(items.len(), 1);
        prop_assert!(items[0].contains("line: Some(7)"), "{}", items[0]);
        match expected {
            Ok(v) => {
                let want = format!("Ok(Item {{ location: Location {{ file: \"input.json\", line: Some(7), entry: None }}, full_url: None, content: Resource({v:?}) }})");
                prop_assert_eq!(&items[0], &want);
            }
            Err(e) => {
                let want = format!("{:?}", format!("malformed JSON: {e}"));
                prop_assert!(items[0].starts_with("Err(") && items[0].contains(&want), "{} vs {}", items[0], want);
            }
        }
    }

    /// A `.json` document: streaming its entries (restarts applied) gives the items of the
    /// whole-document path, and a document that is not a Bundle of entries is one item equal
    /// to `ingest::strict_json::from_slice`'s value (`serde_json`'s, without repeated keys).
    #[test]
    fn streamed_documents_give_the_whole_document_items(doc in prop_oneof![bundle_document(), mutated_text()]) {
        let whole = whole_items(Unit::Document(doc.clone()));
        let streamed = streamed_items(Unit::Document(doc.clone()));
        prop_assert_eq!(&streamed, &whole);
        if let Ok(v) = ingest::strict_json::from_slice(&doc) {
            let entry_bundle = v["resourceType"] == "Bundle"
                && matches!(v["type"].as_str(), Some("transaction" | "batch" | "collection" | "searchset"));
            if !entry_bundle {
                prop_assert_eq!(whole.len(), 1);
                let want = format!("Resource({v:?})");
                prop_assert!(whole[0].contains(&want), "{} vs {}", whole[0], want);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(24))]

    /// A load of generated files (NDJSON, gzipped NDJSON and a Bundle document) never panics,
    /// counts every non-blank line, and stores every valid resource byte-identical.
    #[test]
    fn loads_of_generated_files_keep_valid_resources_byte_identical(
        files in prop::collection::vec((prop::collection::vec(line(), 0..12), any::<bool>()), 1..4),
        bundle in prop::option::of(bundle_document()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir(&input).unwrap();
        let mut valid = Vec::new();
        let mut lines = 0u64;
        for (f, (content, gzip)) in files.iter().enumerate() {
            let mut bytes = Vec::new();
            for (l, line) in content.iter().enumerate() {
                match line {
                    Line::Valid(r) => {
                        let mut r = r.clone();
                        r["id"] = json!(format!("v{f}-{l}"));
                        bytes.extend(serde_json::to_vec(&r).unwrap());
                        valid.push(r);
                        lines += 1;
                    }
                    Line::Other(t) => {
                        bytes.extend(t);
                        if !String::from_utf8_lossy(t).trim().is_empty() {
                            lines += 1;
                        }
                    }
                    Line::Blank => bytes.extend(b"   "),
                }
                bytes.push(b'\n');
            }
            let name = if *gzip { format!("f{f}.ndjson.gz") } else { format!("f{f}.ndjson") };
            write_file(&input.join(name), &bytes, *gzip);
        }
        if let Some(b) = &bundle {
            write_file(&input.join("zz-bundle.json"), b, false);
        }
        let (_sd, store) = support::temp_store();
        let summary = load_into_store(&*store, std::slice::from_ref(&input), &LoadOptions::default(), &mut |_| {});
        let summary = match summary {
            Ok(s) => s,
            Err(e) => return Err(TestCaseError::fail(format!("load failed: {e}"))),
        };
        if bundle.is_none() {
            // Every non-blank line was either written (create or update) or reported.
            prop_assert_eq!(summary.written() + summary.deleted + summary.invalid, lines, "{:?}", summary);
        }
        for r in &valid {
            let ty = r["resourceType"].as_str().unwrap();
            let id = r["id"].as_str().unwrap();
            let stored = store.read(ty, id);
            prop_assert!(stored.is_ok(), "{ty}/{id}: {:?} {:?}", stored.err(), summary.problems);
            let stored = stored.unwrap();
            if stored.version == 1 {
                prop_assert_eq!(
                    String::from_utf8(stored.json.clone()).unwrap(),
                    String::from_utf8(expected_stored(r, &stored)).unwrap()
                );
            }
        }
    }
}

fn bundle_entry() -> impl Strategy<Value = Value> {
    let method =
        prop::sample::select(&["POST", "PUT", "DELETE", "GET", "PATCH", "HEAD", "post", ""][..]);
    let url = prop_oneof![
        Just("Patient".to_string()),
        Just("Patient/".to_string()),
        Just("Observation?code=1".to_string()),
        Just("Patient/a/_history/1".to_string()),
        Just("../../etc".to_string()),
        Just("/Patient/p1".to_string()),
        Just("http://other/fhir/Patient/p1".to_string()),
        "(Patient|Observation|Unknown)/[a-zA-Z0-9.-]{0,70}".prop_map(|s| s),
        "\\PC{0,16}".prop_map(|s| s),
    ];
    let full_url = prop::option::of(prop_oneof![
        Just("urn:uuid:3b5c1d2e-0000-4000-8000-000000000001".to_string()),
        Just("urn:uuid:".to_string()),
        Just("urn:oid:1.2.3".to_string()),
        "\\PC{0,12}".prop_map(|s| s),
    ]);
    let body = prop_oneof![
        resource().prop_map(Some),
        mutated_resource().prop_map(Some),
        Just(None),
        Just(Some(json!("not an object"))),
    ];
    let if_match = prop::option::of(prop::sample::select(
        &[
            "W/\"1\"",
            "W/\"\"",
            "\"9999999999999999999999\"",
            "x",
            "W/\"-1\"",
        ][..],
    ));
    (method, url, full_url, body, if_match).prop_map(|(m, u, f, b, im)| {
        let mut e = json!({"request": {"method": m, "url": u}});
        if let Some(f) = f {
            e["fullUrl"] = json!(f);
        }
        if let Some(b) = b {
            e["resource"] = b;
        }
        if let Some(im) = im {
            e["request"]["ifMatch"] = json!(im);
        }
        e
    })
}

proptest! {
    #![proptest_config(config(48))]

    /// `process_bundle`: no panic, one response entry per entry, and a failed transaction
    /// writes nothing.
    #[test]
    fn bundles_never_panic_and_failed_transactions_write_nothing(
        ty in prop::sample::select(&["transaction", "batch", "collection", "Transaction", ""][..]),
        entries in prop::collection::vec(bundle_entry(), 0..8),
        validate in any::<bool>(),
        return_resources in any::<bool>(),
        extra in prop::option::of(prop_oneof![Just(json!(null)), Just(json!({})), Just(json!([1]))]),
    ) {
        let (_sd, store) = support::temp_store();
        // Something to update, delete and read.
        store.write(vec![store::WriteOp::Update {
            resource_type: "Patient".into(),
            id: "p1".into(),
            resource: json!({"resourceType": "Patient", "id": "p1"}),
            if_match: None,
        }]).unwrap();
        let before = store.current_seq().unwrap();
        let n = match &extra {
            None => entries.len(),
            Some(Value::Array(a)) => a.len(),
            Some(_) => 0,
        };
        let mut bundle = json!({"resourceType": "Bundle", "type": ty, "entry": entries});
        if let Some(x) = extra {
            bundle["entry"] = x;
        }
        let result = process_bundle(&*store, bundle, &BundleOptions { validate, return_resources, ..BundleOptions::default() });
        match result {
            Ok(resp) => {
                let got = resp["entry"].as_array().map_or(0, Vec::len);
                prop_assert_eq!(got, n, "{}", resp);
            }
            Err(_) if ty == "transaction" => {
                prop_assert_eq!(store.current_seq().unwrap(), before);
            }
            Err(_) => {}
        }
    }
}

// Regressions found by the properties above, minimized.

/// One NDJSON line that is not UTF-8 failed the whole load ("stream did not contain valid
/// UTF-8", every other line and file lost); it is one malformed line, reported at its place.
#[test]
fn a_line_that_is_not_utf8_is_reported_and_the_rest_loads() {
    let dir = tempfile::tempdir().unwrap();
    for gzip in [false, true] {
        let path = dir
            .path()
            .join(if gzip { "p.ndjson.gz" } else { "p.ndjson" });
        let mut bytes = b"{\"resourceType\":\"Patient\",\"id\":\"a\"}\n".to_vec();
        bytes.extend(b"{\"resourceType\":\"Patient\",\"id\":\"\xff\"}\n");
        bytes.extend(b"{\"resourceType\":\"Patient\",\"id\":\"b\"}\n");
        write_file(&path, &bytes, gzip);
        let (_sd, store) = support::temp_store();
        let summary = load_into_store(
            &*store,
            std::slice::from_ref(&path),
            &LoadOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(summary.written(), 2);
        assert_eq!(summary.invalid, 1);
        let p = &summary.problems[0];
        assert!(p.location.ends_with(":2"), "{p:?}");
        assert!(p.message.contains("malformed JSON"), "{p:?}");
        std::fs::remove_file(&path).unwrap();
    }
}

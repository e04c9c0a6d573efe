//! The stream over JSON bytes (`Engine::anonymize_json`, plan/stream.rs) against the tree path
//! (parse, `Engine::anonymize`, `serde_json::to_vec`): byte-identical output, the same rule hits
//! and the same errors, on
//! - every Synthea resource of `testdata/synthea-r4-100` and the Bundles themselves, as they
//!   come and as the store keeps them (compact, `id` and `meta` first, `meta.versionId` and
//!   `meta.lastUpdated` set),
//! - the resources of `testdata/synthea-seed` (what `fhirhose synth` copies with new ids and
//!   dates) stored the same way,
//! - the corpus inputs under every R4 corpus configuration,
//! - generated variations of stored resources (whitespace, escapes, nulls, empty and single
//!   values, shadows, unknown and repeated keys, `meta` shapes, nesting, numbers).
//!
//! Random methods are made deterministic first (`encrypt` → `cryptoHash`, `perturb` span 0).

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use deid::{Config, Engine};
use proptest::prelude::*;
use serde_json::{Map, Value as Json, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn read_json(p: &Path) -> Option<Json> {
    let text = std::fs::read_to_string(p).ok()?;
    serde_json::from_str(text.trim_start_matches('\u{feff}')).ok()
}

fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 1, 1).unwrap()
}

/// encrypt and perturb draw random numbers; make them deterministic.
fn deterministic(mut config: Json) -> Json {
    if let Some(Json::Array(rules)) = config.get_mut("fhirPathRules") {
        for r in rules.iter_mut() {
            match r
                .get("method")
                .and_then(Json::as_str)
                .map(str::to_lowercase)
            {
                Some(m) if m == "encrypt" => r["method"] = json!("cryptoHash"),
                Some(m) if m == "perturb" => {
                    r["span"] = json!(0);
                    r["rangeType"] = json!("fixed");
                }
                _ => {}
            }
        }
    }
    config
}

fn engine(config: &Json) -> Option<Engine> {
    let config = Config::parse(&deterministic(config.clone()).to_string()).ok()?;
    Some(Engine::new(config).with_today(today()))
}

/// The Microsoft sample configuration with fixed keys (what the export benchmark runs).
fn sample() -> Engine {
    let mut c =
        read_json(&root().join("tests/corpus/shipped-configs/r4-configuration-sample.json"))
            .unwrap();
    c["parameters"]["cryptoHashKey"] = json!("bench-hash-key");
    c["parameters"]["encryptKey"] = json!("0123456789abcdef0123456789abcdef");
    c["parameters"]["dateShiftKey"] = json!("bench-shift-key");
    engine(&c).unwrap()
}

/// Rules that stress the stream: order, inheritance, `Type` rules, `nodesByName`, nested
/// resources, the root id before and after date shifts, a rule inside `meta`.
fn stress() -> Vec<Engine> {
    let params = json!({"dateShiftKey": "k", "cryptoHashKey": "h", "encryptKey": "",
        "enablePartialDatesForRedact": true, "enablePartialZipCodesForRedact": true,
        "enablePartialAgesForRedact": true});
    let order = json!({"fhirVersion": "R4", "processingErrors": "raise", "parameters": params,
    "fhirPathRules": [
        {"path": "nodesByType('HumanName').family", "method": "keep"},
        {"path": "Patient.name", "method": "redact"},
        {"path": "nodesByName('birthDate')", "method": "dateShift"},
        {"path": "nodesByType('dateTime')", "method": "dateShift"},
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
        {"path": "Bundle.entry.resource.meta", "method": "keep"},
        {"path": "Bundle.entry.fullUrl", "method": "cryptoHash"},
        {"path": "nodesByName('value')", "method": "keep"},
        {"path": "nodesByType('Identifier')", "method": "redact"},
        {"path": "Patient.address.postalCode", "method": "redact"},
        {"path": "nodesByType('Address')", "method": "redact"},
        {"path": "nodesByType('date')", "method": "redact"},
        {"path": "nodesByName('contained')", "method": "keep"},
        {"path": "Encounter", "method": "redact"},
        {"path": "nodesByType('Coding').display", "method": "redact"},
        {"path": "nodesByName('text')", "method": "redact"},
        {"path": "nodesByType('instant')", "method": "dateShift"},
        {"path": "nodesByType('decimal')", "method": "cryptoHash"},
        {"path": "nodesByType('boolean')", "method": "cryptoHash"},
        {"path": "Condition.meta.tag", "method": "redact"}
    ]});
    let root_rules = json!({"fhirVersion": "R4", "processingErrors": "raise", "parameters": params,
    "fhirPathRules": [
        {"path": "Observation", "method": "keep"},
        {"path": "Patient", "method": "redact"},
        {"path": "nodesByType('Extension')", "method": "redact"},
        {"path": "nodesByType('instant')", "method": "redact"},
        {"path": "Resource.id", "method": "encrypt"},
        {"path": "nodesByType('string')", "method": "redact"},
        {"path": "nodesByType('code')", "method": "cryptoHash"}
    ]});
    [order, root_rules].iter().filter_map(engine).collect()
}

/// What the tree path writes, or its error.
fn tree(engine: &Engine, input: &[u8]) -> Result<(Vec<u8>, Vec<u64>, bool), String> {
    let v: Json = serde_json::from_slice(input).map_err(|e| format!("invalid input: {e}"))?;
    let o = engine.anonymize(v).map_err(|e| e.to_string())?;
    Ok((
        serde_json::to_vec(&o.resource).unwrap(),
        o.rule_hits,
        o.skipped,
    ))
}

/// Compares both paths on one input; whether the stream wrote it.
fn same(engine: &Engine, input: &[u8], what: &str) -> bool {
    let expected = tree(engine, input);
    let mut out = b"prefix".to_vec();
    let got = engine.anonymize_json(input, &mut out);
    match (expected, got) {
        (Ok((bytes, hits, skipped)), Ok(w)) => {
            assert_eq!(
                String::from_utf8_lossy(&out[6..]),
                String::from_utf8_lossy(&bytes),
                "{what}: output differs (streamed: {}) for input {}",
                w.streamed,
                String::from_utf8_lossy(input)
            );
            assert_eq!(&out[..6], b"prefix");
            assert_eq!(w.rule_hits, hits, "{what}: rule hits differ");
            assert_eq!(w.skipped, skipped, "{what}");
            w.streamed
        }
        (Err(e), Err(g)) => {
            assert_eq!(out, b"prefix", "{what}: output written on error");
            // The tree path's parse error is worded by this test; compare the rest.
            if !e.starts_with("invalid input") {
                assert_eq!(e, g.to_string(), "{what}");
            }
            false
        }
        (e, g) => panic!(
            "{what}: tree {:?} vs anonymize_json {:?} for input {}",
            e.map(|(b, _, _)| String::from_utf8_lossy(&b).into_owned()),
            g.map(|_| String::from_utf8_lossy(&out).into_owned()),
            String::from_utf8_lossy(input)
        ),
    }
}

/// A resource as the store keeps it: compact, `resourceType`, `id`, `meta` (versionId and
/// lastUpdated first) and then the rest in order.
fn stored(v: &Json, version: u32) -> Vec<u8> {
    let Json::Object(o) = v else {
        return serde_json::to_vec(v).unwrap();
    };
    let mut out = Map::new();
    out.insert("resourceType".into(), o["resourceType"].clone());
    if let Some(id) = o.get("id") {
        out.insert("id".into(), id.clone());
    }
    let mut meta = Map::new();
    meta.insert("versionId".into(), json!(version.to_string()));
    meta.insert(
        "lastUpdated".into(),
        json!(format!(
            "2026-12-0{}T01:02:03.{:03}Z",
            version % 9 + 1,
            version % 1000
        )),
    );
    if let Some(Json::Object(m)) = o.get("meta") {
        for (k, v) in m {
            if k != "versionId" && k != "lastUpdated" {
                meta.insert(k.clone(), v.clone());
            }
        }
    }
    out.insert("meta".into(), Json::Object(meta));
    for (k, v) in o {
        if !matches!(k.as_str(), "resourceType" | "id" | "meta") {
            out.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&Json::Object(out)).unwrap()
}

fn bundles(dir: &str) -> Vec<Json> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("../../testdata").join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let mut text = String::new();
            flate2::read::GzDecoder::new(std::fs::File::open(f).unwrap())
                .read_to_string(&mut text)
                .unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .collect()
}

fn entries(bundles: &[Json]) -> Vec<Json> {
    bundles
        .iter()
        .flat_map(|b| b["entry"].as_array().into_iter().flatten())
        .map(|e| e["resource"].clone())
        .collect()
}

/// Nesting as deep as the tree path's parser allows, and past it: the stream writes a resource
/// only where the tree path would (an extension nests an object in an array, and `serde_json`
/// counts both toward its 128 levels). The stream counted only objects, so a Patient with 63 to
/// 98 nested extensions was written by `anonymize_json` and refused by the tree path.
#[test]
fn deeply_nested_extensions_stream_only_where_the_tree_path_parses() {
    let engines = [("sample", sample())];
    for (name, engine) in &engines {
        for levels in [10, 40, 49, 50, 51, 62, 63, 64, 97, 98, 99, 130] {
            let mut ext = serde_json::json!({"url": "http://example.org/leaf", "valueString": "x"});
            for _ in 1..levels {
                ext = serde_json::json!({"url": "http://example.org/nest", "extension": [ext]});
            }
            let patient =
                serde_json::json!({"resourceType": "Patient", "id": "p", "extension": [ext]});
            same(
                engine,
                patient.to_string().as_bytes(),
                &format!("{name}: {levels} nested extensions"),
            );
        }
    }
}

#[test]
fn synthea_and_synth_seed_resources_stream_to_the_tree_paths_bytes() {
    let synthea = bundles("synthea-r4-100");
    let seed = bundles("synthea-seed");
    let mut engines = vec![("sample", sample())];
    engines.extend(stress().into_iter().map(|e| ("stress", e)));
    for (name, engine) in &engines {
        let (mut n, mut streamed) = (0usize, 0usize);
        let mut check = |input: &[u8], what: &str| {
            n += 1;
            streamed += usize::from(same(engine, input, what));
        };
        for (i, r) in entries(&synthea).iter().enumerate() {
            check(&stored(r, i as u32), &format!("{name} stored synthea {i}"));
            // As the input comes (no meta) for the sample configuration; a tenth for the rest.
            if *name == "sample" || i % 10 == 0 {
                check(
                    &serde_json::to_vec(r).unwrap(),
                    &format!("{name} synthea {i}"),
                );
            }
        }
        for (i, r) in entries(&seed).iter().enumerate() {
            check(&stored(r, i as u32), &format!("{name} stored seed {i}"));
        }
        for (i, b) in synthea.iter().take(3).chain(seed.iter()).enumerate() {
            check(
                &serde_json::to_vec(b).unwrap(),
                &format!("{name} bundle {i}"),
            );
        }
        println!("{name}: {n} inputs equal, {streamed} streamed");
        if *name == "sample" {
            // Everything but the types with FHIRPath rules (FamilyMemberHistory) and the
            // Bundles (their entries' types) streams.
            assert!(streamed * 10 > n * 9, "{streamed} of {n} streamed");
        }
    }
}

#[test]
fn corpus_inputs_under_corpus_configurations() {
    let cases = root().join("tests/corpus/cases");
    let mut inputs = Vec::new();
    let mut configs = Vec::new();
    for entry in std::fs::read_dir(&cases).unwrap() {
        let p = entry.unwrap().path();
        if let Some(v) = read_json(&p.join("input.json")) {
            inputs.push(v);
        }
        if let Some(c) = read_json(&p.join("config.json")) {
            configs.push((p.display().to_string(), c));
        }
    }
    for entry in std::fs::read_dir(root().join("tests/corpus/shipped-configs")).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("r4-")
            && let Some(c) = read_json(&p)
        {
            configs.push((p.display().to_string(), c));
        }
    }
    configs.sort_by(|a, b| a.0.cmp(&b.0));
    let (mut n, mut streamed) = (0usize, 0usize);
    for (name, config) in &configs {
        let Some(engine) = engine(config) else {
            continue;
        };
        for (i, input) in inputs.iter().enumerate() {
            for bytes in [serde_json::to_vec(input).unwrap(), stored(input, 3)] {
                n += 1;
                streamed += usize::from(same(&engine, &bytes, &format!("{name} input {i}")));
            }
        }
    }
    println!("corpus: {n} (config, input) pairs equal, {streamed} streamed");
    assert!(streamed > 0);
}

/// Stored resources to vary: a few of each shape.
fn pool() -> Vec<Json> {
    let mut out: Vec<Json> = entries(&bundles("synthea-seed"))
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 25 == 0)
        .map(|(_, r)| r)
        .collect();
    out.push(json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "1-8", "display": "x"}], "text": "t"},
        "contained": [{"resourceType": "Patient", "id": "p1", "birthDate": "1950-02-03",
            "name": [{"family": "F", "given": ["G"]}], "address": [{"postalCode": "03601", "state": "MA"}]}],
        "subject": {"reference": "#p1"},
        "valueQuantity": {"value": 12.340, "unit": "mg"},
        "component": [{"code": {"text": "c"}, "valueQuantity": {"value": 1e3, "unit": "kg"}}],
        "effectiveDateTime": "2020-01-02T03:04:05Z"}));
    out.push(
        json!({"resourceType": "Bundle", "id": "b1", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "p2",
            "meta": {"security": [{"code": "redacted"}], "tag": [{"code": "t"}]},
            "birthDate": "1920-02-03", "deceasedBoolean": false}},
        {"fullUrl": "urn:uuid:2", "resource": {"resourceType": "Condition", "id": "c2",
            "meta": {"tag": [{"code": "t"}]},
            "subject": {"reference": "urn:uuid:1"}, "onsetDateTime": "2001-03-04"}}]}),
    );
    out
}

/// One change to a resource's JSON tree, somewhere along a path chosen by `pick`.
#[derive(Debug, Clone)]
enum Mutation {
    /// A string gets leading or trailing white space (ASCII or not).
    Pad(usize, &'static str),
    /// A string gets a character that `serde_json` escapes.
    Escape(usize, &'static str),
    /// A member becomes `null`, `[]`, `{}` or `""`.
    Empty(usize, u8),
    /// A one-element array becomes its element.
    Single(usize),
    /// A member is added: unknown, a shadow, an extension, a contained resource.
    Add(usize, u8),
    /// `meta` changes: removed, `null`, emptied, with security or tags.
    Meta(u8),
    /// A number's text changes (exponent, trailing zeros, negative zero).
    Number(usize, u8),
    /// The root `id` moves after another member.
    IdLater,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (
            any::<usize>(),
            prop::sample::select(vec![" ", "\u{a0}", "\t", "\u{3000}", "  x "])
        )
            .prop_map(|(i, s)| Mutation::Pad(i, s)),
        (
            any::<usize>(),
            prop::sample::select(vec!["\"", "\\", "\n", "\u{1}", "/", "é", "\u{2028}"])
        )
            .prop_map(|(i, s)| Mutation::Escape(i, s)),
        (any::<usize>(), 0u8..4).prop_map(|(i, k)| Mutation::Empty(i, k)),
        any::<usize>().prop_map(Mutation::Single),
        (any::<usize>(), 0u8..6).prop_map(|(i, k)| Mutation::Add(i, k)),
        (0u8..7).prop_map(Mutation::Meta),
        (any::<usize>(), 0u8..4).prop_map(|(i, k)| Mutation::Number(i, k)),
        Just(Mutation::IdLater),
    ]
}

/// Paths to every value under `v` (object members and array items), pre-order.
fn paths(v: &Json, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Json::Object(o) => {
            for (k, c) in o {
                here.push(k.clone());
                out.push(here.clone());
                paths(c, here, out);
                here.pop();
            }
        }
        Json::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(format!("#{i}"));
                out.push(here.clone());
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn at<'j>(v: &'j mut Json, path: &[String]) -> Option<&'j mut Json> {
    let mut cur = v;
    for s in path {
        cur = match s.strip_prefix('#') {
            Some(i) => cur.as_array_mut()?.get_mut(i.parse::<usize>().ok()?)?,
            None => cur.as_object_mut()?.get_mut(s)?,
        };
    }
    Some(cur)
}

/// The `n`th (modulo) path whose value satisfies `want`.
fn pick(v: &Json, n: usize, want: impl Fn(&Json) -> bool) -> Option<Vec<String>> {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let mut fitting: Vec<Vec<String>> = all
        .into_iter()
        .filter(|p| {
            let mut c = v.clone();
            at(&mut c, p).is_some_and(|x| want(x))
        })
        .collect();
    if fitting.is_empty() {
        return None;
    }
    let i = n % fitting.len();
    Some(fitting.swap_remove(i))
}

fn mutate(v: &mut Json, m: &Mutation) {
    match m {
        Mutation::Pad(n, s) => {
            if let Some(p) = pick(v, *n, Json::is_string)
                && let Some(Json::String(t)) = at(v, &p)
            {
                if n % 2 == 0 {
                    *t = format!("{s}{t}");
                } else {
                    t.push_str(s);
                }
            }
        }
        Mutation::Escape(n, s) => {
            if let Some(p) = pick(v, *n, Json::is_string)
                && let Some(Json::String(t)) = at(v, &p)
            {
                let mid = t
                    .char_indices()
                    .nth(t.chars().count() / 2)
                    .map_or(0, |c| c.0);
                t.insert_str(mid, s);
            }
        }
        Mutation::Empty(n, k) => {
            if let Some(p) = pick(v, *n, |_| true)
                && let Some(slot) = at(v, &p)
            {
                *slot = match k {
                    0 => Json::Null,
                    1 => json!([]),
                    2 => json!({}),
                    _ => json!(""),
                };
            }
        }
        Mutation::Single(n) => {
            if let Some(p) = pick(v, *n, |x| x.as_array().is_some_and(|a| a.len() == 1))
                && let Some(slot) = at(v, &p)
            {
                let one = slot[0].take();
                *slot = one;
            }
        }
        Mutation::Add(n, k) => {
            if let Some(p) = pick(v, *n, Json::is_object)
                && let Some(Json::Object(o)) = at(v, &p)
            {
                match k {
                    0 => {
                        o.insert("notAnElement".into(), json!(1));
                    }
                    1 => {
                        o.insert("_status".into(), json!({"extension": []}));
                    }
                    2 => {
                        o.insert(
                            "extension".into(),
                            json!([{"url": "http://x", "valueString": " s "}]),
                        );
                    }
                    3 => {
                        o.insert(
                            "contained".into(),
                            json!([{"resourceType": "Patient", "id": "c", "gender": "male",
                                "birthDate": "1900-01-01"}]),
                        );
                    }
                    4 => {
                        o.insert("resourceType".into(), json!("Patient"));
                    }
                    _ => {
                        o.insert("id".into(), json!(" padded-id "));
                    }
                }
            }
        }
        Mutation::Meta(k) => {
            let Some(o) = v.as_object_mut() else { return };
            match k {
                0 => {
                    o.shift_remove("meta");
                }
                1 => {
                    o.insert("meta".into(), Json::Null);
                }
                2 => {
                    o.insert("meta".into(), json!({}));
                }
                3 => {
                    o.insert(
                        "meta".into(),
                        json!({"versionId": "1", "lastUpdated": "2020-01-01T00:00:00.100Z",
                            "security": [{"system": "s", "code": "redacted"}]}),
                    );
                }
                4 => {
                    o.insert(
                        "meta".into(),
                        json!({"lastUpdated": "2020-01-01T00:00:00Z", "tag": []}),
                    );
                }
                5 => {
                    o.insert("meta".into(), json!({"security": null, "versionId": "2"}));
                }
                _ => {
                    o.insert("meta".into(), json!("not an object"));
                }
            }
        }
        Mutation::Number(n, k) => {
            if let Some(p) = pick(v, *n, Json::is_number)
                && let Some(slot) = at(v, &p)
            {
                let text = match k {
                    0 => "1.50E+2",
                    1 => "-0",
                    2 => "12.3400",
                    _ => "123456789012345678901234567890",
                };
                *slot = Json::Number(text.parse().unwrap());
            }
        }
        Mutation::IdLater => {
            if let Some(o) = v.as_object_mut()
                && let Some(id) = o.shift_remove("id")
            {
                o.insert("id".into(), id);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn varied_resources_stream_to_the_tree_paths_bytes(
        base in 0usize..1000,
        mutations in prop::collection::vec(mutation(), 0..4),
        as_stored in any::<bool>(),
        text_edit in 0u8..12,
    ) {
        thread_local! {
            static SETUP: (Vec<Json>, Vec<Engine>) = {
                let mut engines = vec![sample()];
                engines.extend(stress());
                (pool(), engines)
            };
        }
        SETUP.with(|(pool, engines)| {
            let mut v = pool[base % pool.len()].clone();
            for m in &mutations {
                mutate(&mut v, m);
            }
            let mut bytes = if as_stored && v.is_object() && v.get("resourceType").is_some() {
                stored(&v, 7)
            } else {
                serde_json::to_vec(&v).unwrap()
            };
            // Edits of the text itself: whitespace, a repeated key, escapes a tree hides.
            let s = String::from_utf8(bytes.clone()).unwrap();
            match text_edit {
                0 => bytes = s.replacen(",\"", ", \"", 1).into_bytes(),
                1 => bytes = s.replacen("{\"resourceType\"", "{\"status\":\"x\",\"resourceType\"", 1).into_bytes(),
                2 => bytes = s.replacen("\"status\":", "\"status\":\"final\",\"status\":", 1).into_bytes(),
                3 => bytes = s.replacen("/", "\\/", 1).into_bytes(),
                4 => bytes.push(b'\n'),
                _ => {}
            }
            for (i, engine) in engines.iter().enumerate() {
                same(engine, &bytes, &format!("engine {i}, {mutations:?}, edit {text_edit}"));
            }
        });
    }
}

/// Hostile bytes: every prefix of stored resources (unterminated strings, escapes and
/// multi-byte characters cut at the end), invalid UTF-8 in keys and values, repeated keys at
/// every level, keys one byte off the model's (short and longer than 16 bytes), deep nesting.
/// The stream must not panic and must do what the tree path does (its bytes or its error).
#[test]
fn malformed_bytes_stream_as_the_tree_path_decides() {
    let synthea = bundles("synthea-r4-100");
    let picked: Vec<Vec<u8>> = entries(&synthea)
        .iter()
        .filter(|r| {
            let ty = r["resourceType"].as_str().unwrap_or_default();
            matches!(ty, "Observation" | "Patient" | "Claim" | "Encounter")
        })
        .step_by(97)
        .take(4)
        .enumerate()
        .map(|(i, r)| stored(r, i as u32))
        .collect();
    assert_eq!(picked.len(), 4);
    let engine = sample();
    let mut n = 0usize;
    let mut check = |input: &[u8], what: &str| {
        n += 1;
        same(&engine, input, what);
    };
    for (i, r) in picked.iter().enumerate() {
        let text = String::from_utf8(r.clone()).unwrap();
        for cut in 0..r.len() {
            check(&r[..cut], &format!("{i} cut at {cut}"));
            let mut escaped = r[..cut].to_vec();
            escaped.push(b'\\');
            check(&escaped, &format!("{i} cut at {cut}, backslash"));
        }
        // A multi-byte character cut after its first byte, and bytes no UTF-8 has.
        for bad in [&b"\xc3"[..], b"\xff", b"\xe2\x80", b"\xed\xa0\x80"] {
            for at in [r.len() / 3, r.len() / 2, r.len() - 2] {
                let mut v = r.clone();
                v.splice(at..at, bad.iter().copied());
                check(&v, &format!("{i} {bad:?} at {at}"));
            }
        }
        // Every key repeated (with its value) and every key one byte off the model's.
        let keys: Vec<(usize, usize)> = text
            .match_indices("\":")
            .filter_map(|(end, _)| text[..end].rfind('"').map(|start| (start + 1, end)))
            .collect();
        for &(start, end) in &keys {
            let value_end = text[end + 2..]
                .find([',', '}'])
                .map_or(text.len(), |e| end + 2 + e);
            let member = &text[start - 1..value_end];
            if !member.contains(['{', '[']) {
                let repeated = format!("{},{member}{}", &text[..value_end], &text[value_end..]);
                check(repeated.as_bytes(), &format!("{i} repeated {member}"));
            }
            for at in [start, (start + end) / 2, end - 1] {
                let mut v = r.clone();
                v[at] ^= 1;
                check(&v, &format!("{i} key byte {at} of {}", &text[start..end]));
            }
        }
    }
    // Nested extensions deeper than the stream goes (it gives up; the tree decides).
    for depth in [10, 99, 100, 101, 140] {
        let mut ext = String::from("{\"url\":\"u\",\"valueString\":\"x\"}");
        for _ in 0..depth {
            ext = format!("{{\"url\":\"u\",\"extension\":[{ext}]}}");
        }
        let r = format!("{{\"resourceType\":\"Patient\",\"id\":\"p\",\"extension\":[{ext}]}}");
        check(r.as_bytes(), &format!("extensions {depth} deep"));
    }
    println!("malformed: {n} inputs as the tree path decides");
}

//! De-identified `$export` over real HTTP on the 100-patient Synthea set, with the shipped R4
//! sample configuration (keys set) kept in the local storage's `anonymization` container:
//! residual-PHI checks, hashed references that resolve, kick-off validation, ETags,
//! `processingErrors: skip`, and the manifest's record of the configuration.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;

use common::{Server, synthea};

/// The shipped sample configuration with its three keys set.
fn sample_config() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deid/tests/corpus/shipped-configs/r4-configuration-sample.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["parameters"]["dateShiftKey"] = json!("date-shift-key-for-tests");
    v["parameters"]["cryptoHashKey"] = json!("crypto-hash-key-for-tests");
    v["parameters"]["encryptKey"] = json!("0123456789abcdef0123456789abcdef");
    serde_json::to_string_pretty(&v).unwrap()
}

async fn start() -> Server {
    start_with(server::config::ExportOptions::default()).await
}

/// The Synthea set, served with these export options, the sample configuration in the local
/// storage's `anonymization` container.
async fn start_with(options: server::config::ExportOptions) -> Server {
    let s = common::start(&[synthea()], options).await;
    let configs = s.dir.path().join("storage/anonymization");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(configs.join("sample.json"), sample_config()).unwrap();
    s
}

impl Server {
    /// Every resource of a manifest's `output` (or `error`) files.
    async fn lines(&self, manifest: &Value, key: &str) -> Vec<Value> {
        let mut out = Vec::new();
        for o in manifest[key].as_array().unwrap() {
            let text = self
                .c
                .get(o["url"].as_str().unwrap())
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            out.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()),
            );
        }
        out
    }

    async fn bad_kickoff(&self, path: &str, needle: &str) {
        let r = self.kickoff(path).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        let text = oo.to_string();
        assert!(text.contains(needle), "{path}: {text}");
    }
}

/// Strings under `key` anywhere in a JSON value.
fn collect(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == key {
                    match x {
                        Value::String(s) => out.push(s.clone()),
                        Value::Array(a) => {
                            out.extend(a.iter().filter_map(Value::as_str).map(str::to_string))
                        }
                        _ => {}
                    }
                }
                collect(x, key, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect(x, key, out)),
        _ => {}
    }
}

/// Original identifying values of the people in the data (outside the config's keep rules,
/// which keep Organization identifiers, telecoms and addresses).
fn original_phi() -> HashSet<String> {
    let mut phi = HashSet::new();
    let mut kept = HashSet::new();
    for res in ingest_resources() {
        let t = res["resourceType"].as_str().unwrap_or("").to_string();
        let mut vals = Vec::new();
        for (elem, key) in [
            ("name", "family"),
            ("name", "given"),
            ("telecom", "value"),
            ("address", "line"),
            ("address", "city"),
            ("identifier", "value"),
        ] {
            if let Some(items) = res.get(elem).and_then(Value::as_array) {
                for it in items {
                    collect(&json!({"x": it.get(key)}), "x", &mut vals);
                }
            }
        }
        if t == "Organization" {
            kept.extend(vals);
        } else if t == "Patient" || t == "Practitioner" {
            phi.extend(vals);
        }
    }
    // Values too short to be identifying on their own, and values an Organization keeps.
    phi.retain(|v| v.len() >= 4 && !kept.contains(v));
    phi
}

/// The Synthea resources as loaded (Bundles unpacked).
fn ingest_resources() -> Vec<Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(synthea()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".json.gz") && !name.ends_with(".json") {
            continue;
        }
        let f = std::fs::File::open(&p).unwrap();
        let text = if name.ends_with(".gz") {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(f), &mut s).unwrap();
            s
        } else {
            std::fs::read_to_string(&p).unwrap()
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        match v["resourceType"].as_str() {
            Some("Bundle") => out.extend(
                v["entry"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| e["resource"].clone()),
            ),
            _ => out.push(v),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn deidentified_system_export_leaves_no_phi_and_references_resolve() {
    let s = start().await;
    let m = s
        .export("/$export?_container=deid&_anonymizationConfig=sample.json")
        .await;
    let ext = &m["extension"]["storage"]["anonymization"];
    assert_eq!(ext["configuration"], "sample.json");
    assert_eq!(ext["source"], "storage");
    assert_eq!(ext["fingerprint"].as_str().map(str::len), Some(64));
    assert!(ext["etag"].is_string());
    assert!(!m.to_string().contains("crypto-hash-key-for-tests"));
    assert_eq!(m["error"], json!([]));

    let resources = s.lines(&m, "output").await;
    // Every resource of the plain export is there, under a hashed id: the README's 38,970
    // entries carry 203 distinct Organizations and Practitioners (not 452), plus the Group.
    assert_eq!(resources.len(), 38_970 - 452 * 2 + 203 * 2 + 1);
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    for r in &resources {
        let t = r["resourceType"].as_str().unwrap().to_string();
        let id = r["id"].as_str().unwrap().to_string();
        assert_eq!(id.len(), 64, "hashed id: {t}/{id}");
        ids.entry(t).or_default().insert(id);
    }
    let text: String = resources
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let phi = original_phi();
    assert!(phi.len() > 500, "the check has values to look for");
    let leaked: Vec<&String> = phi
        .iter()
        .filter(|v| text.contains(&format!("\"{v}\"")))
        .collect();
    assert!(leaked.is_empty(), "original PHI in the output: {leaked:?}");
    // The sample configuration date-shifts birth dates (a Safe Harbor configuration would
    // generalize them to the year): no patient keeps its original birth date. Hashed ids are
    // HMACs of the original ids, so each output Patient is matched to its original.
    let original_births: HashMap<String, String> = ingest_resources()
        .into_iter()
        .filter(|r| r["resourceType"] == "Patient")
        .map(|r| {
            (
                deid::transforms::crypto_hash(
                    "crypto-hash-key-for-tests",
                    r["id"].as_str().unwrap(),
                ),
                r["birthDate"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // (Patients over 89 lose the birth date altogether.)
    let (mut shifted, mut removed) = (0, 0);
    for r in resources.iter().filter(|r| r["resourceType"] == "Patient") {
        let original = &original_births[r["id"].as_str().unwrap()];
        match r["birthDate"].as_str() {
            Some(b) => {
                assert_ne!(b, original, "original birth date kept");
                shifted += 1;
            }
            None => removed += 1,
        }
    }
    assert_eq!(shifted + removed, 100);
    assert!(shifted > 80);
    // Every reference points at an exported (hashed) resource, or at a contained one.
    let mut checked = 0;
    for r in &resources {
        let mut refs = Vec::new();
        collect(r, "reference", &mut refs);
        let mut contained = Vec::new();
        for c in r["contained"].as_array().into_iter().flatten() {
            collect(&json!({"x": c["id"]}), "x", &mut contained);
        }
        for reference in &refs {
            if let Some(local) = reference.strip_prefix('#') {
                assert!(contained.iter().any(|c| c == local), "dangling {reference}");
            } else {
                let (t, id) = reference.split_once('/').unwrap_or(("", reference));
                assert!(
                    ids.get(t).is_some_and(|set| set.contains(id)),
                    "dangling reference {reference}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 10_000);

    // The Patient level de-identifies the same way (same ids for the same patients).
    let mp = s
        .export("/Patient/$export?_type=Patient&_container=deid&_anonymizationConfig=sample.json")
        .await;
    let patients = s.lines(&mp, "output").await;
    assert_eq!(patients.len(), 100);
    for p in &patients {
        assert!(ids["Patient"].contains(p["id"].as_str().unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kickoff_validates_configs_and_etags() {
    let s = start().await;
    s.bad_kickoff(
        "/$export?_anonymizationConfig=sample.json",
        "Missing '_container' for anonymized export",
    )
    .await;
    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfigEtag=abc",
        "Missing '_anonymizationConfig'",
    )
    .await;
    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfig=sample.json&_anonymizationConfigEtag=abc&_anonymizationConfigCollectionReference=localhost:5001/cfg:1",
        "cannot be used together",
    )
    .await;
    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfig=../fhirhose.db",
        "not a valid configuration name",
    )
    .await;
    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfig=missing.json",
        "Anonymization configuration 'missing.json' not found",
    )
    .await;
    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfig=cfg.json&_anonymizationConfigCollectionReference=example.com/cfg:1",
        "not configured",
    )
    .await;
    let configs = s.dir.path().join("storage/anonymization");
    std::fs::write(
        configs.join("invalid.json"),
        r#"{"fhirPathRules": [{"path": "Patient.name.where(", "method": "redact"}]}"#,
    )
    .unwrap();
    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfig=invalid.json",
        "invalid.json",
    )
    .await;
    // Security review: configurations that could only fail (or fail open) at run time, and a
    // name that is a directory (a 503 with Retry-After before: retried forever), are 400s.
    std::fs::write(
        configs.join("scramble.json"),
        r#"{"processingErrors": "skip", "fhirPathRules": [{"path": "Patient.name", "method": "scramble"}]}"#,
    )
    .unwrap();
    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfig=scramble.json",
        "Anonymization method scramble not supported",
    )
    .await;
    std::fs::write(
        configs.join("span.json"),
        r#"{"fhirPathRules": [{"path": "Observation.value", "method": "perturb", "span": 1e300}]}"#,
    )
    .unwrap();
    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfig=span.json",
        "Span value is invalid",
    )
    .await;
    std::fs::create_dir_all(configs.join("subdir")).unwrap();
    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfig=subdir",
        "Anonymization configuration 'subdir' cannot be read",
    )
    .await;

    // ETags: the SHA-256 of the file, quotes optional; a mismatch names both.
    let etag = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(sample_config().as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    s.bad_kickoff(
        "/$export?_type=Patient&_container=deid&_anonymizationConfig=sample.json&_anonymizationConfigEtag=%220x8D%22",
        &etag,
    )
    .await;
    let m = s
        .export(&format!(
            "/$export?_type=Patient&_container=deid&_anonymizationConfig=sample.json&_anonymizationConfigEtag=%22{etag}%22"
        ))
        .await;
    assert_eq!(
        m["extension"]["storage"]["anonymization"]["etag"],
        json!(etag)
    );
    assert_eq!(s.lines(&m, "output").await.len(), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn processing_errors_skip_writes_stubs_and_error_lines() {
    let s = start().await;
    std::fs::write(
        s.dir.path().join("storage/anonymization/skip.json"),
        r#"{"fhirVersion": "R4", "processingErrors": "skip",
            "fhirPathRules": [{"path": "Patient.birthDate", "method": "generalize", "cases": {"$this + 1 = 2": "'x'"}}],
            "parameters": {"cryptoHashKey": "k"}}"#,
    )
    .unwrap();
    let m = s
        .export("/$export?_type=Patient&_container=deid&_anonymizationConfig=skip.json")
        .await;
    let out = s.lines(&m, "output").await;
    assert_eq!(out.len(), 100);
    for stub in &out {
        assert_eq!(stub["meta"]["security"][0]["code"], "REDACTED");
        assert!(stub.get("name").is_none());
    }
    let errors = s.lines(&m, "error").await;
    assert_eq!(errors.len(), 100);
    assert!(
        errors
            .iter()
            .all(|e| e["resourceType"] == "OperationOutcome")
    );
    // Security review: the lines named each Patient by its real id. This configuration does
    // not hash ids, so none is shown.
    for e in &errors {
        let text = e["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(text.starts_with("Patient (id withheld"), "{text}");
    }

    // With `raise`, the same failure fails the export with a 400 OperationOutcome.
    std::fs::write(
        s.dir.path().join("storage/anonymization/raise.json"),
        r#"{"fhirVersion": "R4", "processingErrors": "raise",
            "fhirPathRules": [{"path": "Patient.birthDate", "method": "generalize", "cases": {"$this + 1 = 2": "'x'"}}],
            "parameters": {"cryptoHashKey": "k"}}"#,
    )
    .unwrap();
    let r = s
        .kickoff("/$export?_type=Patient&_container=deid&_anonymizationConfig=raise.json")
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let url = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let mut last = StatusCode::ACCEPTED;
    for _ in 0..300 {
        let r = s.c.get(&url).send().await.unwrap();
        last = r.status();
        if last != StatusCode::ACCEPTED && last != StatusCode::TOO_MANY_REQUESTS {
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["resourceType"], "OperationOutcome");
            assert!(oo.to_string().contains("Failed to anonymize"), "{oo}");
            assert!(oo.to_string().contains("Patient (id withheld"), "{oo}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last, StatusCode::BAD_REQUEST);
    // Nothing of the failed export remains in the container.
    let folders = std::fs::read_dir(s.dir.path().join("storage/deid"))
        .unwrap()
        .count();
    assert_eq!(folders, 1, "only the successful export's folder");
}

#[tokio::test(flavor = "multi_thread")]
async fn config_from_an_oci_image() {
    let Some(addr) = common::external("FHIRHOSE_TEST_REGISTRY", "./scripts/registry.sh") else {
        return;
    };
    let options = server::config::ExportOptions {
        anonymization_registries: vec![format!("{addr}/fhirhose-test/deid-configs")],
        registry_insecure_http: vec![addr.clone()],
        ..Default::default()
    };
    let push_settings = options.registry_settings().unwrap();
    let s = start_with(options).await;
    let tag = format!("t{}", std::process::id());
    let image = format!("{addr}/fhirhose-test/deid-configs:{tag}");
    let digest = oci_config::push_file(
        &push_settings,
        &image,
        "sample.json",
        sample_config().as_bytes(),
    )
    .unwrap();

    let by_tag = s
        .export(&format!(
            "/Patient/$export?_type=Patient&_container=deid&_anonymizationConfig=sample.json\
             &_anonymizationConfigCollectionReference={image}"
        ))
        .await;
    let ext = &by_tag["extension"]["storage"]["anonymization"];
    assert_eq!(ext["source"], "oci");
    assert_eq!(ext["image"], image.as_str());
    assert_eq!(ext["digest"], digest.as_str());
    let patients = s.lines(&by_tag, "output").await;
    assert_eq!(patients.len(), 100);
    let phi = original_phi();
    for p in &patients {
        assert_eq!(p["id"].as_str().map(str::len), Some(64), "hashed id");
        for n in p["name"].as_array().into_iter().flatten() {
            assert!(!phi.contains(n["family"].as_str().unwrap_or("")));
        }
    }
    // Pinned by digest: the same output.
    let pinned = s
        .export(&format!(
            "/Patient/$export?_type=Patient&_container=deid&_anonymizationConfig=sample.json\
             &_anonymizationConfigCollectionReference={addr}/fhirhose-test/deid-configs@{digest}"
        ))
        .await;
    let again = s.lines(&pinned, "output").await;
    let ids = |v: &[Value]| {
        let mut i: Vec<String> = v.iter().map(|p| p["id"].to_string()).collect();
        i.sort();
        i
    };
    assert_eq!(ids(&again), ids(&patients));

    // What the kick-off refuses, before any job exists.
    let kick = |reference: &str, name: &str| {
        format!(
            "/$export?_container=deid&_anonymizationConfig={name}\
             &_anonymizationConfigCollectionReference={reference}"
        )
    };
    s.bad_kickoff(
        &kick("example.com/fhirhose-test/deid-configs:v1", "sample.json"),
        "is not configured",
    )
    .await;
    s.bad_kickoff(
        &kick(
            &format!("{addr}/elsewhere/deid-configs:{tag}"),
            "sample.json",
        ),
        "is not configured",
    )
    .await;
    s.bad_kickoff(&kick("not%20a%20reference", "sample.json"), "reference")
        .await;
    s.bad_kickoff(&kick(&image, "missing.json"), "not found")
        .await;
    s.bad_kickoff(
        &format!(
            "/$export?_container=deid&_anonymizationConfig=sample.json&_anonymizationConfigEtag=x\
             &_anonymizationConfigCollectionReference={image}"
        ),
        "",
    )
    .await;
}

/// A server over an empty store (resources are written through the API), with the sample
/// configuration and these configurations in the `anonymization` container.
async fn start_empty(configs: &[(&str, Value)]) -> Server {
    let s = common::start(&[], server::config::ExportOptions::default()).await;
    let dir = s.dir.path().join("storage/anonymization");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, c) in configs {
        std::fs::write(dir.join(name), c.to_string()).unwrap();
    }
    s
}

impl Server {
    async fn put(&self, r: Value) {
        let url = format!(
            "{}/{}/{}",
            self.base,
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        let resp = self
            .c
            .put(url)
            .header("content-type", "application/fhir+json")
            .body(r.to_string())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }
}

fn day(s: &str) -> chrono::NaiveDate {
    chrono::NaiveDate::parse_from_str(&s[..10], "%Y-%m-%d").unwrap()
}

/// `dateShiftScope: "patient"` through `$export`: a patient's resources share one shift (age at
/// an encounter survives exactly), patients differ, and a later `_since` export shifts the
/// patient's new resources by the same amount, their references resolving into the baseline.
#[tokio::test(flavor = "multi_thread")]
async fn patient_date_shift_scope_keeps_intervals_within_a_patient_across_exports() {
    let config = json!({"fhirVersion": "R4", "fhirPathRules": [
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
        {"path": "nodesByType('date')", "method": "dateShift"},
        {"path": "nodesByType('dateTime')", "method": "dateShift"}
    ], "parameters": {"dateShiftKey": "date-key", "cryptoHashKey": "hash-key",
        "dateShiftScope": "patient"}});
    let s = start_empty(&[("patient.json", config)]).await;
    let (p1, p2) = ("patient-one", "patient-two");
    assert_ne!(
        deid::transforms::patient_shift_offset("date-key", p1),
        deid::transforms::patient_shift_offset("date-key", p2)
    );
    let encounter = |id: &str, patient: &str, start: &str, end: &str| {
        json!({"resourceType": "Encounter", "id": id, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": format!("Patient/{patient}")},
            "period": {"start": start, "end": end}})
    };
    s.put(json!({"resourceType": "Patient", "id": p1, "birthDate": "1980-03-01"}))
        .await;
    s.put(json!({"resourceType": "Patient", "id": p2, "birthDate": "1975-06-10"}))
        .await;
    s.put(encounter(
        "enc-1",
        p1,
        "2020-03-01T10:00:00Z",
        "2020-03-04T09:00:00Z",
    ))
    .await;
    s.put(encounter("enc-2", p2, "2019-01-01", "2019-01-02"))
        .await;

    let m = s
        .export("/$export?_container=deid&_anonymizationConfig=patient.json")
        .await;
    let out = s.lines(&m, "output").await;
    let hash = |id: &str| deid::transforms::crypto_hash("hash-key", id);
    let by_id = |id: &str| {
        out.iter()
            .find(|r| r["id"] == json!(hash(id)))
            .unwrap_or_else(|| panic!("{id} exported"))
            .clone()
    };
    let shift = |shifted: &Value, original: &str| {
        (day(shifted.as_str().unwrap()) - day(original)).num_days()
    };
    let s1 = shift(&by_id(p1)["birthDate"], "1980-03-01");
    let s2 = shift(&by_id(p2)["birthDate"], "1975-06-10");
    assert_ne!(s1, s2, "patients are shifted by different amounts");
    let e1 = by_id("enc-1");
    assert_eq!(shift(&e1["period"]["start"], "2020-03-01"), s1);
    assert_eq!(shift(&e1["period"]["end"], "2020-03-04"), s1);
    assert_eq!(shift(&by_id("enc-2")["period"]["start"], "2019-01-01"), s2);
    // Age at the encounter, in days, is the original one.
    assert_eq!(
        day(e1["period"]["start"].as_str().unwrap())
            - day(by_id(p1)["birthDate"].as_str().unwrap()),
        day("2020-03-01") - day("1980-03-01")
    );

    // A delta: the patient's new encounter moves with the baseline, and points into it.
    let tt = m["transactionTime"].as_str().unwrap().to_string();
    s.put(encounter("enc-3", p1, "2022-05-05", "2022-05-06"))
        .await;
    let delta = s
        .export(&format!(
            "/$export?_container=deid&_anonymizationConfig=patient.json&_since={tt}"
        ))
        .await;
    let later = s.lines(&delta, "output").await;
    assert_eq!(later.len(), 1);
    assert_eq!(later[0]["id"], json!(hash("enc-3")));
    assert_eq!(shift(&later[0]["period"]["start"], "2022-05-05"), s1);
    assert_eq!(
        later[0]["subject"]["reference"],
        json!(format!("Patient/{}", hash(p1)))
    );
}

/// A `_since` de-identified export lists deletions under the ids the resources got in the
/// earlier export — decided on their last content, as the export decided — and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn deidentified_deletions_carry_the_exported_pseudonymous_ids() {
    // Restricted resources get hashed ids; the others keep theirs (reference data).
    let config = json!({"fhirVersion": "R4", "fhirPathRules": [
        {"path": "Resource.where(meta.security.code = 'R').id", "method": "cryptoHash"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
        {"path": "Observation.value", "method": "redact"}
    ], "parameters": {"dateShiftKey": "date-key", "cryptoHashKey": "hash-key"}});
    let s = start_empty(&[("restricted.json", config)]).await;
    let restricted =
        json!({"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"});
    s.put(
        json!({"resourceType": "Observation", "id": "obs-secret-1", "status": "final",
        "meta": {"security": [restricted]},
        "code": {"text": "HIV viral load"}, "subject": {"reference": "Patient/pat-secret"},
        "valueString": "detected"}),
    )
    .await;
    s.put(
        json!({"resourceType": "Observation", "id": "obs-public-1", "status": "final",
        "code": {"text": "reference range"}}),
    )
    .await;
    let m = s
        .export("/$export?_container=deid&_anonymizationConfig=restricted.json")
        .await;
    let first = s.lines(&m, "output").await;
    let exported: Vec<String> = first
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let secret_id = deid::transforms::crypto_hash("hash-key", "obs-secret-1");
    assert!(exported.contains(&secret_id) && exported.contains(&"obs-public-1".to_string()));

    let tt = m["transactionTime"].as_str().unwrap().to_string();
    for id in ["obs-secret-1", "obs-public-1"] {
        let r =
            s.c.delete(format!("{}/Observation/{id}", s.base))
                .send()
                .await
                .unwrap();
        assert!(r.status().is_success());
    }
    let delta = s
        .export(&format!(
            "/$export?_container=deid&_anonymizationConfig=restricted.json&_since={tt}"
        ))
        .await;
    assert_eq!(delta["output"], json!([]));
    let bundles = s.lines(&delta, "deleted").await;
    let mut urls = Vec::new();
    for b in &bundles {
        assert_eq!(b["resourceType"], "Bundle");
        for e in b["entry"].as_array().unwrap() {
            // Only the request: method and URL.
            assert_eq!(
                e.as_object().unwrap().keys().collect::<Vec<_>>(),
                ["request"]
            );
            assert_eq!(e["request"]["method"], "DELETE");
            urls.push(e["request"]["url"].as_str().unwrap().to_string());
        }
    }
    urls.sort();
    assert_eq!(
        urls,
        [
            format!("Observation/{secret_id}"),
            "Observation/obs-public-1".to_string()
        ]
    );
    let text: String = bundles.iter().map(Value::to_string).collect();
    assert!(
        !text.contains("obs-secret-1") && !text.contains("pat-secret"),
        "{text}"
    );
}

/// The file of a manifest entry in the local storage (container `deid`).
fn stored_file(s: &Server, folder: &str, url: &str) -> std::path::PathBuf {
    s.dir
        .path()
        .join("storage/deid")
        .join(folder)
        .join(url.rsplit('/').next().unwrap())
}

/// Issue 21 item 3: every manifest entry carries `count`, `fileSize` and the SHA-256 of the
/// stored file (computed while writing), the manifest the configuration's fingerprint; the
/// `manifest` crate's verification (what `fhirhose verify` runs) passes over HTTP, and fails,
/// naming the file and the check, after one byte is changed or one line removed.
#[tokio::test(flavor = "multi_thread")]
async fn manifests_carry_sizes_and_digests_and_verification_catches_tampering() {
    let config = json!({"fhirVersion": "R4", "fhirPathRules": [
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"}
    ], "parameters": {"cryptoHashKey": "hash-key"}});
    let s = start_empty(&[("ids.json", config)]).await;
    for i in 0..3 {
        s.put(json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": "female"}))
            .await;
        s.put(
            json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
            "code": {"text": "x"}, "subject": {"reference": format!("Patient/p{i}")}}),
        )
        .await;
    }
    let m = s
        .export("/$export?_container=deid&_anonymizationConfig=ids.json")
        .await;
    let fingerprint = m["extension"]["storage"]["anonymization"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(fingerprint.len(), 64);
    let folder = m["extension"]["storage"]["folder"]
        .as_str()
        .unwrap()
        .to_string();
    let outputs = m["output"].as_array().unwrap().clone();
    assert_eq!(outputs.len(), 2, "{m}");
    for o in &outputs {
        let path = stored_file(&s, &folder, o["url"].as_str().unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(o["fileSize"], json!(bytes.len()), "{o}");
        assert_eq!(o["count"], json!(3));
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(o["extension"]["sha256"], json!(sha), "{o}");
    }

    let status_manifest = m.clone();
    let verify = move |m: Value| {
        tokio::task::spawn_blocking(move || {
            let src = manifest::HttpSource::new(None).unwrap();
            manifest::verify(&m, &src, &manifest::Options::default())
        })
    };
    let report = verify(status_manifest.clone()).await.unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.resources(), 6);
    assert_eq!(report.references, 3);
    assert_eq!(report.dangling_total, 0);

    // One byte changed (same size): the digest names the file.
    let obs = outputs.iter().find(|o| o["type"] == "Observation").unwrap();
    let path = stored_file(&s, &folder, obs["url"].as_str().unwrap());
    let original = std::fs::read_to_string(&path).unwrap();
    let tampered = original.replacen("final", "fINal", 1);
    assert_eq!(tampered.len(), original.len());
    std::fs::write(&path, &tampered).unwrap();
    let report = verify(status_manifest.clone()).await.unwrap();
    let text = report.to_string();
    assert!(!report.ok(), "{text}");
    assert!(
        text.contains("FAIL  output   Observation-1.ndjson")
            && text.contains("the content changed")
            && !text.contains("size is"),
        "{text}"
    );
    // One line removed: count, size and digest.
    let shorter: String = original.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, shorter).unwrap();
    let report = verify(status_manifest).await.unwrap();
    let text = report.to_string();
    assert!(
        text.contains("2 resources (lines), the manifest says 3") && text.contains("size is"),
        "{text}"
    );
}

/// Issue 21 item 1b: a stored key set supplies the keys the configuration leaves empty. A full
/// export, writes, then a `_since` export with the same key set: the same hashed ids (every
/// reference of the delta resolves into the baseline) and the same per-patient shift; an
/// unknown key set answers 400 at kick-off. No key appears in the manifest.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_set_keeps_ids_and_shifts_consistent_across_exports() {
    let config = json!({"fhirVersion": "R4", "fhirPathRules": [
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
        {"path": "nodesByType('date')", "method": "dateShift"},
        {"path": "nodesByType('dateTime')", "method": "dateShift"}
    ], "parameters": {"dateShiftScope": "patient"}});
    let s = start_empty(&[("empty-keys.json", config)]).await;
    let keys = deid::keys::Keys::generate();
    let queue = s.db.store.jobs().unwrap();
    let set = store::keysets::KeySet {
        name: "research".into(),
        version: 1,
        crypto_hash_key: keys.crypto_hash_key.clone(),
        encrypt_key: keys.encrypt_key.clone(),
        date_shift_key: keys.date_shift_key.clone(),
        created_ms: 0,
        rotated_ms: None,
    };
    let created = tokio::task::spawn_blocking(move || {
        queue.key_sets().unwrap().create_key_set(&set).unwrap()
    })
    .await
    .unwrap();
    assert!(created);

    s.bad_kickoff(
        "/$export?_container=deid&_anonymizationConfig=empty-keys.json&_anonymizationKeySet=nope",
        "key set 'nope' not found",
    )
    .await;

    let encounter = |id: &str, start: &str| {
        json!({"resourceType": "Encounter", "id": id, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "Patient/pat-1"}, "period": {"start": start}})
    };
    s.put(json!({"resourceType": "Patient", "id": "pat-1", "birthDate": "1970-01-10"}))
        .await;
    s.put(encounter("enc-1", "2020-02-01")).await;
    let kickoff = "/$export?_container=deid&_anonymizationConfig=empty-keys.json&_anonymizationKeySet=research";
    let base = s.export(kickoff).await;
    let text = base.to_string();
    for k in [
        &keys.crypto_hash_key,
        &keys.encrypt_key,
        &keys.date_shift_key,
    ] {
        assert!(!text.contains(k.as_str()), "a key in the manifest: {text}");
    }
    assert_eq!(
        base["extension"]["storage"]["anonymization"]["keySet"],
        "research"
    );
    let baseline = s.lines(&base, "output").await;
    let hash = |id: &str| deid::transforms::crypto_hash(&keys.crypto_hash_key, id);
    let find = |rs: &[Value], id: &str| {
        rs.iter()
            .find(|r| r["id"] == json!(hash(id)))
            .unwrap_or_else(|| panic!("{id} under the key set's hash"))
            .clone()
    };
    let patient = find(&baseline, "pat-1");
    let born = day(patient["birthDate"].as_str().unwrap());
    let shift = (born - day("1970-01-10")).num_days();
    assert_ne!(shift, 0);
    assert_eq!(
        (day(find(&baseline, "enc-1")["period"]["start"]
            .as_str()
            .unwrap())
            - day("2020-02-01"))
        .num_days(),
        shift
    );

    // Writes, then a delta with the same key set.
    s.put(encounter("enc-2", "2021-07-15")).await;
    let tt = base["transactionTime"].as_str().unwrap();
    let delta = s.export(&format!("{kickoff}&_since={tt}")).await;
    let later = s.lines(&delta, "output").await;
    assert_eq!(later.len(), 1);
    let e2 = find(&later, "enc-2");
    let ids: HashSet<String> = baseline
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            )
        })
        .collect();
    let mut refs = Vec::new();
    collect(&e2, "reference", &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        assert!(ids.contains(&r), "{r} resolves into the baseline");
    }
    // The patient's interval survives across the two exports.
    assert_eq!(
        day(e2["period"]["start"].as_str().unwrap()) - born,
        day("2021-07-15") - day("1970-01-10")
    );
    assert_eq!(
        delta["extension"]["storage"]["anonymization"]["fingerprint"],
        base["extension"]["storage"]["anonymization"]["fingerprint"]
    );
}

/// Issue 21 item 4b: `_anonymizationDryRun=true` writes the dry-run report (one JSON line, type
/// `DeidReport`, listed in the manifest with its size and digest) instead of any data.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_export_writes_the_report_instead_of_data() {
    let config = json!({"fhirVersion": "R4", "fhirPathRules": [
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "Patient.birthDate", "method": "redact"}
    ], "parameters": {"cryptoHashKey": "k"}});
    let s = start_empty(&[("ids.json", config)]).await;
    for (id, family) in [("a", "Smith"), ("b", "Jones")] {
        s.put(
            json!({"resourceType": "Patient", "id": id, "gender": "male",
            "birthDate": "1980-01-01", "name": [{"family": family}]}),
        )
        .await;
    }
    s.put(
        json!({"resourceType": "Observation", "id": "o", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": "Patient/a"}}),
    )
    .await;
    let m = s
        .export("/$export?_container=deid&_anonymizationConfig=ids.json&_anonymizationDryRun=true")
        .await;
    let outputs = m["output"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{m}");
    assert_eq!(outputs[0]["type"], "DeidReport");
    assert_eq!(outputs[0]["count"], 1);
    assert!(outputs[0]["extension"]["sha256"].is_string());
    let report = s.lines(&m, "output").await.remove(0);
    assert_eq!(report["resourceType"], "DeidReport");
    assert_eq!(report["resources"], 3, "{report}");
    assert_eq!(report["risk"]["patients"], 2, "{report}");
    let phi = report["residualPhi"].to_string();
    assert!(phi.contains("\"name\"") && phi.contains("Patient"), "{phi}");
    assert!(
        !report.to_string().contains("Smith"),
        "no values in the report"
    );
    // No data file in the folder.
    let folder = s
        .dir
        .path()
        .join("storage/deid")
        .join(m["extension"]["storage"]["folder"].as_str().unwrap());
    let names: Vec<String> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["DeidReport-1.ndjson"]);
}

/// Issue 21 item 6: `--export-gzip` stores `.ndjson.gz` files (the manifest says so and its size
/// and digest are the stored bytes'), downloads send them as stored (`application/gzip`), and
/// `_compression=none` turns it off per export.
#[tokio::test(flavor = "multi_thread")]
async fn gzip_exports_store_and_serve_ndjson_gz() {
    let s = common::start(
        &[],
        server::config::ExportOptions {
            export_gzip: true,
            ..Default::default()
        },
    )
    .await;
    for i in 0..3 {
        s.put(json!({"resourceType": "Patient", "id": format!("p{i}")}))
            .await;
    }
    let m = s.export("/$export?_type=Patient").await;
    let o = &m["output"][0];
    let url = o["url"].as_str().unwrap();
    assert!(url.ends_with("/Patient-1.ndjson.gz"), "{m}");
    assert_eq!(o["extension"]["compression"], "gzip");
    let r =
        s.c.get(url)
            .header("accept-encoding", "identity")
            .send()
            .await
            .unwrap();
    assert_eq!(r.headers()["content-type"], "application/gzip");
    let bytes = r.bytes().await.unwrap();
    assert_eq!(o["fileSize"], json!(bytes.len()));
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
        .unwrap();
    assert_eq!(text.lines().count(), 3);
    // Already gzip: not compressed again for a client that accepts gzip.
    let r =
        s.c.get(url)
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
    assert!(r.headers().get("content-encoding").is_none(), "{r:?}");
    assert_eq!(r.bytes().await.unwrap(), bytes);
    let checked = m.clone();
    let report = tokio::task::spawn_blocking(move || {
        manifest::verify(
            &checked,
            &manifest::HttpSource::new(None).unwrap(),
            &manifest::Options::default(),
        )
    })
    .await
    .unwrap();
    assert!(report.ok(), "{report}");

    let m = s.export("/$export?_type=Patient&_compression=none").await;
    let o = &m["output"][0];
    assert!(
        o["url"].as_str().unwrap().ends_with("/Patient-1.ndjson"),
        "{m}"
    );
    assert!(o["extension"].get("compression").is_none());
}

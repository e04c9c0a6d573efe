//! Bulk `$export` over real HTTP on the 100-patient Synthea set: every level, parameters,
//! snapshot, cancel, downloads.

use std::collections::{HashMap, HashSet};

use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;

use common::Server;

async fn start() -> Server {
    common::start(
        &[common::synthea()],
        server::config::ExportOptions::default(),
    )
    .await
}

impl Server {
    /// All resources of a manifest: type -> ids (asserting no id appears twice).
    async fn contents(&self, manifest: &Value) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for o in manifest["output"].as_array().unwrap() {
            let r = self.c.get(o["url"].as_str().unwrap()).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["content-type"], "application/fhir+ndjson");
            let text = r.text().await.unwrap();
            let mut n = 0;
            for line in text.lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["resourceType"], o["type"]);
                out.entry(o["type"].as_str().unwrap().to_string())
                    .or_default()
                    .push(v["id"].as_str().unwrap().to_string());
                n += 1;
            }
            assert_eq!(o["count"], n);
        }
        for (t, ids) in &out {
            let unique: HashSet<&String> = ids.iter().collect();
            assert_eq!(unique.len(), ids.len(), "duplicates in {t}");
        }
        out
    }
}

fn counts(c: &HashMap<String, Vec<String>>) -> HashMap<&str, usize> {
    c.iter().map(|(k, v)| (k.as_str(), v.len())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn system_patient_and_group_exports() {
    let s = start().await;
    let m = s.export("/$export").await;
    assert!(m["transactionTime"].is_string());
    assert_eq!(m["requiresAccessToken"], false);
    let files: Vec<&str> = m["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["url"].as_str().unwrap())
        .collect();
    assert!(files.iter().any(|u| u.ends_with("/Observation-1.ndjson")));
    assert!(
        files.iter().any(|u| u.ends_with("/Observation-4.ndjson")),
        "16,315 Observations roll into 4 files of 5,000"
    );
    let all = s.contents(&m).await;
    let c = counts(&all);
    // Organization and Practitioner: 203 distinct ids behind 452 bundle entries each.
    for (t, n) in [
        ("Observation", 16315),
        ("Claim", 6083),
        ("Encounter", 3697),
        ("ExplanationOfBenefit", 3697),
        ("MedicationRequest", 2386),
        ("Procedure", 2351),
        ("Immunization", 1287),
        ("DiagnosticReport", 897),
        ("Condition", 639),
        ("Organization", 203),
        ("Practitioner", 203),
        ("CareTeam", 278),
        ("CarePlan", 278),
        ("Patient", 100),
        ("AllergyIntolerance", 38),
        ("ImagingStudy", 16),
        ("Device", 4),
        ("Group", 1),
    ] {
        assert_eq!(c.get(t).copied(), Some(n), "{t}");
    }

    let pm = s.export("/Patient/$export").await;
    let pc = s.contents(&pm).await;
    // Organizations and Practitioners are outside the Patient compartment; the Group is inside
    // it (R4 CompartmentDefinition: Group.member).
    assert!(!pc.contains_key("Organization") && !pc.contains_key("Practitioner"));
    assert_eq!(pc["Group"].len(), 1);
    // Every compartment resource of the system export is in the Patient export, exactly once.
    for t in [
        "Patient",
        "Observation",
        "Claim",
        "Encounter",
        "Condition",
        "Procedure",
        "Immunization",
    ] {
        let a: HashSet<&String> = all[t].iter().collect();
        let b: HashSet<&String> = pc[t].iter().collect();
        assert_eq!(a, b, "{t}");
    }

    let group_id = &all["Group"][0];
    let gm = s.export(&format!("/Group/{group_id}/$export")).await;
    let gc = s.contents(&gm).await;
    assert_eq!(
        counts(&gc),
        counts(&pc),
        "the Synthea Group holds every patient"
    );

    let typed = s
        .export("/$export?_type=Patient,Condition&_typeFilter=Condition%3Fclinical-status%3Dactive")
        .await;
    let tc = s.contents(&typed).await;
    assert_eq!(tc.len(), 2);
    assert_eq!(tc["Patient"].len(), 100);
    assert!(tc["Condition"].len() < 639 && !tc["Condition"].is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn kickoff_validation_snapshot_and_cancel() {
    let s = start().await;
    for (path, want) in [
        ("/$export?_type=Unicorn", StatusCode::BAD_REQUEST),
        (
            "/$export?_since=2999-01-01T00:00:00Z",
            StatusCode::BAD_REQUEST,
        ),
        ("/$export?_outputFormat=text/csv", StatusCode::BAD_REQUEST),
        ("/$export?_container=Bad_Name", StatusCode::BAD_REQUEST),
        (
            "/$export?_typeFilter=Observation%3Fnonsense%3D1",
            StatusCode::BAD_REQUEST,
        ),
        ("/Group/nope/$export", StatusCode::NOT_FOUND),
        ("/Observation/$export", StatusCode::NOT_FOUND),
    ] {
        let r = s.kickoff(path).await;
        assert_eq!(r.status(), want, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome", "{path}");
    }
    let r =
        s.c.get(format!("{}/$export", s.base))
            .header("accept", "application/fhir+json")
            .send()
            .await
            .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "Prefer: respond-async is required"
    );
    let r =
        s.c.get(format!("{}/$export", s.base))
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "Accept is required");
    let r =
        s.c.get(format!("{}/$export", s.base))
            .header("accept", "application/fhir+json; charset=utf-8")
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "parameters of Accept are tolerated"
    );
    let first = s
        .wait(r.headers()["content-location"].to_str().unwrap())
        .await;
    let tt = first["transactionTime"].as_str().unwrap().to_string();

    // Writes after the watermark are in the next `_since` export only, each once.
    let put = |id: &'static str| {
        let c = s.c.clone();
        let url = format!("{}/Patient/{id}", s.base);
        async move {
            let r = c
                .put(url)
                .header("content-type", "application/fhir+json")
                .body(json!({"resourceType": "Patient", "id": id, "gender": "other"}).to_string())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
    };
    put("late-1").await;
    put("late-2").await;
    let first_ids = s.contents(&first).await;
    assert!(!first_ids["Patient"].contains(&"late-1".to_string()));
    let since = s.export(&format!("/$export?_since={tt}")).await;
    let sc = s.contents(&since).await;
    assert_eq!(sc.keys().collect::<Vec<_>>(), ["Patient"]);
    let mut late = sc["Patient"].clone();
    late.sort();
    assert_eq!(late, ["late-1", "late-2"]);
    assert!(since["deleted"].is_array());

    // Cancel: 202, then the status and the files answer 404.
    let r = s.kickoff("/$export").await;
    let status_url = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let done = s.wait(&status_url).await;
    let file = done["output"][0]["url"].as_str().unwrap().to_string();
    let r = s.c.delete(&status_url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        s.c.get(&status_url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.c.get(&file).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

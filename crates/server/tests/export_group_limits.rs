//! Issue 16 item 7: Group membership is resolved without recursion, with a cycle guard and
//! configurable depth and size bounds. A pathological Group fails *its* export (status answers an
//! OperationOutcome saying why) and the server goes on; before the fix a chain of 10,000 nested
//! Groups overflowed a worker's stack and aborted the process.

mod common;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

/// PUT entries of a transaction Bundle.
fn transaction(resources: Vec<Value>) -> Value {
    let entry: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let url = format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            );
            json!({"resource": r, "request": {"method": "PUT", "url": url}})
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entry})
}

fn group(id: &str, members: &[&str]) -> Value {
    let member: Vec<Value> = members
        .iter()
        .map(|m| json!({"entity": {"reference": m}}))
        .collect();
    json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": member})
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id})
}

async fn post(s: &common::Server, resources: Vec<Value>) {
    let r =
        s.c.post(&s.base)
            .header("content-type", "application/fhir+json")
            .json(&transaction(resources))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
}

/// Kicks off `path` and polls until the export ends: (status, body).
async fn run(s: &common::Server, path: &str) -> (StatusCode, Value) {
    let url = s.kickoff_accepted(path).await;
    for _ in 0..1200 {
        let r = s.c.get(&url).send().await.unwrap();
        match r.status() {
            StatusCode::ACCEPTED | StatusCode::TOO_MANY_REQUESTS => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            status => return (status, r.json().await.unwrap()),
        }
    }
    panic!("export did not finish");
}

/// The patient ids in a finished export's Patient files.
async fn exported_patients(s: &common::Server, manifest: &Value) -> Vec<String> {
    let mut ids = Vec::new();
    for o in manifest["output"].as_array().unwrap() {
        if o["type"] != "Patient" {
            continue;
        }
        let text =
            s.c.get(o["url"].as_str().unwrap())
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            ids.push(v["id"].as_str().unwrap().to_string());
        }
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_of_ten_thousand_nested_groups_fails_that_export_not_the_server() {
    const DEPTH: usize = 10_000;
    let s = common::start(&[], server::config::ExportOptions::default()).await;
    // g0 -> g1 -> ... -> g9999 -> Patient/deep, posted in transactions of 2,000 entries.
    let mut resources: Vec<Value> = (0..DEPTH)
        .map(|i| {
            let next = if i + 1 < DEPTH {
                format!("Group/g{}", i + 1)
            } else {
                "Patient/deep".to_string()
            };
            group(&format!("g{i}"), &[&next])
        })
        .collect();
    resources.push(patient("deep"));
    resources.push(patient("other"));
    while !resources.is_empty() {
        let rest = resources.split_off(resources.len().min(2000));
        post(&s, std::mem::replace(&mut resources, rest)).await;
    }

    let (status, body) = run(&s, "/Group/g0/$export").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    let text = body.to_string();
    assert!(
        text.contains("more than 100 levels deep") && text.contains("--export-group-max-depth"),
        "{body}"
    );

    // The server is alive and still exports: a short chain of the same data is fine.
    let (status, manifest) = run(&s, "/Group/g9990/$export").await;
    assert_eq!(status, StatusCode::OK, "{manifest}");
    assert_eq!(exported_patients(&s, &manifest).await, ["deep"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cyclic_groups_are_followed_once() {
    let s = common::start(&[], server::config::ExportOptions::default()).await;
    post(
        &s,
        vec![
            group("a", &["Group/b", "Patient/pa"]),
            group("b", &["Group/c", "Patient/pb", "Group/b"]),
            group("c", &["Group/a", "Patient/pc"]),
            patient("pa"),
            patient("pb"),
            patient("pc"),
            patient("outside"),
        ],
    )
    .await;
    let (status, manifest) = run(&s, "/Group/b/$export").await;
    assert_eq!(status, StatusCode::OK, "{manifest}");
    assert_eq!(exported_patients(&s, &manifest).await, ["pa", "pb", "pc"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_bounds_are_configurable() {
    let s = common::start(
        &[],
        server::config::ExportOptions {
            export_group_max_depth: 1,
            export_group_max_members: 3,
            ..Default::default()
        },
    )
    .await;
    post(
        &s,
        vec![
            group("flat", &["Patient/p1", "Patient/p2", "Patient/p3"]),
            group("wide", &["Patient/p1", "Patient/p2", "Group/flat"]),
            group("one", &["Group/two"]),
            group("two", &["Group/three"]),
            group("three", &["Patient/p1"]),
            patient("p1"),
            patient("p2"),
            patient("p3"),
        ],
    )
    .await;
    let (status, manifest) = run(&s, "/Group/flat/$export").await;
    assert_eq!(status, StatusCode::OK, "{manifest}");
    assert_eq!(exported_patients(&s, &manifest).await, ["p1", "p2", "p3"]);
    // 3 + 3 member entries.
    let (status, body) = run(&s, "/Group/wide/$export").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("more than 3 members"), "{body}");
    let (status, body) = run(&s, "/Group/one/$export").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.to_string().contains("more than 1 levels deep"),
        "{body}"
    );
}

/// A POST kick-off's `patient` references are bounded like a Group's members
/// (`--export-group-max-members`): before, their number was bounded only by the request body
/// (a 100 MiB body holds about 1.6 million), and the list was parsed again on every status
/// poll. More than the bound answers 400 `too-costly` naming `patient` at kick-off; exactly the
/// bound is accepted and exports those patients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_references_of_a_kickoff_are_bounded_like_group_members() {
    let s = common::start(
        &[],
        server::config::ExportOptions {
            export_group_max_members: 3,
            ..Default::default()
        },
    )
    .await;
    post(
        &s,
        vec![patient("p1"), patient("p2"), patient("p3"), patient("p4")],
    )
    .await;
    let kickoff = |ids: &[&str]| {
        let parameter: Vec<Value> = ids
            .iter()
            .map(|id| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}}))
            .chain([json!({"name": "_type", "valueString": "Patient"})])
            .collect();
        s.c.post(format!("{}/Patient/$export", s.base))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .header("content-type", "application/fhir+json")
            .json(&json!({"resourceType": "Parameters", "parameter": parameter}))
            .send()
    };
    let r = kickoff(&["p1", "p2", "p3", "p4"]).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert_eq!(body["issue"][0]["code"], "too-costly", "{body}");
    assert_eq!(body["issue"][0]["expression"][0], "patient", "{body}");
    assert!(
        body.to_string().contains("--export-group-max-members"),
        "{body}"
    );
    // Exactly the bound is accepted.
    let r = kickoff(&["p1", "p2", "p4"]).await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let url = r.headers()["content-location"].to_str().unwrap().to_owned();
    let manifest = s.wait(&url).await;
    assert_eq!(exported_patients(&s, &manifest).await, ["p1", "p2", "p4"]);
}

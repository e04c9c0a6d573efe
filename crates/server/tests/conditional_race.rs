//! Conditional creates decided atomically: many clients sending the same conditional create at
//! the same moment (`If-None-Exist`, a Bundle entry's `request.ifNoneExist`) create one resource,
//! and the others are answered with it. Over real HTTP against the real router on the test
//! store's backend (SQLite, or PostgreSQL with `FHIRHOSE_TEST_DATABASE`); the clients wait at a
//! barrier and send together, so their requests overlap.

mod common;

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};

/// Clients sending at once.
const CLIENTS: usize = 32;

const SYSTEM: &str = "urn:x";

fn patient(mrn: &str) -> Value {
    json!({"resourceType": "Patient", "birthDate": "1970-01-01",
        "identifier": [{"system": SYSTEM, "value": mrn}]})
}

async fn start() -> common::Server {
    common::start(&[], server::config::ExportOptions::default()).await
}

/// How many Patients have the identifier `urn:x|mrn`.
async fn matches(s: &common::Server, mrn: &str) -> u64 {
    let r =
        s.c.get(format!(
            "{}/Patient?identifier={SYSTEM}|{mrn}&_summary=count",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let b: Value = r.json().await.unwrap();
    b["total"].as_u64().unwrap()
}

/// Runs `CLIENTS` requests made by `request(i)` together (each client on a connection of its
/// own, released at one barrier): their statuses and bodies.
async fn together<F>(request: F) -> Vec<(StatusCode, String)>
where
    F: Fn(usize, &reqwest::Client) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let request = Arc::new(request);
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (barrier, request) = (barrier.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let req = request(i, &c);
            barrier.wait().await;
            let r = req.send().await.unwrap();
            let status = r.status();
            (status, r.text().await.unwrap())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// 32 clients `POST /Patient` with the same `If-None-Exist` at the same moment (half of them
/// with its two parameters in the other order). Before, the condition ran as a search before the
/// write and under no lock: several found nothing and several created (measured on SQLite: 3 to
/// 32 Patients with the one identifier). Now exactly one is created (201) and every other client
/// is answered 200 with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_conditional_creates_of_one_condition_create_once() {
    let s = start().await;
    for round in 0..3 {
        let mrn = format!("rest-{round}");
        let base = s.base.clone();
        let m = mrn.clone();
        let answers = together(move |i, c| {
            let condition = if i % 2 == 0 {
                format!("identifier={SYSTEM}|{m}&birthdate=1970-01-01")
            } else {
                format!("birthdate=1970-01-01&identifier={SYSTEM}|{m}")
            };
            c.post(format!("{base}/Patient"))
                .header("content-type", "application/fhir+json")
                .header("if-none-exist", condition)
                .body(patient(&m).to_string())
        })
        .await;
        let created = answers
            .iter()
            .filter(|(st, _)| *st == StatusCode::CREATED)
            .count();
        let matched = answers
            .iter()
            .filter(|(st, _)| *st == StatusCode::OK)
            .count();
        let stored = matches(&s, &mrn).await;
        assert_eq!(
            (stored, created, matched),
            (1, 1, CLIENTS - 1),
            "round {round}: {stored} Patients with one identifier; answers {:?}",
            answers
                .iter()
                .map(|(st, _)| st.as_u16())
                .collect::<Vec<_>>()
        );
    }
}

/// 32 clients post a transaction with two conditional creates at the same moment, half of them
/// with the entries in the other order. Before, several transactions created each Patient. Now
/// each Patient is created once, and every transaction succeeds (the conditions' locks are taken
/// in one order, so two transactions never wait for each other's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bundle_conditional_creates_create_once_and_never_deadlock() {
    let s = start().await;
    for round in 0..3 {
        let (a, b) = (format!("tx-a-{round}"), format!("tx-b-{round}"));
        let base = s.base.clone();
        let (ma, mb) = (a.clone(), b.clone());
        let answers = together(move |i, c| {
            let entry = |mrn: &str| {
                json!({"resource": patient(mrn),
                    "request": {"method": "POST", "url": "Patient",
                        "ifNoneExist": format!("identifier={SYSTEM}|{mrn}")}})
            };
            let entries = if i % 2 == 0 {
                json!([entry(&ma), entry(&mb)])
            } else {
                json!([entry(&mb), entry(&ma)])
            };
            c.post(format!("{base}/"))
                .header("content-type", "application/fhir+json")
                .body(
                    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
                        .to_string(),
                )
        })
        .await;
        for (st, body) in &answers {
            assert_eq!(*st, StatusCode::OK, "round {round}: {body}");
        }
        assert_eq!(
            (matches(&s, &a).await, matches(&s, &b).await),
            (1, 1),
            "round {round}: Patients per identifier"
        );
    }
}

/// A conditional create whose condition another request holds (here the test, through the
/// server's store) waits for it at most `CONDITION_LOCK_WAIT` and is then answered 503 with
/// `Retry-After`, creating nothing; once the condition is free the same request creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_condition_held_past_the_wait_is_answered_503_and_creates_nothing() {
    let s = start().await;
    let store = s.db.store.clone();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let key = store::ConditionKey::new(
            "Patient",
            &[("identifier".to_string(), format!("{SYSTEM}|held"))],
        );
        let _held = store
            .lock_conditions(&[key], std::time::Duration::from_secs(5))
            .unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv();
    });
    locked_rx.recv().unwrap();
    let post = || {
        s.c.post(format!("{}/Patient", s.base))
            .header("content-type", "application/fhir+json")
            .header("if-none-exist", format!("identifier={SYSTEM}|held"))
            .body(patient("held").to_string())
            .send()
    };
    let r = post().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let body = r.text().await.unwrap();
    assert!(body.contains("\"OperationOutcome\""), "{body}");
    assert_eq!(matches(&s, "held").await, 0);
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let r = post().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(matches(&s, "held").await, 1);
}

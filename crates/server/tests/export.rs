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
    for &(t, n) in test_support::SYNTHEA_100_COUNTS {
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
        // The views' job parameters belong to $viewdefinition-export, which checks the views.
        ("/$export?_view=%7B%7D", StatusCode::BAD_REQUEST),
        ("/Patient/$export?_viewFormat=csv", StatusCode::BAD_REQUEST),
    ] {
        let r = s.kickoff(path).await;
        assert_eq!(r.status(), want, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome", "{path}");
    }
    // HEAD has no side effects: it started an export before (the router serves HEAD with the
    // GET route).
    for path in ["/$export", "/Patient/$export", "/Group/nope/$export"] {
        let r =
            s.c.head(format!("{}{path}", s.base))
                .header("accept", "application/fhir+json")
                .header("prefer", "respond-async")
                .send()
                .await
                .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
    }
    let jobs: Value =
        s.c.get(format!("{}/exports?format=json", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");
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

/// `_typeFilter` queries are evaluated on every resource of their type, each of a type's
/// queries on each resource: one kick-off with thousands of them (or of OR-ed values) made
/// every Observation cost a worker milliseconds to seconds, and nothing bounded it. A type's
/// queries together are now held to what one search may ask (`--search-max-params`,
/// `--search-max-values`, ...); each type on its own.
#[tokio::test(flavor = "multi_thread")]
async fn type_filters_are_held_to_the_search_limits_per_type() {
    let s = start().await;
    let codes = |prefix: &str, n: usize| {
        (0..n)
            .map(|i| format!("{prefix}{i}"))
            .collect::<Vec<_>>()
            .join("%2C")
    };
    let filter = |ty: &str, values: &str| format!("&_typeFilter={ty}%3Fcode%3D{values}");
    // 51 queries of one value each: more parameters than one search may have.
    let many: String = (0..51)
        .map(|i| filter("Observation", &format!("x{i}")))
        .collect();
    // Two queries of 600 values each: more values than one search may have.
    let wide = filter("Observation", &codes("a", 600)) + &filter("Observation", &codes("b", 600));
    for query in [many, wide] {
        let r = s
            .kickoff(&format!("/$export?_type=Observation{query}"))
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["expression"][0], "_typeFilter", "{v}");
        let text = v["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(text.contains("Observation"), "{text}");
    }
    // 600 values for each of two types: each type within the limits.
    let two_types =
        filter("Observation", &codes("a", 600)) + &filter("Condition", &codes("b", 600));
    let status_url = s
        .kickoff_accepted(&format!("/$export?_type=Observation,Condition{two_types}"))
        .await;
    let r = s.c.delete(&status_url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

/// `_elements` names top-level elements of the R4 model: before, any name of letters, digits
/// and `_` was accepted and kept, and each exported resource compared each of its keys with
/// every kept name (a prefix test for choice elements), so one POST kick-off listing a hundred
/// thousand made-up names made every resource of the export cost a worker that many string
/// comparisons per key. A name that is no element of its type (or, without a type, of any
/// resource type) is refused (400 naming `_elements`; a warning under `handling=lenient`), and
/// repeated names are kept once.
#[tokio::test(flavor = "multi_thread")]
async fn elements_must_name_elements_of_the_model() {
    let s = start().await;
    for elements in [
        "Patient.gender,Patient.nonsense",
        "nonsense",
        "Patient.valueQuantity",
    ] {
        let r = s
            .kickoff(&format!("/$export?_type=Patient&_elements={elements}"))
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{elements}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
        assert_eq!(v["issue"][0]["expression"][0], "_elements", "{v}");
    }
    // A hundred thousand made-up names in one POST body: refused before anything is planned.
    let many: Vec<String> = (0..100_000).map(|i| format!("x{i}")).collect();
    let r =
        s.c.post(format!("{}/$export", s.base))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .header("content-type", "application/fhir+json")
            .json(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "_type", "valueString": "Patient"},
                {"name": "_elements", "valueString": many.join(",")},
            ]}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Real elements, repeated, typed or not: the export keeps them (and the mandatory ones).
    let m = s
        .export(
            "/$export?_type=Patient&_elements=gender,gender,Patient.birthDate,Observation.value",
        )
        .await;
    let url = m["output"][0]["url"].as_str().unwrap();
    let text = s.c.get(url).send().await.unwrap().text().await.unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let mut keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["birthDate", "gender", "id", "meta", "resourceType"],
        "{first}"
    );
}

/// GETs a status URL until it answers something other than 429 (polls faster than the server
/// allows are refused).
async fn poll(s: &Server, url: &str) -> reqwest::Response {
    loop {
        let r = s.c.get(url).send().await.unwrap();
        if r.status() != StatusCode::TOO_MANY_REQUESTS {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
}

/// `Prefer: wait=N` on a status URL holds the answer while the export is unchanged (the
/// `ETag` the request names in `If-None-Match`, else the state it found), at most N seconds,
/// and says so with `Preference-Applied: wait`; a waiting request asked again at once is paced,
/// not refused with 429; anything but a whole positive number of seconds is no wait; a
/// request that waits answers with the manifest as soon as the export ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_status_request_waits_for_a_change_when_asked() {
    use std::time::{Duration, Instant};
    // No workers: the export stays queued, unchanged.
    let s = common::start(
        &[],
        server::config::ExportOptions {
            export_workers: Some(0),
            ..Default::default()
        },
    )
    .await;
    let status_url = kicked_off(&s, "/$export").await;
    let get = |prefer: Option<&'static str>, tag: Option<String>| {
        let mut rq = s.c.get(&status_url);
        if let Some(p) = prefer {
            rq = rq.header("prefer", p);
        }
        if let Some(t) = tag {
            rq = rq.header("if-none-match", t);
        }
        rq.send()
    };
    let r = poll(&s, &status_url).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers().get("preference-applied").is_none());
    let tag = r.headers()["etag"].to_str().unwrap().to_string();
    for _ in 0..2 {
        let t = Instant::now();
        let r = get(Some("wait=1"), Some(tag.clone())).await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        assert_eq!(r.headers()["preference-applied"], "wait");
        assert_eq!(r.headers()["etag"], tag.as_str());
        assert!(t.elapsed() >= Duration::from_millis(900), "it waited");
    }
    // A page the client does not have: the answer is ready at once.
    let t = Instant::now();
    let r = get(Some("wait=20"), Some("W/\"other\"".into()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.headers()["preference-applied"], "wait");
    assert!(t.elapsed() < Duration::from_secs(10));
    for prefer in [
        "wait=abc",
        "wait=-1",
        "wait=0",
        "wait=99999999999999999999999",
        "wait",
    ] {
        let r = loop {
            let r = get(Some(prefer), Some(tag.clone())).await.unwrap();
            if r.status() != StatusCode::TOO_MANY_REQUESTS {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        };
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{prefer}");
        assert!(r.headers().get("preference-applied").is_none(), "{prefer}");
    }

    // With workers, a request that waits gets the manifest when the export ends.
    let s = common::start(&[], Default::default()).await;
    let status_url = kicked_off(&s, "/$export").await;
    let r =
        s.c.get(&status_url)
            .header("prefer", "wait=20")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["preference-applied"], "wait");
    let manifest: Value = r.json().await.unwrap();
    assert!(manifest["output"].is_array(), "{manifest}");
}

/// Kicks off `path` (202 expected): the status URL.
async fn kicked_off(s: &Server, path: &str) -> String {
    let r = s.kickoff(path).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Every entry of a manifest's `output` and `error`, by URL.
fn entries(m: &Value) -> Vec<Value> {
    ["output", "error"]
        .iter()
        .flat_map(|k| m[k].as_array().cloned().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn partial_manifests_are_paged_while_running_and_list_every_file_once() {
    // One worker, small items and files: the export runs long enough to be seen running.
    let s = common::start(
        &[common::synthea()],
        server::config::ExportOptions {
            export_workers: Some(1),
            export_file_resources: 400,
            export_item_resources: 1500,
            ..Default::default()
        },
    )
    .await;
    let types = "_type=Patient,Observation,Encounter,Condition,Procedure";
    let r =
        s.c.get(format!(
            "{}/Patient/$export?allowPartialManifests=true&{types}",
            s.base
        ))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async, separate-export-status")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        r.headers()["preference-applied"],
        "respond-async, separate-export-status"
    );
    let status_url = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    // Poll while it runs: with separate-export-status every poll is 200 and the job's status
    // is in X-Export-Status; a running job's body is the partial manifest.
    let mut listed_early: HashMap<String, Value> = HashMap::new();
    let mut downloaded_early = 0;
    let first = loop {
        let r = poll(&s, &status_url).await;
        assert_eq!(r.status(), StatusCode::OK);
        let job_status = r.headers()["x-export-status"].to_str().unwrap().to_string();
        let page: Value = r.json().await.unwrap();
        match job_status.as_str() {
            "202 Accepted" => {
                // Follow the pages that exist so far.
                let mut page = page;
                loop {
                    for e in entries(&page) {
                        let url = e["url"].as_str().unwrap().to_string();
                        if let Some(before) = listed_early.get(&url) {
                            assert_eq!(before, &e, "a listed file never changes");
                        } else if downloaded_early < 3 {
                            // A file listed while the export runs can be downloaded at once.
                            let body = s.c.get(&url).send().await.unwrap();
                            assert_eq!(body.status(), StatusCode::OK);
                            let n = body.text().await.unwrap().lines().count();
                            assert_eq!(e["count"], n);
                            downloaded_early += 1;
                        }
                        listed_early.insert(url, e);
                    }
                    match page["link"][0]["url"].as_str() {
                        Some(next) => {
                            assert_eq!(page["link"][0]["relation"], "next");
                            let r = poll(&s, next).await;
                            page = r.json().await.unwrap();
                        }
                        None => break,
                    }
                }
            }
            "200 OK" => break page,
            other => panic!("job status {other}: {page}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
    };
    assert!(
        !listed_early.is_empty() && downloaded_early > 0,
        "partial manifests listed files while the export ran"
    );
    // The complete manifest, page by page: every file exactly once.
    let mut all: Vec<Value> = Vec::new();
    let mut page = first;
    let mut pages = 1;
    loop {
        all.extend(entries(&page));
        let Some(next) = page["link"][0]["url"].as_str().map(str::to_string) else {
            break;
        };
        let r = poll(&s, &next).await;
        assert_eq!(r.headers()["x-export-status"], "200 OK");
        page = r.json().await.unwrap();
        pages += 1;
    }
    assert!(pages > 1, "the manifest is paged");
    let urls: HashSet<&str> = all.iter().map(|e| e["url"].as_str().unwrap()).collect();
    assert_eq!(urls.len(), all.len(), "no file on two pages");
    for (url, e) in &listed_early {
        assert!(
            all.contains(e),
            "{url} listed while running is in the final pages unchanged"
        );
    }
    // The same files as a plain export of the same request, by type and count.
    let plain = s.export(&format!("/Patient/$export?{types}")).await;
    let sum = |list: &[Value]| {
        let mut by: HashMap<String, u64> = HashMap::new();
        for e in list {
            *by.entry(e["type"].as_str().unwrap().to_string())
                .or_default() += e["count"].as_u64().unwrap();
        }
        by
    };
    let paged_output: Vec<Value> = all
        .iter()
        .filter(|e| e["type"] != "OperationOutcome")
        .cloned()
        .collect();
    assert_eq!(sum(&paged_output), sum(plain["output"].as_array().unwrap()));
    // Pages that do not exist, and a page of an export without partial manifests.
    let r =
        s.c.get(format!("{status_url}?page=999999"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r =
        s.c.get(format!("{status_url}?page=x"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

/// The lines of a manifest's output files.
async fn lines_of(s: &Server, m: &Value) -> Vec<Vec<Value>> {
    let mut files = Vec::new();
    for o in m["output"].as_array().unwrap() {
        let text =
            s.c.get(o["url"].as_str().unwrap())
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(o["count"], lines.len());
        files.push(lines);
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn organize_output_by_patient_writes_one_block_per_patient() {
    let s = common::start(
        &[common::synthea()],
        server::config::ExportOptions {
            export_file_resources: 2000,
            ..Default::default()
        },
    )
    .await;
    let types = "_type=Patient,Encounter,Condition,Observation,Immunization";
    let m = s
        .export(&format!(
            "/Patient/$export?organizeOutputBy=Patient&{types}"
        ))
        .await;
    assert_eq!(m["outputOrganizedBy"], "Patient");
    assert!(m["output"].as_array().unwrap().len() > 1, "several files");
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut patients_seen: HashSet<String> = HashSet::new();
    let mut ids: HashSet<String> = HashSet::new();
    for (n, o) in m["output"].as_array().unwrap().iter().enumerate() {
        assert!(
            o.get("type").is_none(),
            "organized files hold several types"
        );
        assert!(
            o["url"]
                .as_str()
                .unwrap()
                .ends_with(&format!("output-{}.ndjson", n + 1))
                || o["url"].as_str().unwrap().contains("/output-"),
        );
    }
    for lines in lines_of(&s, &m).await {
        // Every file starts with a block; a block is header, Patient, then resources of that
        // patient only.
        assert_eq!(lines[0]["resourceType"], "Parameters");
        let mut current: Option<String> = None;
        let mut expect_patient = false;
        for v in lines {
            let t = v["resourceType"].as_str().unwrap().to_string();
            if t == "Parameters" {
                assert_eq!(v["parameter"][0]["name"], "header");
                let r = v["parameter"][0]["valueReference"]["reference"]
                    .as_str()
                    .unwrap();
                let pid = r.strip_prefix("Patient/").unwrap().to_string();
                assert!(patients_seen.insert(pid.clone()), "one block per patient");
                current = Some(pid);
                expect_patient = true;
                continue;
            }
            let pid = current.clone().expect("a resource after a header");
            if expect_patient {
                assert_eq!(t, "Patient", "the Patient first in its block");
                assert_eq!(v["id"], pid.as_str());
                expect_patient = false;
            } else {
                let text = v.to_string();
                assert!(
                    text.contains(&format!("Patient/{pid}\"")),
                    "a {t} in Patient/{pid}'s block references it"
                );
            }
            assert!(ids.insert(format!("{t}/{}", v["id"].as_str().unwrap())));
            *counts.entry(t).or_default() += 1;
        }
    }
    assert_eq!(patients_seen.len(), 100);
    // The same resources as a plain export.
    let plain = s.export(&format!("/Patient/$export?{types}")).await;
    let mut plain_counts: HashMap<String, usize> = HashMap::new();
    for o in plain["output"].as_array().unwrap() {
        *plain_counts
            .entry(o["type"].as_str().unwrap().to_string())
            .or_default() += o["count"].as_u64().unwrap() as usize;
    }
    assert_eq!(counts, plain_counts);
}

#[tokio::test(flavor = "multi_thread")]
async fn stu3_parameters_are_validated_in_get_and_post() {
    let s = start().await;
    let bad = |path: &'static str, param: &'static str| {
        let s = &s;
        async move {
            let r = s.kickoff(path).await;
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["resourceType"], "OperationOutcome");
            assert!(oo.to_string().contains(param), "{path}: {oo}");
        }
    };
    bad(
        "/$export?allowPartialManifests=yes",
        "allowPartialManifests",
    )
    .await;
    bad(
        "/Patient/$export?organizeOutputBy=Encounter",
        "organizeOutputBy",
    )
    .await;
    bad("/$export?organizeOutputBy=Patient", "organizeOutputBy").await;
    bad(
        "/Patient/$export?organizeOutputBy=Patient&includeAssociatedData=LatestProvenanceResources",
        "organizeOutputBy",
    )
    .await;
    bad(
        "/Patient/$export?organizeOutputBy=Patient&_container=deid&_anonymizationConfig=c.json",
        "organizeOutputBy",
    )
    .await;
    // POST Parameters: valueBoolean and valueCode.
    let post = |body: Value| {
        let s = &s;
        async move {
            s.c.post(format!("{}/Patient/$export", s.base))
                .header("accept", "application/fhir+json")
                .header("prefer", "respond-async")
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .unwrap()
        }
    };
    let ok = post(json!({"resourceType": "Parameters", "parameter": [
        {"name": "allowPartialManifests", "valueBoolean": true},
        {"name": "organizeOutputBy", "valueCode": "Patient"},
        {"name": "_type", "valueString": "Patient,Condition"}]}))
    .await;
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    let status_url = ok.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let m = s.wait(&status_url).await;
    assert_eq!(m["outputOrganizedBy"], "Patient");
    let r = post(json!({"resourceType": "Parameters", "parameter": [
        {"name": "organizeOutputBy", "valueString": "Group"}]}))
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = post(json!({"resourceType": "Parameters", "parameter": [
        {"name": "allowPartialManifests", "valueInteger": 1}]}))
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // A page asked of an export without partial manifests.
    let (url, _) = s
        .export_with_status("/Patient/$export?_type=Condition")
        .await;
    let r = s.c.get(format!("{url}?page=1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

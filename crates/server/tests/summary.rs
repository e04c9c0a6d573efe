//! `_summary=true|text|data` on reads, vreads and searches (matches and `_include`d /
//! `_revinclude`d resources alike), each subset tagged `SUBSETTED`; `_summary` with `_elements`
//! refused as HAPI FHIR refuses it. Over real HTTP against the real router, on the test store's
//! backend (SQLite, or PostgreSQL with `FHIRHOSE_TEST_DATABASE`).

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SUBSETTED: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

async fn start() -> common::Server {
    common::start(&[], server::config::ExportOptions::default()).await
}

/// A request's status, ETag and body text.
async fn send(
    s: &common::Server,
    method: Method,
    path: &str,
    body: Option<String>,
) -> (StatusCode, Option<String>, String) {
    let mut req = s.c.request(method, format!("{}{}", s.base, path));
    if let Some(b) = body {
        req = req.header("content-type", "application/fhir+json").body(b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let etag = r
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string());
    (status, etag, r.text().await.unwrap())
}

async fn get(s: &common::Server, path: &str) -> (StatusCode, Value) {
    let (st, _, text) = send(s, Method::GET, path, None).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
    (st, v)
}

async fn put(s: &common::Server, path: &str, body: Value) {
    put_text(s, path, body.to_string()).await;
}

async fn put_text(s: &common::Server, path: &str, body: String) {
    let (st, _, text) = send(s, Method::PUT, path, Some(body)).await;
    assert!(st.is_success(), "{path}: {st} {text}");
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

/// Whether `meta.tag` holds the `SUBSETTED` tag, once.
fn subsetted(v: &Value) -> bool {
    let tags = v["meta"]["tag"].as_array().cloned().unwrap_or_default();
    let n = tags
        .iter()
        .filter(|t| t["system"] == SUBSETTED && t["code"] == "SUBSETTED")
        .count();
    assert!(n <= 1, "tagged twice: {v}");
    n == 1
}

fn narrative(text: &str) -> Value {
    json!({"status": "generated",
        "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{text}</div>")})
}

fn patient(gender: &str) -> Value {
    json!({"resourceType": "Patient", "id": "p1", "text": narrative("Jo Doe"),
        "extension": [{"url": "http://example.org/race", "valueString": "x"}],
        "identifier": [{"id": "i", "system": "http://example.org/mrn", "value": "1"}],
        "name": [{"family": "Doe", "given": ["Jo"]}], "gender": gender,
        "birthDate": "1970-01-01", "maritalStatus": {"text": "M"},
        "contact": [{"name": {"family": "Roe"}}],
        "link": [{"id": "l", "other": {"reference": "Patient/p2"}, "type": "seealso"}]})
}

async fn load(s: &common::Server) {
    put(
        s,
        "/Patient/p2",
        json!({"resourceType": "Patient", "id": "p2"}),
    )
    .await;
    put(s, "/Patient/p1", patient("female")).await;
    put(s, "/Patient/p1", patient("male")).await;
    // As text: the decimal `1.50` is stored and returned as written.
    let narrative = narrative("height");
    let obs = format!(
        r#"{{"resourceType":"Observation","id":"o1","text":{narrative},"status":"final",
        "category":[{{"text":"vital-signs"}}],
        "code":{{"coding":[{{"system":"http://loinc.org","code":"8302-2"}}]}},
        "subject":{{"reference":"Patient/p1"}},
        "valueQuantity":{{"value":1.50,"unit":"m","extension":[{{"url":"http://example.org/q","valueString":"e"}}]}},
        "note":[{{"text":"measured twice"}}]}}"#
    );
    put_text(s, "/Observation/o1", obs).await;
}

#[tokio::test]
async fn reads_and_vreads_answer_summaries() {
    let s = start().await;
    load(&s).await;

    // true: the summary elements, recursively (Identifier.id and Patient.link.id are not).
    let (st, etag, text) = send(&s, Method::GET, "/Patient/p1?_summary=true", None).await;
    assert_eq!(st, StatusCode::OK, "{text}");
    assert_eq!(etag.as_deref(), Some("W/\"2\""));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        keys(&v),
        [
            "resourceType",
            "id",
            "meta",
            "identifier",
            "name",
            "gender",
            "birthDate",
            "link"
        ]
    );
    assert_eq!(
        v["identifier"],
        json!([{"system": "http://example.org/mrn", "value": "1"}])
    );
    assert_eq!(
        v["link"],
        json!([{"other": {"reference": "Patient/p2"}, "type": "seealso"}])
    );
    assert_eq!(v["meta"]["versionId"], "2");
    assert!(subsetted(&v), "{v}");

    // A vread cuts the version asked for.
    let (st, etag, text) = send(
        &s,
        Method::GET,
        "/Patient/p1/_history/1?_summary=true",
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{text}");
    assert_eq!(etag.as_deref(), Some("W/\"1\""));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["gender"], "female");
    assert!(v.get("contact").is_none() && subsetted(&v), "{v}");

    // text: the narrative, id, meta and the top-level mandatory elements (none in Patient).
    let (st, v) = get(&s, "/Patient/p1?_summary=text").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(keys(&v), ["resourceType", "id", "meta", "text"]);
    assert!(subsetted(&v));
    let (_, v) = get(&s, "/Observation/o1/_history/1?_summary=text").await;
    assert_eq!(
        keys(&v),
        ["resourceType", "id", "meta", "text", "status", "code"]
    );

    // data: all but the narrative.
    let (st, v) = get(&s, "/Patient/p1?_summary=data").await;
    assert_eq!(st, StatusCode::OK);
    let mut whole = patient("male");
    whole.as_object_mut().unwrap().remove("text");
    for (k, val) in whole.as_object().unwrap() {
        assert_eq!(&v[k], val, "{k}");
    }
    assert!(v.get("text").is_none() && subsetted(&v));

    // false: the stored resource, untagged.
    let (st, v) = get(&s, "/Patient/p1?_summary=false").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["text"], patient("male")["text"]);
    assert!(!subsetted(&v));

    // The stored decimal text is what a summary writes.
    let (_, _, text) = send(&s, Method::GET, "/Observation/o1?_summary=true", None).await;
    assert!(
        text.contains(r#""valueQuantity":{"value":1.50,"unit":"m"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn summaries_that_cannot_be_answered_are_refused() {
    let s = start().await;
    load(&s).await;
    for path in [
        "/Patient/p1?_summary=true&_elements=name",
        "/Patient/p1/_history/2?_elements=name&_summary=data",
        "/Patient/p1?_summary=count",
        "/Patient/p1?_summary=maybe",
        "/Patient/p1?_summary=true&_summary=text",
        "/Patient?_summary=text&_elements=gender",
        "/Patient?_summary=count&_elements=gender",
        "/Patient?_summary=all",
    ] {
        for prefer in ["handling=strict", "handling=lenient"] {
            let r =
                s.c.get(format!("{}{path}", s.base))
                    .header("prefer", prefer)
                    .send()
                    .await
                    .unwrap();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path} {prefer}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
            assert_eq!(v["issue"][0]["code"], "invalid", "{path}: {v}");
            assert_eq!(v["issue"][0]["expression"][0], "_summary", "{path}: {v}");
        }
    }
    // `_elements` with `_summary=false` is `_elements`.
    let (st, v) = get(&s, "/Patient/p1?_summary=false&_elements=gender").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(keys(&v), ["resourceType", "id", "meta", "gender"]);
    assert!(subsetted(&v));
}

#[tokio::test]
async fn searches_cut_matches_and_included_resources() {
    let s = start().await;
    load(&s).await;

    let (st, b) = get(
        &s,
        "/Observation?_include=Observation:subject&_summary=true",
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let entries = b["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{b}");
    let (m, i) = (&entries[0], &entries[1]);
    assert_eq!(m["search"]["mode"], "match");
    assert_eq!(i["search"]["mode"], "include");
    let (m, i) = (&m["resource"], &i["resource"]);
    // Observation.category is not summary in R4; nor is the Quantity's extension.
    assert_eq!(
        keys(m),
        [
            "resourceType",
            "id",
            "meta",
            "status",
            "code",
            "subject",
            "valueQuantity"
        ]
    );
    assert_eq!(
        m["valueQuantity"].to_string(),
        r#"{"value":1.50,"unit":"m"}"#
    );
    assert_eq!(i["id"], "p1");
    assert!(i.get("contact").is_none() && i.get("text").is_none(), "{i}");
    assert!(subsetted(m) && subsetted(i));

    // _revinclude, under data.
    let (st, b) = get(
        &s,
        "/Patient?_id=p1&_revinclude=Observation:subject&_summary=data",
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let entries = b["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{b}");
    for e in entries {
        let r = &e["resource"];
        assert!(r.get("text").is_none() && subsetted(r), "{r}");
    }
    assert_eq!(
        entries[0]["resource"]["contact"][0]["name"]["family"],
        "Roe"
    );
    assert_eq!(entries[1]["resource"]["note"][0]["text"], "measured twice");

    // text, and a total.
    let (_, b) = get(&s, "/Patient?_summary=text&_total=accurate&_sort=_id").await;
    assert_eq!(b["total"], 2);
    let r = &b["entry"][0]["resource"];
    assert_eq!(keys(r), ["resourceType", "id", "meta", "text"]);
    let r = &b["entry"][1]["resource"];
    assert_eq!(keys(r), ["resourceType", "id", "meta"], "no text to keep");
    // Nothing of p2 was left out: it is answered whole, untagged (review: the tag said a
    // complete resource was incomplete, and kept the client from writing it back).
    assert!(!subsetted(r));
    let (_, whole) = get(&s, "/Patient/p2").await;
    assert_eq!(r, &whole);

    // count: the total alone, as before.
    let (st, b) = get(&s, "/Patient?_summary=count").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b["total"], 2);
    assert!(b["entry"].as_array().is_none_or(|e| e.is_empty()), "{b}");

    // The next link carries `_summary`, and the next page is cut too.
    let (_, b) = get(&s, "/Patient?_summary=true&_count=1&_sort=_id").await;
    assert!(subsetted(&b["entry"][0]["resource"]));
    let next = b["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(next.contains("_summary=true"), "{next}");
    let r = s.c.get(next).send().await.unwrap();
    let b: Value = r.json().await.unwrap();
    let p2 = &b["entry"][0]["resource"];
    assert_eq!(p2["id"], "p2");
    // p2 has only summary elements: nothing left out, not tagged.
    assert!(!subsetted(p2));
}

/// Review: a resource read with `_summary=true` and written back (`PUT`, `POST`, a Bundle
/// entry) was stored as it came — the elements the summary left out gone from the new version,
/// and the `SUBSETTED` tag kept in every later read and export. It is refused (400, the tag
/// named), and nothing is written.
#[tokio::test]
async fn a_subsetted_resource_is_not_stored() {
    let s = start().await;
    load(&s).await;
    let (_, cut) = get(&s, "/Patient/p1?_summary=true").await;
    assert!(subsetted(&cut));
    let (st, _, text) = send(&s, Method::PUT, "/Patient/p1", Some(cut.to_string())).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{text}");
    let outcome: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        text.contains("SUBSETTED") && text.contains("meta.tag"),
        "{text}"
    );
    let mut created = cut.clone();
    created.as_object_mut().unwrap().remove("id");
    let (st, _, text) = send(&s, Method::POST, "/Patient", Some(created.to_string())).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{text}");
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": cut, "request": {"method": "PUT", "url": "Patient/p1"}}]});
    let (st, _, text) = send(&s, Method::POST, "/", Some(batch.to_string())).await;
    assert_eq!(st, StatusCode::OK, "{text}");
    let b: Value = serde_json::from_str(&text).unwrap();
    assert!(
        b["entry"][0]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("400"),
        "{b}"
    );
    // The whole resource, at its version, untouched.
    let (_, whole) = get(&s, "/Patient/p1").await;
    assert_eq!(whole["meta"]["versionId"], "2");
    assert!(!subsetted(&whole));
    assert_eq!(whole["maritalStatus"]["text"], "M");
    let (_, b) = get(&s, "/Patient?_total=accurate").await;
    assert_eq!(b["total"], 2, "nothing created: {b}");
}

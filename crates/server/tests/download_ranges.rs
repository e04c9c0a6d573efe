//! HTTP range requests on export file downloads, over real HTTP, for each destination: the local
//! folder, Azure Blob (Azurite, `FHIRHOSE_TEST_AZURITE`) and S3 (moto, `FHIRHOSE_TEST_S3`), both
//! started by `scripts/test.sh`. The same checks run on each: `Accept-Ranges`, a strong `ETag`,
//! `206` with `Content-Range` for one range, a download cut off mid-file and resumed with
//! `Range` + `If-Range` that reassembles the file byte for byte, `416` (an OperationOutcome) for an
//! unsatisfiable range, the whole file for several ranges or a stale `If-Range`, and a gzip answer
//! whose tag never resumes identity bytes.

use reqwest::StatusCode;
use serde_json::Value;

mod common;

use test_support::destination::azurite_connection_string;

/// One Synthea patient (its Bundle: a few hundred resources).
fn one_patient() -> std::path::PathBuf {
    common::synthea().join("Abram_Lemke_6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2.json.gz")
}

/// The largest file of the export's manifest (the Observations of one patient: tens of KB).
async fn largest_file(s: &common::Server, kickoff: &str) -> String {
    let manifest = s.export(kickoff).await;
    let outputs = manifest["output"].as_array().expect("output");
    let obs = outputs
        .iter()
        .find(|o| o["type"] == "Observation")
        .unwrap_or_else(|| panic!("an Observation file: {manifest}"));
    obs["url"].as_str().expect("url").to_string()
}

async fn get(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = c.get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.expect("request")
}

/// Every range check against one file URL.
async fn check_ranges(url: &str) {
    // A client that leaves gzip to the test.
    let c = reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("client");

    // The whole file: Accept-Ranges, a strong ETag, Last-Modified, the exact length.
    let r = get(&c, url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers().clone();
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["content-type"], "application/fhir+ndjson");
    let etag = h["etag"].to_str().expect("etag").to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2,
        "a strong tag: {etag}"
    );
    assert!(h.contains_key("last-modified"));
    let full = r.bytes().await.expect("body").to_vec();
    let len = full.len();
    assert!(len > 1000, "a file worth ranging: {len} bytes");
    assert_eq!(h["content-length"], len.to_string().as_str());

    // HEAD: the same headers, no body.
    let r = c.head(url).send().await.expect("head");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-length"], len.to_string().as_str());
    assert_eq!(r.headers()["etag"], etag.as_str());

    // One range: 206 and exactly those bytes.
    let r = get(&c, url, &[("range", "bytes=10-99")]).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 10-99/{len}").as_str()
    );
    assert_eq!(r.headers()["content-length"], "90");
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.bytes().await.expect("body"), full[10..100]);
    // A suffix, and an end beyond the file (cut at its end).
    let r = get(&c, url, &[("range", "bytes=-100")]).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.expect("body"), full[len - 100..]);
    let r = get(
        &c,
        url,
        &[("range", &format!("bytes={}-{}", len - 5, len + 1000))],
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes {}-{}/{len}", len - 5, len - 1).as_str()
    );
    assert_eq!(r.bytes().await.expect("body"), full[len - 5..]);

    // A download cut off mid-file, resumed where it stopped: the pieces are the file.
    let mut r = get(&c, url, &[]).await;
    let mut got = Vec::new();
    while got.len() < len / 3 {
        let chunk = r.chunk().await.expect("chunk").expect("more bytes");
        got.extend_from_slice(&chunk);
    }
    drop(r); // the connection is dropped mid-body
    let resume = format!("bytes={}-", got.len());
    let r = get(&c, url, &[("range", &resume), ("if-range", &etag)]).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    got.extend_from_slice(&r.bytes().await.expect("rest"));
    assert_eq!(got, full, "resumed download reassembles the file");

    // If-Range of another version (or a weak tag): the whole file, never a splice.
    for stale in ["\"not-this-version\"", &format!("W/{etag}")] {
        let r = get(&c, url, &[("range", &resume), ("if-range", stale)]).await;
        assert_eq!(r.status(), StatusCode::OK, "{stale}");
        assert!(!r.headers().contains_key("content-range"));
        assert_eq!(r.bytes().await.expect("body"), full);
    }

    // Several ranges: refused by answering the whole file.
    let r = get(&c, url, &[("range", "bytes=0-9,20-29")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body"), full);

    // Unsatisfiable or malformed: 416 with the size, as an OperationOutcome.
    for bad in [
        format!("bytes={len}-"),
        "bytes=-0".into(),
        "bytes=9-3".into(),
    ] {
        let r = get(&c, url, &[("range", &bad)]).await;
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes */{len}").as_str()
        );
        let oo: Value = r.json().await.expect("OperationOutcome");
        assert_eq!(oo["resourceType"], "OperationOutcome", "{oo}");
        assert_eq!(oo["issue"][0]["expression"][0], "Range", "{oo}");
    }

    // gzip: another representation, another tag; that tag never resumes identity bytes.
    let r = get(&c, url, &[("accept-encoding", "gzip")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let gz_tag = r.headers()["etag"].to_str().expect("etag").to_string();
    assert_ne!(gz_tag, etag);
    assert!(
        !r.headers().contains_key("accept-ranges"),
        "ranges of the identity bytes only"
    );
    let r = get(
        &c,
        url,
        &[
            ("range", "bytes=10-"),
            ("if-range", &gz_tag),
            ("accept-encoding", "gzip"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    // A range is never compressed.
    let r = get(
        &c,
        url,
        &[("range", "bytes=10-19"), ("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert!(!r.headers().contains_key("content-encoding"));
    assert_eq!(r.bytes().await.expect("body"), full[10..20]);
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_on_folder_downloads() {
    let s = common::start(&[one_patient()], server::config::ExportOptions::default()).await;
    let url = largest_file(&s, "/$export?_type=Observation").await;
    check_ranges(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_on_azure_blob_downloads() {
    let Some(endpoint) = common::external("FHIRHOSE_TEST_AZURITE", "./scripts/azurite.sh") else {
        return;
    };
    let options = server::config::ExportOptions {
        export_destination: "azure".into(),
        azure_connection_string: Some(azurite_connection_string(&endpoint)),
        ..Default::default()
    };
    let s = common::start(&[one_patient()], options).await;
    let container = format!("rng-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let url = largest_file(
        &s,
        &format!("/$export?_type=Observation&_container={container}"),
    )
    .await;
    check_ranges(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_on_s3_downloads() {
    let Some(endpoint) = common::external("FHIRHOSE_TEST_S3", "./scripts/s3.sh") else {
        return;
    };
    let bucket = format!("rng-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("create bucket");
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    let options = server::config::ExportOptions {
        export_destination: "s3".into(),
        s3_bucket: Some(bucket),
        s3_endpoint: Some(endpoint),
        s3_access_key_id: Some("test".into()),
        s3_secret_access_key: Some("test".into()),
        ..Default::default()
    };
    let s = common::start(&[one_patient()], options).await;
    let url = largest_file(&s, "/$export?_type=Observation&_container=ranges").await;
    check_ranges(&url).await;
}

//! HTTP range requests on export file downloads, over real HTTP, for each destination: the local
//! folder, Azure Blob (Azurite, `FHIRHOSE_TEST_AZURITE`) and S3 (moto, `FHIRHOSE_TEST_S3`), both
//! started by `scripts/test.sh`. The same checks run on each: `Accept-Ranges`, a strong `ETag`,
//! `206` with `Content-Range` for one range, a download cut off mid-file and resumed with
//! `Range` + `If-Range` that reassembles the file byte for byte, `416` (an OperationOutcome) for an
//! unsatisfiable range, the whole file for several ranges or a stale `If-Range`, and a gzip answer
//! whose tag never resumes identity bytes. And a file of several download chunks, downloaded whole
//! by several clients at once and by ranges across the chunk boundaries, byte for byte.

use reqwest::StatusCode;
use serde_json::Value;

mod common;

use test_support::destination::azurite_connection_string;

/// One Synthea patient (its Bundle: a few hundred resources).
fn one_patient() -> std::path::PathBuf {
    common::synthea().join("Abram_Lemke_6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2.json.gz")
}

/// The Observation file of the export's manifest (of one patient: tens of KB).
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
    // A file to save, kept by no cache, never sniffed into a page.
    let file = url.rsplit('/').next().expect("a file name");
    assert_eq!(
        h["content-disposition"],
        format!("attachment; filename=\"{file}\"").as_str()
    );
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-content-type-options"], "nosniff");
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

/// The export options of an Azure Blob destination on Azurite (`None`: not available).
fn azure_options() -> Option<server::config::ExportOptions> {
    let endpoint = common::external("FHIRHOSE_TEST_AZURITE", "./scripts/azurite.sh")?;
    Some(server::config::ExportOptions {
        export_destination: "azure".into(),
        azure_connection_string: Some(azurite_connection_string(&endpoint)),
        ..Default::default()
    })
}

/// A fresh container name.
fn container() -> String {
    format!("rng-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// The export options of an S3 destination on moto, with a fresh bucket (`None`: not
/// available).
async fn s3_options() -> Option<server::config::ExportOptions> {
    let endpoint = common::external("FHIRHOSE_TEST_S3", "./scripts/s3.sh")?;
    let bucket = container();
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("create bucket");
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    Some(server::config::ExportOptions {
        export_destination: "s3".into(),
        s3_bucket: Some(bucket),
        s3_endpoint: Some(endpoint),
        s3_access_key_id: Some("test".into()),
        s3_secret_access_key: Some("test".into()),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_on_azure_blob_downloads() {
    let Some(options) = azure_options() else {
        return;
    };
    let s = common::start(&[one_patient()], options).await;
    let url = largest_file(
        &s,
        &format!("/$export?_type=Observation&_container={}", container()),
    )
    .await;
    check_ranges(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_on_s3_downloads() {
    let Some(options) = s3_options().await else {
        return;
    };
    let s = common::start(&[one_patient()], options).await;
    let url = largest_file(&s, "/$export?_type=Observation&_container=ranges").await;
    check_ranges(&url).await;
}

/// A folder of one NDJSON file of `n` Observations, each with a distinct text of about 1.6 KB:
/// an export file of several download chunks (1 MiB each) whose bytes differ everywhere.
fn many_observations(n: usize) -> tempfile::TempDir {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(dir.path().join("Observation.ndjson")).expect("create"),
    );
    for i in 0..n {
        let text: String = (0..100).map(|k| format!("{:015x}.", i * 131 + k)).collect();
        let o = serde_json::json!({
            "resourceType": "Observation",
            "id": format!("obs-{i}"),
            "status": "final",
            "code": {"text": format!("observation {i}")},
            "valueString": text,
        });
        writeln!(f, "{o}").expect("write");
    }
    f.flush().expect("flush");
    dir
}

/// A file of several download chunks, downloaded whole by several clients at once and in
/// ranges that cross the chunk boundaries, each a fresh request, all at the same time: every
/// answer is exactly its bytes of the file (`expected`, when the test can read it itself).
async fn check_large_file(url: &str, expected: Option<&[u8]>) {
    let c = reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("client");
    let whole = |c: reqwest::Client, url: String| async move {
        let r = c.get(&url).send().await.expect("request");
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.expect("body").to_vec()
    };
    let firsts =
        futures::future::join_all((0..3).map(|_| tokio::spawn(whole(c.clone(), url.to_string()))))
            .await;
    let full = firsts[0].as_ref().expect("download").clone();
    let len = full.len();
    assert!(len > 3 << 20, "a file of several 1 MiB chunks: {len} bytes");
    assert!(len % (1 << 20) != 0, "a last chunk shorter than the others");
    if let Some(expected) = expected {
        assert!(full == expected, "the download is the file");
    }
    for other in &firsts[1..] {
        assert!(
            other.as_ref().expect("download") == &full,
            "concurrent downloads agree"
        );
    }
    // Ranges across and at the chunk boundaries, and pieces of an odd size covering the file.
    const MIB: usize = 1 << 20;
    let mut ranges = vec![
        (MIB - 1, MIB),
        (MIB, 2 * MIB - 1),
        (MIB - 10, 3 * MIB + 10),
        (len - MIB - 1, len - 1),
    ];
    let piece = 700_001;
    ranges.extend(
        (0..len)
            .step_by(piece)
            .map(|s| (s, (s + piece).min(len) - 1)),
    );
    let tasks = ranges.iter().map(|&(first, last)| {
        let (c, url) = (c.clone(), url.to_string());
        tokio::spawn(async move {
            let r = c
                .get(&url)
                .header("range", format!("bytes={first}-{last}"))
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
            r.bytes().await.expect("body").to_vec()
        })
    });
    let parts = futures::future::join_all(tasks).await;
    for (&(first, last), part) in ranges.iter().zip(&parts) {
        let part = part.as_ref().expect("range download");
        assert!(
            part[..] == full[first..=last],
            "bytes {first}-{last} are the file's"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_folder_file_whole_and_by_ranges() {
    let input = many_observations(2_500);
    let s = common::start(
        &[input.path().join("Observation.ndjson")],
        server::config::ExportOptions::default(),
    )
    .await;
    let manifest = s.export("/$export?_type=Observation").await;
    let url = manifest["output"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    let name = url.rsplit('/').next().expect("file name");
    let on_disk = walk(s.dir.path())
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("{name} under the export folder"));
    let expected = std::fs::read(on_disk).expect("read the export file");
    check_large_file(&url, Some(&expected)).await;
}

/// A link planted in the storage folder in place of a finished export's file is not served
/// (the download route opened the path itself and followed it; every other read of the local
/// folder refuses links).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_link_in_place_of_an_export_file_is_not_served() {
    let s = common::start(&[one_patient()], server::config::ExportOptions::default()).await;
    let url = largest_file(&s, "/$export?_type=Observation").await;
    let c = reqwest::Client::new();
    assert_eq!(get(&c, &url, &[]).await.status(), StatusCode::OK);
    let name = url.rsplit('/').next().expect("file name");
    let on_disk = walk(s.dir.path())
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("{name} under the export folder"));
    let secret = s.dir.path().join("secret.txt");
    std::fs::write(&secret, "not an export file").expect("write");
    std::fs::remove_file(&on_disk).expect("remove");
    std::os::unix::fs::symlink(&secret, &on_disk).expect("symlink");
    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(!r.text().await.expect("body").contains("not an export file"));
}

#[tokio::test(flavor = "multi_thread")]
async fn large_azure_blob_whole_and_by_ranges() {
    let Some(options) = azure_options() else {
        return;
    };
    let input = many_observations(2_500);
    let s = common::start(&[input.path().join("Observation.ndjson")], options).await;
    let path = format!("/$export?_type=Observation&_container={}", container());
    let url = largest_file(&s, &path).await;
    check_large_file(&url, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_s3_object_whole_and_by_ranges() {
    let Some(options) = s3_options().await else {
        return;
    };
    let input = many_observations(2_500);
    let s = common::start(&[input.path().join("Observation.ndjson")], options).await;
    let url = largest_file(&s, "/$export?_type=Observation&_container=large").await;
    check_large_file(&url, None).await;
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

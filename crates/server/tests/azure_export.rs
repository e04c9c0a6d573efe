//! The server configured with `--export-destination azure` (a connection string to Azurite, which
//! `scripts/test.sh` starts; `FHIRHOSE_TEST_AZURITE` is its blob endpoint): a system export over
//! real HTTP lands in the blob container, every manifest URL is served by the server itself
//! (plain and gzip), and a cancel removes the blobs.

use std::io::Read;

use reqwest::StatusCode;
use serde_json::Value;

mod common;

use test_support::destination::azurite_connection_string;

#[tokio::test(flavor = "multi_thread")]
async fn system_export_to_azure_blob_is_served_by_the_server() {
    let Some(endpoint) = common::external("FHIRHOSE_TEST_AZURITE", "./scripts/azurite.sh") else {
        return;
    };
    // One Synthea patient (its Bundle: a few hundred resources).
    let one = common::synthea().join("Abram_Lemke_6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2.json.gz");
    let options = server::config::ExportOptions {
        export_destination: "azure".into(),
        azure_connection_string: Some(azurite_connection_string(&endpoint)),
        export_file_resources: 50,
        ..Default::default()
    };
    let s = common::start(&[one], options).await;
    let base = s.base.clone();

    let container = format!("srv-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let (status, manifest) = s
        .export_with_status(&format!("/$export?_container={container}"))
        .await;
    // Downloads: a client that leaves gzip to the test.
    let c = reqwest::Client::builder().no_gzip().build().unwrap();
    let storage = &manifest["extension"]["storage"];
    assert_eq!(storage["container"], container.as_str(), "{manifest}");
    assert!(
        storage["location"].as_str().unwrap().starts_with("http"),
        "{storage}"
    );

    let outputs = manifest["output"].as_array().unwrap().clone();
    assert!(outputs.len() > 3, "rolled at 50 resources: {manifest}");
    let (mut total, mut counted) = (0u64, 0u64);
    for (i, o) in outputs.iter().enumerate() {
        let url = o["url"].as_str().unwrap();
        assert!(url.starts_with(&base), "served by the server: {url}");
        counted += o["count"].as_u64().unwrap();
        let r = if i % 2 == 0 {
            c.get(url).send().await.unwrap()
        } else {
            c.get(url)
                .header("accept-encoding", "gzip")
                .send()
                .await
                .unwrap()
        };
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/fhir+ndjson");
        let gz = r
            .headers()
            .get("content-encoding")
            .is_some_and(|v| v == "gzip");
        let body = r.bytes().await.unwrap();
        let text = if gz {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_string(&mut s)
                .unwrap();
            s
        } else {
            assert_eq!(i % 2, 0, "gzip was asked for");
            String::from_utf8(body.to_vec()).unwrap()
        };
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["resourceType"], o["type"]);
            total += 1;
        }
    }
    assert_eq!(total, counted);

    // Cancel: the status and the file URLs answer 404 afterwards (the blobs are removed).
    let first = outputs[0]["url"].as_str().unwrap().to_string();
    let r = c.delete(&status).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        c.get(&status).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(&first).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

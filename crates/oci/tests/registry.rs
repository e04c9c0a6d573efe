//! Against a real OCI registry (Debian's docker-registry 2.8, started by `scripts/registry.sh`):
//! the tests push their own images (blobs, then a raw manifest) and fetch files out of them.
//!
//! Run: `./scripts/registry.sh && FHIRHOSE_TEST_REGISTRY=127.0.0.1:5001 cargo test -p oci-config`.
//! Without `FHIRHOSE_TEST_REGISTRY` every test prints a skip line and passes, unless
//! `FHIRHOSE_REQUIRE_EXTERNAL=1`, when it fails.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_config::{Fetched, MAX_FILE_BYTES, OciError, OciSettings, fetch_file};
use sha2::{Digest, Sha256};

const GZ_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The registry address, or None (after printing why) when the test should be skipped.
fn registry(test: &str) -> Option<String> {
    match std::env::var("FHIRHOSE_TEST_REGISTRY") {
        Ok(addr) if !addr.is_empty() => Some(addr),
        _ if std::env::var("FHIRHOSE_REQUIRE_EXTERNAL").as_deref() == Ok("1") => panic!(
            "FHIRHOSE_TEST_REGISTRY is not set but FHIRHOSE_REQUIRE_EXTERNAL=1: run \
             ./scripts/registry.sh and set FHIRHOSE_TEST_REGISTRY=127.0.0.1:5001"
        ),
        _ => {
            eprintln!(
                "skipping {test}: FHIRHOSE_TEST_REGISTRY is not set (run ./scripts/registry.sh and \
                 set FHIRHOSE_TEST_REGISTRY=127.0.0.1:5001)"
            );
            None
        }
    }
}

fn settings(addr: &str) -> OciSettings {
    OciSettings {
        allow: vec![addr.parse().unwrap()],
        insecure_http: vec![addr.to_string()],
        timeout: Duration::from_secs(30),
        ..OciSettings::default()
    }
}

/// A repository name no other test run uses.
fn unique_repo(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "fhirhose-test/{test}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, *content).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&builder.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

struct Layer {
    data: Vec<u8>,
    media_type: &'static str,
    title: Option<&'static str>,
    /// Size written into the descriptor (the real one when None).
    claimed_size: Option<u64>,
}

fn gz_layer(files: &[(&str, &[u8])]) -> Layer {
    Layer {
        data: tar_gz(files),
        media_type: GZ_LAYER,
        title: None,
        claimed_size: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn push_client(addr: &str) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![addr.to_string()]),
        use_monolithic_push: true,
        ..ClientConfig::default()
    })
}

/// Pushes an OCI image manifest with these layers under `repo:tag`; returns its digest.
fn push_image(addr: &str, repo: &str, tag: &str, layers: &[Layer]) -> String {
    let config = b"{}".to_vec();
    let descriptor = |media_type: &str, data: &[u8], size: u64, title: Option<&str>| {
        let mut d = serde_json::json!({
            "mediaType": media_type,
            "digest": sha256(data),
            "size": size,
        });
        if let Some(title) = title {
            d["annotations"] = serde_json::json!({ "org.opencontainers.image.title": title });
        }
        d
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config, config.len() as u64, None),
        "layers": layers.iter().map(|l| descriptor(
            l.media_type,
            &l.data,
            l.claimed_size.unwrap_or(l.data.len() as u64),
            l.title,
        )).collect::<Vec<_>>(),
    });
    let body = serde_json::to_vec(&manifest).unwrap();
    let digest = sha256(&body);
    let reference = Reference::with_tag(addr.to_string(), repo.to_string(), tag.to_string());
    let client = push_client(addr);
    runtime().block_on(async {
        client
            .store_auth_if_needed(addr, &RegistryAuth::Anonymous)
            .await;
        for blob in layers
            .iter()
            .map(|l| l.data.as_slice())
            .chain([config.as_slice()])
        {
            client
                .push_blob(&reference, blob.to_vec(), &sha256(blob))
                .await
                .unwrap();
        }
        client
            .push_manifest_raw(
                &reference,
                body,
                "application/vnd.oci.image.manifest.v1+json"
                    .parse()
                    .unwrap(),
            )
            .await
            .unwrap();
    });
    digest
}

/// Pushes an OCI image index pointing at `manifests` (digest, size) under `repo:tag`.
fn push_index(addr: &str, repo: &str, tag: &str, manifests: &[(String, u64, &str)]) -> String {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests.iter().map(|(digest, size, arch)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "platform": { "architecture": arch, "os": "linux" },
        })).collect::<Vec<_>>(),
    });
    let body = serde_json::to_vec(&index).unwrap();
    let digest = sha256(&body);
    let reference = Reference::with_tag(addr.to_string(), repo.to_string(), tag.to_string());
    let client = push_client(addr);
    runtime().block_on(async {
        client
            .store_auth_if_needed(addr, &RegistryAuth::Anonymous)
            .await;
        client
            .push_manifest_raw(
                &reference,
                body,
                "application/vnd.oci.image.index.v1+json".parse().unwrap(),
            )
            .await
            .unwrap();
    });
    digest
}

fn manifest_size(addr: &str, repo: &str, digest: &str) -> u64 {
    let reference = Reference::with_digest(addr.to_string(), repo.to_string(), digest.to_string());
    let client = push_client(addr);
    runtime().block_on(async {
        let (body, _) = client
            .pull_manifest_raw(
                &reference,
                &RegistryAuth::Anonymous,
                &["application/vnd.oci.image.manifest.v1+json"],
            )
            .await
            .unwrap();
        body.len() as u64
    })
}

fn fetch(addr: &str, image: &str, name: &str) -> Result<Fetched, OciError> {
    fetch_file(&settings(addr), image, name)
}

#[test]
fn last_layer_wins_by_tag_and_by_digest() {
    let Some(addr) = registry("last_layer_wins_by_tag_and_by_digest") else {
        return;
    };
    let repo = unique_repo("layers");
    let base = br#"{"fhirVersion":"R4","layer":1}"#;
    let over = br#"{"fhirVersion":"R4","layer":2}"#;
    let digest = push_image(
        &addr,
        &repo,
        "v1",
        &[
            gz_layer(&[("r4-config.json", base), ("only-in-base.json", b"base")]),
            gz_layer(&[("configs/r4-config.json", over), ("readme.txt", b"hi")]),
        ],
    );

    let by_tag = format!("{addr}/{repo}:v1");
    let fetched = fetch(&addr, &by_tag, "r4-config.json").unwrap();
    assert_eq!(fetched.bytes, over);
    assert_eq!(fetched.manifest_digest, digest);
    assert_eq!(fetched.image, by_tag);

    // A file only the first layer has is still found (layers are scanned down to the first).
    let fetched = fetch(&addr, &by_tag, "only-in-base.json").unwrap();
    assert_eq!(fetched.bytes, b"base");
    // An exact path.
    let fetched = fetch(&addr, &by_tag, "configs/r4-config.json").unwrap();
    assert_eq!(fetched.bytes, over);

    let by_digest = format!("{addr}/{repo}@{digest}");
    let fetched = fetch(&addr, &by_digest, "r4-config.json").unwrap();
    assert_eq!(fetched.bytes, over);
    assert_eq!(fetched.manifest_digest, digest);
    assert_eq!(fetched.image, by_digest);

    // Tag and digest together: the digest decides.
    let both = format!("{addr}/{repo}:v1@{digest}");
    assert_eq!(fetch(&addr, &both, "r4-config.json").unwrap().bytes, over);

    // Credentials are harmless against an open registry, and the allow-list may name the repo.
    let mut with_credentials = settings(&addr);
    with_credentials.username = Some("user".into());
    with_credentials.password = Some("secret".into());
    with_credentials.allow = vec![format!("{addr}/{repo}").parse().unwrap()];
    let fetched = fetch_file(&with_credentials, &by_tag, "r4-config.json").unwrap();
    assert_eq!(fetched.bytes, over);
}

#[test]
fn missing_file_tag_repository_and_digest() {
    let Some(addr) = registry("missing_file_tag_repository_and_digest") else {
        return;
    };
    let repo = unique_repo("missing");
    push_image(&addr, &repo, "v1", &[gz_layer(&[("a.json", b"{}")])]);

    let image = format!("{addr}/{repo}:v1");
    match fetch(&addr, &image, "r4-config.json") {
        Err(OciError::FileNotFound { name, image: i }) => {
            assert_eq!(name, "r4-config.json");
            assert_eq!(i, image);
        }
        other => panic!("expected FileNotFound, got {other:?}"),
    }
    // A name that only ends like an entry is not that entry.
    assert!(matches!(
        fetch(&addr, &image, "json"),
        Err(OciError::FileNotFound { .. })
    ));

    for missing in [
        format!("{addr}/{repo}:v2"),
        format!("{addr}/{repo}-nope:v1"),
        format!("{addr}/{repo}@sha256:{}", "0".repeat(64)),
    ] {
        let err = fetch(&addr, &missing, "a.json").unwrap_err();
        assert!(
            matches!(err, OciError::ImageNotFound(ref i) if *i == missing),
            "{missing}: {err:?}"
        );
        assert!(!err.is_transient());
    }
}

#[test]
fn allow_list_decides_before_any_request() {
    let Some(addr) = registry("allow_list_decides_before_any_request") else {
        return;
    };
    let repo = unique_repo("allow");
    let digest = push_image(
        &addr,
        &repo,
        "v1",
        &[gz_layer(&[("r4-config.json", b"{}")])],
    );
    let by_tag = format!("{addr}/{repo}:v1");
    let by_digest = format!("{addr}/{repo}@{digest}");

    let mut s = settings(&addr);
    s.allow = vec!["other.example.com".parse().unwrap()];
    let err = fetch_file(&s, &by_tag, "r4-config.json").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("The configuration collection reference '{by_tag}' is not configured.")
    );

    // Pinned to the pushed digest: only that digest passes, not the tag, not another digest.
    s.allow = vec![format!("{addr}/{repo}@{digest}").parse().unwrap()];
    assert!(fetch_file(&s, &by_digest, "r4-config.json").is_ok());
    assert!(matches!(
        fetch_file(&s, &by_tag, "r4-config.json"),
        Err(OciError::NotAllowed(_))
    ));
    let other_digest = format!("{addr}/{repo}@sha256:{}", "1".repeat(64));
    assert!(matches!(
        fetch_file(&s, &other_digest, "r4-config.json"),
        Err(OciError::NotAllowed(_))
    ));
    // Another repository of an allowed registry, when the entry names a repository.
    s.allow = vec![format!("{addr}/{repo}").parse().unwrap()];
    assert!(matches!(
        fetch_file(&s, &format!("{addr}/{repo}x:v1"), "r4-config.json"),
        Err(OciError::NotAllowed(_))
    ));

    // Malformed references never reach the registry.
    for bad in [
        format!("{addr}/{repo}"),
        format!("{addr}/{}:v1", repo.to_uppercase()),
        format!("{addr}/{repo}@sha256:123"),
        format!("{addr}/{repo}:v1 "),
        repo.clone(),
        String::new(),
    ] {
        assert!(
            matches!(
                fetch(&addr, &bad, "r4-config.json"),
                Err(OciError::InvalidReference(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn bad_layers_and_large_files() {
    let Some(addr) = registry("bad_layers_and_large_files") else {
        return;
    };
    // A layer that is not gzip (and not a tar, and has no title annotation).
    let repo = unique_repo("notgzip");
    push_image(
        &addr,
        &repo,
        "v1",
        &[
            gz_layer(&[("r4-config.json", b"{}")]),
            Layer {
                data: b"this is not a tar.gz".to_vec(),
                media_type: GZ_LAYER,
                title: None,
                claimed_size: None,
            },
        ],
    );
    let err = fetch(&addr, &format!("{addr}/{repo}:v1"), "r4-config.json").unwrap_err();
    assert!(matches!(err, OciError::BadLayer { .. }), "{err:?}");
    assert!(!err.is_transient());

    // A file of 1 MiB + 1 byte.
    let repo = unique_repo("large");
    let big = vec![b' '; MAX_FILE_BYTES as usize + 1];
    push_image(&addr, &repo, "v1", &[gz_layer(&[("r4-config.json", &big)])]);
    let err = fetch(&addr, &format!("{addr}/{repo}:v1"), "r4-config.json").unwrap_err();
    assert!(
        matches!(err, OciError::FileTooLarge { size, .. } if size == MAX_FILE_BYTES + 1),
        "{err:?}"
    );
    // Exactly 1 MiB is accepted.
    let repo = unique_repo("exact");
    let exact = vec![b' '; MAX_FILE_BYTES as usize];
    push_image(
        &addr,
        &repo,
        "v1",
        &[gz_layer(&[("r4-config.json", &exact)])],
    );
    let fetched = fetch(&addr, &format!("{addr}/{repo}:v1"), "r4-config.json").unwrap();
    assert_eq!(fetched.bytes.len() as u64, MAX_FILE_BYTES);

    // A descriptor claiming a layer over 100 MB is refused before downloading it (if the
    // registry accepts such a manifest at all: it does not have to check sizes).
    let repo = unique_repo("huge");
    let claimed = Layer {
        claimed_size: Some(200 * 1024 * 1024),
        ..gz_layer(&[("r4-config.json", b"{}")])
    };
    let pushed = std::panic::catch_unwind(|| push_image(&addr, &repo, "v1", &[claimed]));
    if pushed.is_ok() {
        let err = fetch(&addr, &format!("{addr}/{repo}:v1"), "r4-config.json").unwrap_err();
        assert!(matches!(err, OciError::LayerTooLarge { .. }), "{err:?}");
    } else {
        eprintln!("registry refused a manifest with a wrong layer size; LayerTooLarge not checked");
    }
}

#[test]
fn whiteouts_titles_and_indexes() {
    let Some(addr) = registry("whiteouts_titles_and_indexes") else {
        return;
    };
    // A later layer deleting the file hides it from earlier ones.
    let repo = unique_repo("whiteout");
    push_image(
        &addr,
        &repo,
        "v1",
        &[
            gz_layer(&[("r4-config.json", b"{}")]),
            gz_layer(&[(".wh.r4-config.json", b"")]),
        ],
    );
    assert!(matches!(
        fetch(&addr, &format!("{addr}/{repo}:v1"), "r4-config.json"),
        Err(OciError::FileNotFound { .. })
    ));

    // ORAS-style: a plain file as a layer, named by its title annotation.
    let repo = unique_repo("oras");
    let config = br#"{"fhirPathRules":[]}"#;
    push_image(
        &addr,
        &repo,
        "v1",
        &[
            Layer {
                data: config.to_vec(),
                media_type: "application/vnd.oci.image.layer.v1.tar",
                title: Some("r4-config.json"),
                claimed_size: None,
            },
            Layer {
                data: b"other".to_vec(),
                media_type: "application/vnd.oci.image.layer.v1.tar",
                title: Some("other.txt"),
                claimed_size: None,
            },
        ],
    );
    let fetched = fetch(&addr, &format!("{addr}/{repo}:v1"), "r4-config.json").unwrap();
    assert_eq!(fetched.bytes, config);

    // An image index resolves to its linux/amd64 entry.
    let repo = unique_repo("index");
    let arm = push_image(
        &addr,
        &repo,
        "arm",
        &[gz_layer(&[("r4-config.json", b"arm")])],
    );
    let amd = push_image(
        &addr,
        &repo,
        "amd",
        &[gz_layer(&[("r4-config.json", b"amd")])],
    );
    let index = push_index(
        &addr,
        &repo,
        "multi",
        &[
            (arm.clone(), manifest_size(&addr, &repo, &arm), "arm64"),
            (amd.clone(), manifest_size(&addr, &repo, &amd), "amd64"),
        ],
    );
    let fetched = fetch(&addr, &format!("{addr}/{repo}:multi"), "r4-config.json").unwrap();
    assert_eq!(fetched.bytes, b"amd");
    assert_eq!(fetched.manifest_digest, index);
    let fetched = fetch(&addr, &format!("{addr}/{repo}@{index}"), "r4-config.json").unwrap();
    assert_eq!(fetched.bytes, b"amd");
}

#[test]
fn works_from_inside_an_async_runtime() {
    let Some(addr) = registry("works_from_inside_an_async_runtime") else {
        return;
    };
    let repo = unique_repo("async");
    push_image(
        &addr,
        &repo,
        "v1",
        &[gz_layer(&[("r4-config.json", b"{}")])],
    );
    let image = format!("{addr}/{repo}:v1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let s = settings(&addr);
    let bytes = rt.block_on(async move {
        // As the server calls it: on a blocking thread of the runtime.
        tokio::task::spawn_blocking(move || fetch_file(&s, &image, "r4-config.json"))
            .await
            .unwrap()
            .unwrap()
            .bytes
    });
    assert_eq!(bytes, b"{}");
}

#[test]
fn pushed_file_comes_back() {
    let Some(addr) = registry("pushed_file_comes_back") else {
        return;
    };
    let repo = unique_repo("push");
    let image = format!("{addr}/{repo}:v1");
    let config = br#"{"fhirVersion":"R4","fhirPathRules":[]}"#;
    let digest = oci_config::push_file(&settings(&addr), &image, "deid.json", config).unwrap();
    let got = fetch(&addr, &image, "deid.json").unwrap();
    assert_eq!(got.bytes, config);
    assert_eq!(got.manifest_digest, digest);
    let pinned = fetch(&addr, &format!("{addr}/{repo}@{digest}"), "deid.json").unwrap();
    assert_eq!(pinned.bytes, config);
    // A push needs a tag.
    assert!(matches!(
        oci_config::push_file(
            &settings(&addr),
            &format!("{addr}/{repo}@{digest}"),
            "x",
            b"{}"
        ),
        Err(OciError::InvalidReference(_))
    ));
}

//! The network part: manifest and layers through `oci-client`, run on a private runtime.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use oci_client::Client;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest, OciManifest,
};
use oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};
use tracing::{debug, info};

use crate::api::{Api, Bounded, Stage, read_bounded};
use crate::layer::{LayerOutcome, ScanError, TITLE_ANNOTATION, scan_layer};
use crate::reference::check_digest;
use crate::{Fetched, ImageRef, Limits, OciError, OciSettings};

/// Manifest media types we ask for (image manifests and indexes, OCI and Docker).
const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Runs the fetch on a private current-thread runtime (see [`on_own_runtime`]).
pub(crate) fn run_blocking(
    settings: &OciSettings,
    image: &ImageRef,
    name: &str,
    limits: &Limits,
) -> Result<Fetched, OciError> {
    on_own_runtime(|runtime| {
        let deadline = Instant::now() + settings.timeout;
        runtime
            .block_on(async {
                tokio::time::timeout(
                    settings.timeout,
                    fetch(settings, image, name, limits, deadline),
                )
                .await
            })
            .unwrap_or_else(|_elapsed| Err(timed_out(image, settings.timeout)))
    })
}

/// Runs `work` with a private current-thread runtime, on this thread or, when this thread is
/// inside a runtime already (where `block_on` would panic), on a scoped helper thread. Panics
/// anywhere below are caught and reported as `OciError::Internal`.
pub(crate) fn on_own_runtime<T: Send>(
    work: impl FnOnce(&tokio::runtime::Runtime) -> Result<T, OciError> + Send,
) -> Result<T, OciError> {
    let guarded = || {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| OciError::Internal(format!("cannot start a tokio runtime: {e}")))?;
            work(&runtime)
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            Err(OciError::Internal(what))
        })
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|scope| {
            scope
                .spawn(guarded)
                .join()
                .unwrap_or_else(|_| Err(OciError::Internal("helper thread panicked".into())))
        })
    } else {
        guarded()
    }
}

pub(crate) fn timed_out(image: &ImageRef, timeout: Duration) -> OciError {
    OciError::Registry {
        registry: image.registry.clone(),
        message: format!("no complete answer within {} s", timeout.as_secs_f64()),
        transient: true,
    }
}

pub(crate) fn client_for(settings: &OciSettings) -> Client {
    let insecure = settings
        .insecure_http
        .iter()
        .map(|r| r.to_ascii_lowercase())
        .collect();
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure),
        // Index entries are chosen here, not by the client.
        platform_resolver: None,
        connect_timeout: Some(settings.timeout.min(Duration::from_secs(10))),
        read_timeout: Some(settings.timeout),
        max_concurrent_download: 1,
        ..ClientConfig::default()
    })
}

pub(crate) fn auth_for(settings: &OciSettings) -> RegistryAuth {
    match (&settings.username, &settings.password) {
        (Some(user), Some(password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        (Some(user), None) => RegistryAuth::Basic(user.clone(), String::new()),
        _ => RegistryAuth::Anonymous,
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

async fn fetch(
    settings: &OciSettings,
    image: &ImageRef,
    name: &str,
    limits: &Limits,
    deadline: Instant,
) -> Result<Fetched, OciError> {
    let canonical = image.to_string();
    let mut api = Api::new(settings, image)?;
    let reference = match &image.digest {
        Some(digest) => digest.clone(),
        None => image.tag.clone().unwrap_or_default(),
    };
    debug!(image = %canonical, file = name, "fetching OCI manifest");

    let (body, manifest_digest) =
        pull_manifest(&mut api, &reference, image, image.digest.as_deref(), limits).await?;
    let manifest = match parse_manifest(&body, &canonical)? {
        OciManifest::Image(manifest) => manifest,
        OciManifest::ImageIndex(index) => {
            let chosen =
                choose_from_index(&index.manifests).ok_or_else(|| OciError::BadManifest {
                    image: canonical.clone(),
                    reason: "the image index has no image manifest entry".to_string(),
                })?;
            check_digest(&chosen).map_err(|reason| OciError::BadManifest {
                image: canonical.clone(),
                reason,
            })?;
            debug!(image = %canonical, manifest = %chosen, "resolved image index entry");
            let (body, _) = pull_manifest(&mut api, &chosen, image, Some(&chosen), limits).await?;
            match parse_manifest(&body, &canonical)? {
                OciManifest::Image(manifest) => manifest,
                OciManifest::ImageIndex(_) => {
                    return Err(OciError::BadManifest {
                        image: canonical,
                        reason: "an image index inside an image index is not supported".to_string(),
                    });
                }
            }
        }
    };
    find_in_layers(
        &mut api,
        image,
        &manifest,
        name,
        limits,
        deadline,
        &manifest_digest,
    )
    .await
}

/// Pulls one manifest (`reference`: a tag or a digest); returns its bytes and sha256 digest,
/// checked against `expected` and against the registry's `Docker-Content-Digest`.
async fn pull_manifest(
    api: &mut Api,
    reference: &str,
    image: &ImageRef,
    expected: Option<&str>,
    limits: &Limits,
) -> Result<(Vec<u8>, String), OciError> {
    let path = format!("v2/{}/manifests/{reference}", image.repository);
    let answer = api
        .get(&path, &ACCEPTED_MANIFESTS.join(", "), Stage::Manifest)
        .await?;
    let announced = answer
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .filter(|d| d.starts_with("sha256:"))
        .map(str::to_string);
    let body = read_bounded(answer, limits.manifest as u64)
        .await
        .map_err(|e| match e {
            Bounded::TooLarge(size) => OciError::BadManifest {
                image: image.to_string(),
                reason: format!(
                    "the manifest has {size} bytes or more (at most {} are accepted)",
                    limits.manifest
                ),
            },
            Bounded::Failed(e) => api.chunk_error(&e),
        })?;
    let actual = sha256_hex(&body);
    for expected in [expected, announced.as_deref()].into_iter().flatten() {
        if expected != actual {
            return Err(OciError::DigestMismatch {
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok((body, actual))
}

fn parse_manifest(body: &[u8], image: &str) -> Result<OciManifest, OciError> {
    let bad = |reason: String| OciError::BadManifest {
        image: image.to_string(),
        reason,
    };
    let manifest: OciManifest = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let schema = match &manifest {
        OciManifest::Image(m) => m.schema_version,
        OciManifest::ImageIndex(i) => i.schema_version,
    };
    if schema != 2 {
        return Err(bad(format!("unsupported schemaVersion {schema}")));
    }
    Ok(manifest)
}

/// The linux/amd64 entry of an index, else its first entry that is an image manifest.
fn choose_from_index(entries: &[oci_client::manifest::ImageIndexEntry]) -> Option<String> {
    let is_manifest = |media_type: &str| {
        media_type == OCI_IMAGE_MEDIA_TYPE || media_type == IMAGE_MANIFEST_MEDIA_TYPE
    };
    oci_client::client::linux_amd64_resolver(entries).or_else(|| {
        entries
            .iter()
            .find(|e| is_manifest(&e.media_type))
            .map(|e| e.digest.clone())
    })
}

#[allow(clippy::too_many_arguments)]
async fn find_in_layers(
    api: &mut Api,
    image: &ImageRef,
    manifest: &OciImageManifest,
    name: &str,
    limits: &Limits,
    deadline: Instant,
    manifest_digest: &str,
) -> Result<Fetched, OciError> {
    let canonical = image.to_string();
    let bad_manifest = |reason: String| OciError::BadManifest {
        image: canonical.clone(),
        reason,
    };
    if manifest.layers.len() > limits.layers {
        return Err(bad_manifest(format!(
            "{} layers (at most {} are accepted)",
            manifest.layers.len(),
            limits.layers
        )));
    }
    // Check every descriptor before downloading anything.
    for layer in &manifest.layers {
        check_digest(&layer.digest).map_err(|why| bad_manifest(format!("layer {why}")))?;
        if layer.size < 0 {
            return Err(bad_manifest(format!(
                "layer {} has a negative size",
                layer.digest
            )));
        }
    }
    for layer in manifest.layers.iter().rev() {
        let size = layer.size as u64;
        if size > limits.layer {
            return Err(OciError::LayerTooLarge {
                image: canonical,
                size,
                limit: limits.layer,
            });
        }
        let blob = pull_layer(api, image, layer, limits).await?;
        if blob.len() as u64 != size {
            return Err(bad_manifest(format!(
                "layer {} has {} bytes, its descriptor says {size}",
                layer.digest,
                blob.len()
            )));
        }
        let title = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(TITLE_ANNOTATION))
            .map(String::as_str);
        let outcome = scan_layer(&blob, title, name, limits, deadline).map_err(|e| match e {
            ScanError::Bad(reason) => OciError::BadLayer {
                image: canonical.clone(),
                digest: layer.digest.clone(),
                reason,
            },
            ScanError::FileTooLarge(size) => OciError::FileTooLarge {
                name: name.to_string(),
                image: canonical.clone(),
                size,
                limit: limits.file,
            },
            ScanError::DecompressedTooLarge => OciError::LayerTooLarge {
                image: canonical.clone(),
                size: limits.decompressed.saturating_add(1),
                limit: limits.decompressed,
            },
            ScanError::Deadline => OciError::Registry {
                registry: image.registry.clone(),
                message: "timed out while reading a layer".to_string(),
                transient: true,
            },
        })?;
        match outcome {
            LayerOutcome::Found(bytes) => {
                info!(
                    image = %canonical,
                    manifest = %manifest_digest,
                    layer = %layer.digest,
                    file = name,
                    bytes = bytes.len(),
                    "fetched configuration file from OCI image"
                );
                return Ok(Fetched {
                    bytes,
                    manifest_digest: manifest_digest.to_string(),
                    image: canonical,
                });
            }
            LayerOutcome::Deleted => break,
            LayerOutcome::Absent => {}
        }
    }
    Err(OciError::FileNotFound {
        name: name.to_string(),
        image: canonical,
    })
}

/// Downloads one layer blob, at most `limits.layer` bytes, and checks its sha256. A
/// descriptor's foreign `urls` are never followed: a manifest must not send us to other hosts.
async fn pull_layer(
    api: &mut Api,
    image: &ImageRef,
    layer: &OciDescriptor,
    limits: &Limits,
) -> Result<Vec<u8>, OciError> {
    debug!(layer = %layer.digest, size = layer.size, "downloading layer");
    let path = format!("v2/{}/blobs/{}", image.repository, layer.digest);
    let answer = api.get(&path, "*/*", Stage::Blob(&layer.digest)).await?;
    let blob = read_bounded(answer, limits.layer)
        .await
        .map_err(|e| match e {
            Bounded::TooLarge(size) => OciError::LayerTooLarge {
                image: image.to_string(),
                size,
                limit: limits.layer,
            },
            Bounded::Failed(e) => api.chunk_error(&e),
        })?;
    let actual = sha256_hex(&blob);
    if actual != layer.digest {
        return Err(OciError::DigestMismatch {
            expected: layer.digest.clone(),
            actual,
        });
    }
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_format() {
        assert_eq!(
            sha256_hex(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

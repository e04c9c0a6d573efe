//! The network part: manifest and layers through `oci-client`, run on a private runtime.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest, OciManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tracing::{debug, info};

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

/// Longest registry error text kept in a message (a registry may answer with a whole web page).
const MAX_MESSAGE_CHARS: usize = 300;

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
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest.iter() {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Which request an error came from (a 404 on the manifest means "no such image").
#[derive(Clone, Copy)]
enum Stage<'a> {
    Manifest,
    Blob(&'a str),
}

async fn fetch(
    settings: &OciSettings,
    image: &ImageRef,
    name: &str,
    limits: &Limits,
    deadline: Instant,
) -> Result<Fetched, OciError> {
    let canonical = image.to_string();
    let client = client_for(settings);
    let auth = auth_for(settings);
    let reference = match &image.digest {
        Some(digest) => Reference::with_digest(
            image.registry.clone(),
            image.repository.clone(),
            digest.clone(),
        ),
        None => Reference::with_tag(
            image.registry.clone(),
            image.repository.clone(),
            image.tag.clone().unwrap_or_default(),
        ),
    };
    debug!(image = %canonical, file = name, "fetching OCI manifest");

    let (body, manifest_digest) = pull_manifest(
        &client,
        &auth,
        &reference,
        image,
        image.digest.as_deref(),
        limits,
    )
    .await?;
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
            let by_digest = Reference::with_digest(
                image.registry.clone(),
                image.repository.clone(),
                chosen.clone(),
            );
            let (body, _) =
                pull_manifest(&client, &auth, &by_digest, image, Some(&chosen), limits).await?;
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
        &client,
        &reference,
        image,
        &manifest,
        name,
        limits,
        deadline,
        &manifest_digest,
    )
    .await
}

/// Pulls one manifest; returns its bytes and sha256 digest, checked against `expected`.
async fn pull_manifest(
    client: &Client,
    auth: &RegistryAuth,
    reference: &Reference,
    image: &ImageRef,
    expected: Option<&str>,
    limits: &Limits,
) -> Result<(Vec<u8>, String), OciError> {
    let (body, _) = client
        .pull_manifest_raw(reference, auth, ACCEPTED_MANIFESTS)
        .await
        .map_err(|e| map_error(e, image, Stage::Manifest))?;
    if body.len() > limits.manifest {
        return Err(OciError::BadManifest {
            image: image.to_string(),
            reason: format!(
                "the manifest has {} bytes (at most {} are accepted)",
                body.len(),
                limits.manifest
            ),
        });
    }
    let actual = sha256_hex(&body);
    if let Some(expected) = expected
        && expected != actual
    {
        return Err(OciError::DigestMismatch {
            expected: expected.to_string(),
            actual,
        });
    }
    Ok((body.to_vec(), actual))
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
    client: &Client,
    reference: &Reference,
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
        let blob = pull_layer(client, reference, image, layer, limits).await?;
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

/// Downloads one layer blob, at most `limits.layer` bytes, and checks its sha256.
async fn pull_layer(
    client: &Client,
    reference: &Reference,
    image: &ImageRef,
    layer: &OciDescriptor,
    limits: &Limits,
) -> Result<Vec<u8>, OciError> {
    let too_large = |size: u64| OciError::LayerTooLarge {
        image: image.to_string(),
        size,
        limit: limits.layer,
    };
    // Never follow a descriptor's foreign `urls`: a manifest must not send us to other hosts.
    let descriptor = OciDescriptor {
        urls: None,
        ..layer.clone()
    };
    debug!(layer = %layer.digest, size = layer.size, "downloading layer");
    let mut stream = client
        .pull_blob_stream(reference, &descriptor)
        .await
        .map_err(|e| map_error(e, image, Stage::Blob(&layer.digest)))?;
    if let Some(length) = stream.content_length
        && length > limits.layer
    {
        return Err(too_large(length));
    }
    let mut blob = Vec::with_capacity(layer.size.clamp(0, 16 << 20) as usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| match digest_mismatch(&e) {
            Some(mismatch) => mismatch,
            None => OciError::Registry {
                registry: image.registry.clone(),
                message: format!(
                    "reading layer {} failed: {}",
                    layer.digest,
                    clip(&e.to_string())
                ),
                transient: true,
            },
        })?;
        if (blob.len() + chunk.len()) as u64 > limits.layer {
            return Err(too_large((blob.len() + chunk.len()) as u64));
        }
        blob.extend_from_slice(&chunk);
    }
    // oci-client verifies too; this check does not depend on it.
    let actual = sha256_hex(&blob);
    if actual != layer.digest {
        return Err(OciError::DigestMismatch {
            expected: layer.digest.clone(),
            actual,
        });
    }
    Ok(blob)
}

fn digest_mismatch(e: &std::io::Error) -> Option<OciError> {
    match e.get_ref()?.downcast_ref::<DigestError>()? {
        DigestError::VerificationError { expected, actual } => Some(OciError::DigestMismatch {
            expected: expected.clone(),
            actual: actual.clone(),
        }),
        _ => None,
    }
}

fn clip(message: &str) -> String {
    let message = message.trim();
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message.to_string(),
    }
}

/// Maps an `oci-client` error to ours, deciding what is transient.
fn map_error(error: OciDistributionError, image: &ImageRef, stage: Stage<'_>) -> OciError {
    let registry = |message: String, transient: bool| OciError::Registry {
        registry: image.registry.clone(),
        message: clip(&message),
        transient,
    };
    let not_found = || match stage {
        Stage::Manifest => OciError::ImageNotFound(image.to_string()),
        Stage::Blob(digest) => OciError::Registry {
            registry: image.registry.clone(),
            message: format!("layer {digest} of '{image}' is missing"),
            transient: false,
        },
    };
    match error {
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            OciError::DigestMismatch { expected, actual }
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let text = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            let text = if text.is_empty() {
                "the registry refused the request (client error without details)".to_string()
            } else {
                text
            };
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                not_found()
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                registry(text, true)
            } else {
                registry(text, false)
            }
        }
        OciDistributionError::ServerError { code, message, .. } => match code {
            404 => not_found(),
            408 | 429 | 500..=599 => registry(format!("HTTP {code}: {message}"), true),
            _ => registry(format!("HTTP {code}: {message}"), false),
        },
        OciDistributionError::UnauthorizedError { .. } => registry(
            "not authorized (HTTP 401): credentials are missing or refused".to_string(),
            false,
        ),
        OciDistributionError::AuthenticationFailure(message) => {
            registry(format!("authentication failed: {message}"), false)
        }
        OciDistributionError::RequestError(e) => {
            let transient = !(e.is_builder() || e.is_redirect());
            // reqwest's Display hides the cause ("error sending request"); keep the chain.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            registry(message, transient)
        }
        OciDistributionError::IoError(e) => match digest_mismatch(&e) {
            Some(mismatch) => mismatch,
            None => registry(e.to_string(), true),
        },
        other => registry(other.to_string(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_long_messages() {
        assert_eq!(clip("  short "), "short");
        let long = "é".repeat(1000);
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn sha256_format() {
        assert_eq!(
            sha256_hex(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

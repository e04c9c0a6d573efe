//! Publishing a configuration file as a one-layer OCI image: what a user runs to put a
//! de-identification configuration into a registry, and what the tests use.

use oci_client::Reference;
use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;

use crate::fetch::{auth_for, client_for, on_own_runtime, sha256_hex, timed_out};
use crate::{ImageRef, OciError, OciSettings};

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// Pushes `bytes` as the file `file_name` in a one-layer (tar.gz) image `image`
/// (`registry/name:tag`); returns the manifest digest (`sha256:…`). The allow-list is not
/// consulted: it governs what exports may read, not where a user publishes.
pub fn push_file(
    settings: &OciSettings,
    image: &str,
    file_name: &str,
    bytes: &[u8],
) -> Result<String, OciError> {
    let image: ImageRef = image.parse()?;
    let tag = image
        .tag
        .clone()
        .ok_or_else(|| OciError::InvalidReference(format!("{image}: a push needs a tag")))?;
    let layer = tar_gz(file_name, bytes)?;
    let config = b"{}".to_vec();
    let descriptor = |media_type: &str, data: &[u8]| serde_json::json!({"mediaType": media_type, "digest": sha256_hex(data), "size": data.len()});
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_IMAGE_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, &config),
        "layers": [descriptor(LAYER_MEDIA_TYPE, &layer)],
    });
    let body = serde_json::to_vec(&manifest).map_err(|e| OciError::Internal(e.to_string()))?;
    let digest = sha256_hex(&body);
    let reference = Reference::with_tag(image.registry.clone(), image.repository.clone(), tag);
    let registry_error = |e: oci_client::errors::OciDistributionError| OciError::Registry {
        registry: image.registry.clone(),
        message: e.to_string(),
        transient: false,
    };
    on_own_runtime(|runtime| {
        runtime.block_on(async {
            let work = async {
                let client = client_for(settings);
                client
                    .store_auth_if_needed(&image.registry, &auth_for(settings))
                    .await;
                for blob in [&layer, &config] {
                    client
                        .push_blob(&reference, blob.clone(), &sha256_hex(blob))
                        .await
                        .map_err(registry_error)?;
                }
                client
                    .push_manifest_raw(
                        &reference,
                        body.clone(),
                        OCI_IMAGE_MEDIA_TYPE
                            .parse()
                            .map_err(|_| OciError::Internal("media type".into()))?,
                    )
                    .await
                    .map_err(registry_error)?;
                Ok(digest.clone())
            };
            tokio::time::timeout(settings.timeout, work)
                .await
                .unwrap_or_else(|_| Err(timed_out(&image, settings.timeout)))
        })
    })
}

fn tar_gz(file_name: &str, bytes: &[u8]) -> Result<Vec<u8>, OciError> {
    let io = |e: std::io::Error| OciError::Internal(format!("building the layer: {e}"));
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, file_name, bytes).map_err(io)?;
    tar.into_inner().map_err(io)?.finish().map_err(io)
}

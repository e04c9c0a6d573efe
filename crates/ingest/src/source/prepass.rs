//! The fullUrl pre-pass of the loader: the `(fullUrl, type, id)` of a Bundle file's entries,
//! read without building the resources.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use super::{InputFormat, format_of, loader_id, open};
use crate::error::LoadError;

#[derive(Deserialize)]
struct HeadBundle {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    entry: Option<Vec<HeadEntry>>,
}

#[derive(Deserialize)]
struct HeadEntry {
    #[serde(rename = "fullUrl")]
    full_url: Option<String>,
    resource: Option<HeadResource>,
}

#[derive(Deserialize)]
struct HeadResource {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    id: Option<String>,
}

/// The pre-pass over one file: `(fullUrl, type, id)` of every Bundle entry of a `.json` file that
/// the load pass will store under a known id, in entry order, reading only `fullUrl`,
/// `resourceType` and `id` (the rest is skipped by the parser). NDJSON files have no fullUrls and
/// are not read. Unreadable files are left to the load pass to report.
pub fn full_urls(path: &Path) -> Result<Vec<(String, String, String)>, LoadError> {
    let mut out = Vec::new();
    if format_of(path) != Some(InputFormat::Json) {
        return Ok(out);
    }
    let mut bytes = Vec::new();
    open(path)?
        .read_to_end(&mut bytes)
        .map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let Ok(head) = serde_json::from_slice::<HeadBundle>(&bytes) else {
        return Ok(out);
    };
    if head.resource_type.as_deref() != Some("Bundle") {
        return Ok(out);
    }
    for e in head.entry.unwrap_or_default() {
        let (Some(full_url), Some(r)) = (e.full_url, e.resource) else {
            continue;
        };
        let Some(ty) = r.resource_type else { continue };
        if let Some(id) = loader_id(Some(&full_url), r.id.as_deref()) {
            out.push((full_url, ty, id));
        }
    }
    Ok(out)
}

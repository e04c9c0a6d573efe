//! Fetches one configuration file (e.g. a de-identification configuration) out of an OCI image in
//! a container registry, as Microsoft's FHIR server does for `$export` with
//! `_anonymizationConfigCollectionReference` + `_anonymizationConfig`:
//!
//! - the reference (`registry/name:tag` or `registry/name@sha256:…`) is validated strictly and
//!   must be admitted by the server's allow-list ([`OciSettings::allow`]);
//! - the manifest is pulled with the OCI distribution API (an image index is resolved to its
//!   linux/amd64 entry, else its first image manifest) and, when the reference is pinned by
//!   digest, checked against that digest;
//! - layers are scanned from the LAST to the FIRST; each is at most [`MAX_LAYER_BYTES`], is
//!   checked against its descriptor's sha256, and is read as a tar.gz archive; the entry whose
//!   path, or last path component, equals the wanted name is returned (at most [`MAX_FILE_BYTES`]).
//!
//! The API is blocking. Each call runs its own current-thread tokio runtime (on a helper thread
//! when the caller is itself inside a runtime), and the whole call is bounded by
//! [`OciSettings::timeout`].
//!
//! ```no_run
//! use std::time::Duration;
//! use oci_config::{OciSettings, fetch_file};
//!
//! let settings = OciSettings {
//!     allow: vec!["myregistry.azurecr.io/deid".parse()?],
//!     timeout: Duration::from_secs(30),
//!     ..OciSettings::default()
//! };
//! // At kick-off (no network): InvalidReference / NotAllowed become 400s.
//! settings.check_reference("myregistry.azurecr.io/deid:v1")?;
//! // In the job:
//! let fetched = fetch_file(&settings, "myregistry.azurecr.io/deid:v1", "r4-config.json")?;
//! println!("{} bytes from {}", fetched.bytes.len(), fetched.manifest_digest);
//! # Ok::<(), oci_config::OciError>(())
//! ```

mod api;
mod fetch;
mod layer;
mod push;
mod reference;

use std::fmt;
use std::time::Duration;

pub use push::push_file;
pub use reference::{AllowEntry, ImageRef};

/// Largest layer blob that is downloaded (compressed size), as in Microsoft's server.
pub const MAX_LAYER_BYTES: u64 = 100 * 1024 * 1024;
/// Largest file that is returned.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Largest decompressed size of one layer that is scanned (a gzip bomb stops here).
pub const MAX_DECOMPRESSED_LAYER_BYTES: u64 = 1024 * 1024 * 1024;
/// Largest manifest accepted (the distribution spec lets registries refuse more than 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Most layers an image may have.
pub const MAX_LAYERS: usize = 256;

/// Size limits applied by one fetch (the public constants; tests shrink them).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub layer: u64,
    pub file: u64,
    pub decompressed: u64,
    pub manifest: usize,
    pub layers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            layer: MAX_LAYER_BYTES,
            file: MAX_FILE_BYTES,
            decompressed: MAX_DECOMPRESSED_LAYER_BYTES,
            manifest: MAX_MANIFEST_BYTES,
            layers: MAX_LAYERS,
        }
    }
}

/// What the server allows and how it reaches registries.
#[derive(Clone)]
pub struct OciSettings {
    /// Registries, repositories or pinned images that references may name. Empty: nothing.
    pub allow: Vec<AllowEntry>,
    /// Registries (`host[:port]`) reached over plain HTTP instead of HTTPS, e.g. `127.0.0.1:5001`.
    pub insecure_http: Vec<String>,
    /// Credentials for HTTP Basic auth, or for the registry's token service (used for every
    /// allowed registry). Without them access is anonymous.
    pub username: Option<String>,
    /// See `username`.
    pub password: Option<String>,
    /// Bound on one whole [`fetch_file`] call (connecting, every request, decompression).
    pub timeout: Duration,
    /// Hosts other than the registry itself that a pull may be sent to: blob redirects (to a
    /// CDN) and token services (`host` admits any port, `host:port` that one). A redirect or
    /// token realm elsewhere fails the pull. Empty: the registry only.
    pub redirect_hosts: Vec<String>,
}

impl Default for OciSettings {
    fn default() -> Self {
        OciSettings {
            allow: Vec::new(),
            insecure_http: Vec::new(),
            username: None,
            password: None,
            timeout: Duration::from_secs(60),
            redirect_hosts: Vec::new(),
        }
    }
}

impl fmt::Debug for OciSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OciSettings")
            .field("allow", &self.allow)
            .field("insecure_http", &self.insecure_http)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .field("redirect_hosts", &self.redirect_hosts)
            .finish()
    }
}

impl OciSettings {
    /// Whether some allow-list entry admits `image`.
    pub fn allows(&self, image: &ImageRef) -> bool {
        self.allow.iter().any(|entry| entry.allows(image))
    }

    /// The checks done at `$export` kick-off, without any network access: `image` parses and is
    /// allowed. Errors: [`OciError::InvalidReference`], [`OciError::NotAllowed`].
    pub fn check_reference(&self, image: &str) -> Result<ImageRef, OciError> {
        let parsed: ImageRef = image.parse()?;
        if self.allows(&parsed) {
            Ok(parsed)
        } else {
            Err(OciError::NotAllowed(image.to_string()))
        }
    }
}

/// The file fetched from an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The file's content (at most [`MAX_FILE_BYTES`]).
    pub bytes: Vec<u8>,
    /// sha256 digest of the manifest the reference resolved to (of the image index, when the
    /// reference named one), `sha256:<hex>`: pin it to fetch the same content again.
    pub manifest_digest: String,
    /// The canonical reference that was fetched (`registry/repository[:tag][@digest]`).
    pub image: String,
}

/// Why a fetch failed. [`OciError::is_transient`] tells which are worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("Invalid OCI image reference {0}.")]
    InvalidReference(String),
    #[error("The configuration collection reference '{0}' is not configured.")]
    NotAllowed(String),
    #[error("Invalid configuration file name '{0}'.")]
    InvalidFileName(String),
    #[error("Failed to access container registry '{registry}': {message}")]
    Registry {
        registry: String,
        message: String,
        /// Connection problems, timeouts, 408/429/5xx answers.
        transient: bool,
    },
    #[error("The image '{0}' was not found in its container registry.")]
    ImageNotFound(String),
    #[error("The image '{image}' has an invalid manifest: {reason}")]
    BadManifest { image: String, reason: String },
    #[error("The file '{name}' was not found in image '{image}'.")]
    FileNotFound { name: String, image: String },
    #[error("A layer of image '{image}' is too large ({size} bytes; at most {limit} are allowed).")]
    LayerTooLarge {
        image: String,
        size: u64,
        limit: u64,
    },
    #[error("The file '{name}' in image '{image}' is too large ({size} bytes > {limit} bytes).")]
    FileTooLarge {
        name: String,
        image: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "Digest mismatch: expected {expected}, but the registry's content has digest {actual}."
    )]
    DigestMismatch { expected: String, actual: String },
    #[error("Layer {digest} of image '{image}' is not a valid tar.gz archive: {reason}")]
    BadLayer {
        image: String,
        digest: String,
        reason: String,
    },
    #[error("Internal error while fetching from a container registry: {0}")]
    Internal(String),
}

impl OciError {
    /// True for failures that may go away on retry: connection errors, timeouts, 408/429/5xx.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            OciError::Registry {
                transient: true,
                ..
            }
        )
    }
}

/// Fetches `file_name` out of the OCI image `image` (see the crate documentation for the rules).
///
/// Blocking; safe to call from any thread, including one inside a tokio runtime (the work then
/// runs on a helper thread). Never panics: a panic inside the OCI client or the archive reader is
/// reported as [`OciError::Internal`].
pub fn fetch_file(
    settings: &OciSettings,
    image: &str,
    file_name: &str,
) -> Result<Fetched, OciError> {
    let parsed = settings.check_reference(image)?;
    check_file_name(file_name)?;
    fetch::run_blocking(settings, &parsed, file_name, &Limits::default())
}

/// A name is matched against archive entries, never used as a local path; still, only plain
/// relative names are accepted: no empty, `.` or `..` components, no backslashes or control
/// characters, at most 255 bytes.
fn check_file_name(name: &str) -> Result<(), OciError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('/')
        && !name.chars().any(|c| c.is_control() || c == '\\')
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(OciError::InvalidFileName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        for ok in [
            "r4-config.json",
            "configs/r4-config.json",
            "a b.json",
            "ü.json",
        ] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x.json",
            "a/../x.json",
            "./x.json",
            "a//b",
            "a/",
            "a\\b",
            "a\0b",
            "a\nb",
        ] {
            assert!(
                matches!(check_file_name(bad), Err(OciError::InvalidFileName(_))),
                "{bad:?}"
            );
        }
        assert!(check_file_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn allow_list_checks_and_messages() {
        let settings = OciSettings {
            allow: vec!["127.0.0.1:5001/deid".parse().unwrap()],
            ..OciSettings::default()
        };
        assert!(settings.check_reference("127.0.0.1:5001/deid:v1").is_ok());
        let err = settings
            .check_reference("127.0.0.1:5001/other:v1")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "The configuration collection reference '127.0.0.1:5001/other:v1' is not configured."
        );
        assert!(!err.is_transient());
        let err = fetch_file(&settings, "evil.example/deid:v1", "r4-config.json").unwrap_err();
        assert!(matches!(err, OciError::NotAllowed(_)), "{err:?}");
        let err = fetch_file(&settings, "127.0.0.1:5001/deid", "r4-config.json").unwrap_err();
        assert!(matches!(err, OciError::InvalidReference(_)), "{err:?}");
        let err = fetch_file(&settings, "127.0.0.1:5001/deid:v1", "../x").unwrap_err();
        assert!(matches!(err, OciError::InvalidFileName(_)), "{err:?}");
        // Nothing allowed by default.
        assert!(
            OciSettings::default()
                .check_reference("127.0.0.1:5001/deid:v1")
                .is_err()
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let settings = OciSettings {
            username: Some("u".into()),
            password: Some("hunter2".into()),
            ..OciSettings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2") && shown.contains("***"));
    }

    /// Settings that allow (over plain HTTP) the registry at `addr`.
    fn local(addr: &str, timeout: Duration) -> OciSettings {
        OciSettings {
            allow: vec![addr.parse().unwrap()],
            insecure_http: vec![addr.to_string()],
            timeout,
            ..OciSettings::default()
        }
    }

    /// An address on which nothing listens (a port just released).
    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        addr
    }

    #[test]
    fn unreachable_registry_is_transient() {
        let addr = closed_port();
        let settings = local(&addr, Duration::from_secs(10));
        let err = fetch_file(&settings, &format!("{addr}/deid:v1"), "r4-config.json").unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("Failed to access container registry '{addr}': ")),
            "{err}"
        );
    }

    #[test]
    fn silent_registry_times_out() {
        // Connections are accepted by the kernel but never answered: the timeout must end it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let settings = local(&addr, Duration::from_secs(1));
        let err = fetch_file(&settings, &format!("{addr}/deid:v1"), "r4-config.json").unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        drop(listener);
    }

    #[test]
    fn callable_from_inside_a_runtime() {
        let addr = closed_port();
        let settings = local(&addr, Duration::from_secs(10));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(async {
            // Deliberately blocking inside async code: must not panic with "Cannot start a
            // runtime from within a runtime".
            fetch_file(&settings, &format!("{addr}/deid:v1"), "r4-config.json").unwrap_err()
        });
        assert!(err.is_transient(), "{err:?}");
    }
}

//! The server's one typed configuration: defaults in code, `FHIRHOSE_*` environment variables,
//! command-line flags. Validated at start-up ([`ServeConfig::validate`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// `fhirhose serve` options. Every flag also reads the environment variable named beside it.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address and port to listen on.
    #[arg(long, env = "FHIRHOSE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Data directory: the SQLite database `fhirhose.db` and the local `storage/` folder.
    #[arg(long, env = "FHIRHOSE_DATA_DIR", default_value = "./fhirhose-data")]
    pub data_dir: PathBuf,
    /// Base URL written into links and manifests (default: http://<listen address>).
    #[arg(long, env = "FHIRHOSE_BASE_URL")]
    pub base_url: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "FHIRHOSE_MAX_BODY_BYTES", default_value_t = 100 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Log format.
    #[arg(long, env = "FHIRHOSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Authorization mode: `none` (loopback only unless --insecure) or `smart`
    /// (SMART Backend Services).
    #[arg(long, env = "FHIRHOSE_AUTH", default_value = "none")]
    pub auth: String,
    /// SMART client registrations (JSON array), required with `--auth smart`.
    #[arg(long, env = "FHIRHOSE_CLIENTS")]
    pub clients: Option<PathBuf>,
    /// Allow `--auth none` on a non-loopback address.
    #[arg(long, env = "FHIRHOSE_INSECURE", default_value_t = false)]
    pub insecure: bool,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, env = "FHIRHOSE_TOKEN_LIFETIME", default_value_t = 300)]
    pub token_lifetime: u64,
    #[command(flatten)]
    pub export: ExportOptions,
}

/// `$export` options.
#[derive(Debug, Clone, Args)]
pub struct ExportOptions {
    /// Export worker threads in this process (default: the number of cores, at least 2).
    #[arg(long, env = "FHIRHOSE_EXPORT_WORKERS")]
    pub export_workers: Option<usize>,
    /// Resources per NDJSON file before it is rolled to the next number.
    #[arg(long, env = "FHIRHOSE_EXPORT_FILE_RESOURCES", default_value_t = 5000)]
    pub export_file_resources: u64,
    /// Megabytes per NDJSON file before it is rolled (whichever limit comes first).
    #[arg(long, env = "FHIRHOSE_EXPORT_FILE_MB", default_value_t = 64)]
    pub export_file_mb: u64,
    /// Resources per work item: an export is split into items of about this size, which the
    /// workers share.
    #[arg(
        long,
        env = "FHIRHOSE_EXPORT_ITEM_RESOURCES",
        default_value_t = 250_000
    )]
    pub export_item_resources: u64,
    /// Exports queued or running at once; more kick-offs get 429.
    #[arg(long, env = "FHIRHOSE_EXPORT_MAX_CONCURRENT", default_value_t = 4)]
    pub export_max_concurrent: u64,
    /// Seconds without a heartbeat after which a running work item is taken over.
    #[arg(long, env = "FHIRHOSE_EXPORT_HEARTBEAT_TIMEOUT", default_value_t = 600)]
    pub export_heartbeat_timeout: u64,
    /// Container used when a kick-off has no `_container`.
    #[arg(long, env = "FHIRHOSE_EXPORT_CONTAINER", default_value = "exports")]
    pub export_container: String,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            export_workers: None,
            export_file_resources: 5000,
            export_file_mb: 64,
            export_item_resources: 250_000,
            export_max_concurrent: 4,
            export_heartbeat_timeout: 600,
            export_container: "exports".into(),
        }
    }
}

impl ExportOptions {
    /// The export service settings for a data directory.
    pub fn export_config(
        &self,
        data_dir: &std::path::Path,
        base_url: String,
    ) -> export::ExportConfig {
        let mut c = export::ExportConfig::local(
            data_dir.join("storage"),
            data_dir.join("exports.db"),
            base_url,
        );
        if let Some(w) = self.export_workers {
            c.workers = w;
        }
        c.run.file_max_resources = self.export_file_resources;
        c.run.file_max_bytes = self.export_file_mb.saturating_mul(1024 * 1024);
        c.run.item_resources = self.export_item_resources;
        c.max_concurrent = self.export_max_concurrent;
        c.heartbeat_timeout = std::time::Duration::from_secs(self.export_heartbeat_timeout);
        c.default_container = self.export_container.clone();
        c
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--base-url '{0}' must be an absolute http(s) URL without query or fragment")]
    BaseUrl(String),
    #[error("--max-body-bytes must be at least 1024")]
    BodyLimit,
    #[error("{0}")]
    Export(String),
    #[error("{0}")]
    Auth(String),
}

impl ServeConfig {
    /// Checks the values that clap cannot check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(b) = &self.base_url {
            let ok = (b.starts_with("http://") || b.starts_with("https://"))
                && !b.contains(['?', '#', ' '])
                && b.len() > "https://".len();
            if !ok {
                return Err(ConfigError::BaseUrl(b.clone()));
            }
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::BodyLimit);
        }
        let e = &self.export;
        if e.export_workers == Some(0) {
            return Err(ConfigError::Export(
                "--export-workers must be at least 1".into(),
            ));
        }
        if e.export_file_resources == 0 || e.export_file_mb == 0 || e.export_item_resources == 0 {
            return Err(ConfigError::Export(
                "--export-file-resources, --export-file-mb and --export-item-resources must be at least 1".into(),
            ));
        }
        if e.export_heartbeat_timeout < 5 {
            return Err(ConfigError::Export(
                "--export-heartbeat-timeout must be at least 5 seconds".into(),
            ));
        }
        if !export::request::valid_container(&e.export_container) {
            return Err(ConfigError::Export(format!(
                "--export-container '{}' is not a valid container name (3-63 lowercase letters, digits and single hyphens)",
                e.export_container
            )));
        }
        Ok(())
    }

    /// The base URL without a trailing slash.
    pub fn base_url(&self) -> String {
        match &self.base_url {
            Some(b) => b.trim_end_matches('/').to_string(),
            None => {
                let addr = self.listen;
                // An unspecified address is not reachable as such: name the loopback instead.
                let host = if addr.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else if addr.is_ipv6() {
                    format!("[{}]", addr.ip())
                } else {
                    addr.ip().to_string()
                };
                format!("http://{host}:{}", addr.port())
            }
        }
    }
}

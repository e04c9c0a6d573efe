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

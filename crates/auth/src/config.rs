//! Authorization settings and the start-up checks on them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::registry::RegistryError;

/// Default access-token lifetime: five minutes, the SMART Backend Services recommendation
/// (`expires_in` SHOULD be at most 300). Clients request a new token when it runs out.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// Longest allowed access-token lifetime.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// `--auth none|smart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// No authorization: every request may do everything. Loopback only unless `--insecure`.
    #[default]
    None,
    /// SMART Backend Services: bearer tokens from `/auth/token`.
    Smart,
}

impl FromStr for AuthMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<AuthMode, ConfigError> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(AuthMode::None),
            "smart" => Ok(AuthMode::Smart),
            _ => Err(ConfigError::UnknownMode {
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMode::None => "none",
            AuthMode::Smart => "smart",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown auth mode `{value}` (expected `none` or `smart`)")]
    UnknownMode { value: String },
    #[error(
        "refusing to serve without authorization on {addr}, which is not a loopback address: \
         use `--auth smart --clients FILE`, listen on 127.0.0.1 / [::1], or pass `--insecure` \
         (FHIRHOSE_INSECURE=true) to accept the risk"
    )]
    UnprotectedPublicListener { addr: SocketAddr },
    #[error(
        "`--auth smart` needs `--clients FILE` (FHIRHOSE_CLIENTS) listing the registered clients"
    )]
    ClientsFileMissing,
    #[error("the token lifetime must be between 1 and {max} seconds, not {secs}", max = MAX_TOKEN_LIFETIME.as_secs())]
    TokenLifetime { secs: u64 },
    #[error("the base URL `{value}` is not an absolute http(s) URL")]
    BaseUrl { value: String },
    #[error("--token-key {path}: {reason}")]
    TokenKey { path: String, reason: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Mode `none` is allowed only on loopback listen addresses, unless `insecure` is set.
pub fn check_mode(
    mode: AuthMode,
    listen_addr: SocketAddr,
    insecure: bool,
) -> Result<(), ConfigError> {
    if mode == AuthMode::None && !insecure && !is_loopback(listen_addr) {
        return Err(ConfigError::UnprotectedPublicListener { addr: listen_addr });
    }
    Ok(())
}

fn is_loopback(addr: SocketAddr) -> bool {
    // `::ffff:127.0.0.1` is loopback too; the unspecified address (0.0.0.0, ::) is every interface.
    addr.ip().to_canonical().is_loopback()
}

/// Everything the auth layer needs from the server's configuration.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// The registered clients (`--clients`), required in mode `smart`.
    pub clients_file: Option<PathBuf>,
    /// Accept mode `none` on a non-loopback address.
    pub insecure: bool,
    pub token_lifetime: Duration,
    /// The public base URL of the server, without trailing slash; the token endpoint is
    /// `{base_url}/auth/token` and assertions must name exactly that as `aud`.
    pub base_url: String,
    /// How many assertion `jti`s to remember at most (see [`crate::replay`]).
    pub replay_capacity: usize,
    /// A file holding the access-token signing key (`--token-key`): every process configured
    /// with the same file accepts the others' tokens, with or without a shared database (which
    /// otherwise provides the key). Its bytes, surrounding whitespace trimmed, at least 32.
    pub token_key_file: Option<PathBuf>,
}

impl AuthSettings {
    pub fn new(mode: AuthMode, base_url: impl Into<String>) -> AuthSettings {
        AuthSettings {
            mode,
            clients_file: None,
            insecure: false,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            base_url: base_url.into(),
            replay_capacity: crate::replay::DEFAULT_CAPACITY,
            token_key_file: None,
        }
    }

    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        let secs = self.token_lifetime.as_secs();
        if secs == 0 || self.token_lifetime > MAX_TOKEN_LIFETIME {
            return Err(ConfigError::TokenLifetime { secs });
        }
        let ok = reqwest::Url::parse(&self.base_url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
        if !ok {
            return Err(ConfigError::BaseUrl {
                value: self.base_url.clone(),
            });
        }
        Ok(())
    }

    /// The configured signing key (`--token-key`), read and checked; `None` without one.
    pub fn token_key(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(path) = &self.token_key_file else {
            return Ok(None);
        };
        let bad = |reason: String| ConfigError::TokenKey {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let key = bytes.trim_ascii();
        if key.len() < crate::shared::SIGNING_KEY_BYTES {
            // The length only: the text names no part of the key.
            return Err(bad(format!(
                "the key has {} bytes; at least {} are needed (e.g. `openssl rand -hex 32`)",
                key.len(),
                crate::shared::SIGNING_KEY_BYTES
            )));
        }
        Ok(Some(key.to_vec()))
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.base_url.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names() {
        assert_eq!("none".parse::<AuthMode>().unwrap(), AuthMode::None);
        assert_eq!("SMART".parse::<AuthMode>().unwrap(), AuthMode::Smart);
        assert!("oauth".parse::<AuthMode>().is_err());
    }
}

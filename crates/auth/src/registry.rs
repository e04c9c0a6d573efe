//! The registered clients: loaded once at start from a JSON file, checked strictly so that a
//! typo fails the start rather than a later token request.
//!
//! File format (a JSON array):
//! `[{"client_id": "…", "jwks": {"keys": […]}, "scope": "system/*.rs"}]`, or `"jwks_url"` in
//! place of `"jwks"`. `scope` is the most the client may ever be granted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

pub use crate::jwk::{KeyKind, VerificationKey};
use crate::jwk::{MAX_JWKS_KEYS, parse_jwk};
use crate::jwks_fetch::{JwksFetcher, JwksUrlSource};
use crate::scope::{ScopeError, Scopes};

/// A problem in the clients file. Each names the file and the client (by index and id).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read the clients file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the clients file {path} is not a JSON array of {{client_id, jwks | jwks_url, scope}}: {message}"
    )]
    Syntax { path: PathBuf, message: String },
    #[error("clients file {path}, client #{index}: `client_id` is empty")]
    EmptyClientId { path: PathBuf, index: usize },
    #[error("clients file {path}: client_id `{client_id}` is registered twice")]
    DuplicateClientId { path: PathBuf, client_id: String },
    #[error("clients file {path}, client `{client_id}`: give exactly one of `jwks` and `jwks_url`")]
    KeySourceChoice { path: PathBuf, client_id: String },
    #[error("clients file {path}, client `{client_id}`: invalid scope: {source}")]
    Scope {
        path: PathBuf,
        client_id: String,
        #[source]
        source: ScopeError,
    },
    #[error(
        "clients file {path}, client `{client_id}`: `jwks.keys[{index}]` is not usable: {reason}"
    )]
    Key {
        path: PathBuf,
        client_id: String,
        index: usize,
        reason: String,
    },
    #[error("clients file {path}, client `{client_id}`: `jwks` has no keys")]
    NoKeys { path: PathBuf, client_id: String },
    #[error(
        "clients file {path}, client `{client_id}`: `jwks` holds {count} keys, more than {MAX_JWKS_KEYS}"
    )]
    TooManyKeys {
        path: PathBuf,
        client_id: String,
        count: usize,
    },
    #[error("clients file {path}, client `{client_id}`: `jwks_url` {reason}")]
    JwksUrl {
        path: PathBuf,
        client_id: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    client_id: String,
    #[serde(default)]
    jwks: Option<JwksEntry>,
    #[serde(default)]
    jwks_url: Option<String>,
    scope: String,
    /// The stored de-identification key sets the client may name in `_anonymizationKeySet`
    /// (`"*"`: every one). None by default.
    #[serde(default)]
    key_sets: Vec<String>,
}

#[derive(Deserialize)]
struct JwksEntry {
    keys: Vec<serde_json::Value>,
}

/// Where a client's keys come from.
pub(crate) enum KeySource {
    Inline(Vec<VerificationKey>),
    Url(JwksUrlSource),
}

/// One registered client.
pub struct RegisteredClient {
    pub client_id: String,
    /// The most this client may be granted.
    pub max_scope: Scopes,
    /// The key sets the client may use (`key_sets` in the clients file).
    pub key_sets: KeySets,
    pub(crate) keys: KeySource,
}

/// Which stored de-identification key sets (`_anonymizationKeySet`) a caller may use.
///
/// Whoever may use a key set and read the raw data can pair a raw export with a de-identified
/// one under that key set, and so holds the mapping from real ids and dates to that release's
/// pseudonyms and shifts: a key set is granted per client, none by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySets {
    /// Every key set (no authorization, or `"*"` in the clients file).
    All,
    /// Only these (by name).
    Only(Vec<String>),
}

impl KeySets {
    /// No key set.
    pub fn none() -> KeySets {
        KeySets::Only(Vec::new())
    }

    /// From a clients file's `key_sets` list.
    fn from_names(names: Vec<String>) -> KeySets {
        if names.iter().any(|n| n == "*") {
            KeySets::All
        } else {
            KeySets::Only(names)
        }
    }

    /// Whether the key set `name` may be used.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            KeySets::All => true,
            KeySets::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

impl RegisteredClient {
    /// The registered JWKS URL, if the client registered one.
    pub fn jwks_url(&self) -> Option<&str> {
        match &self.keys {
            KeySource::Url(u) => Some(u.url().as_str()),
            KeySource::Inline(_) => None,
        }
    }
}

/// All registered clients, by `client_id`.
pub struct ClientRegistry {
    clients: HashMap<String, Arc<RegisteredClient>>,
    pub(crate) fetcher: JwksFetcher,
}

impl ClientRegistry {
    /// Loads and checks the clients file.
    pub fn load(path: &Path) -> Result<ClientRegistry, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses the clients file's text; `path` is used in messages only.
    pub fn from_json(text: &str, path: &Path) -> Result<ClientRegistry, RegistryError> {
        let entries: Vec<ClientEntry> =
            serde_json::from_str(text).map_err(|e| RegistryError::Syntax {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let fetcher = JwksFetcher::new();
        let mut clients = HashMap::new();
        for (index, entry) in entries.into_iter().enumerate() {
            let p = || path.to_owned();
            if entry.client_id.trim().is_empty() {
                return Err(RegistryError::EmptyClientId { path: p(), index });
            }
            let client_id = entry.client_id;
            let key_sets = KeySets::from_names(entry.key_sets);
            let max_scope = Scopes::parse(&entry.scope).map_err(|source| RegistryError::Scope {
                path: p(),
                client_id: client_id.clone(),
                source,
            })?;
            let keys = match (entry.jwks, entry.jwks_url) {
                (Some(jwks), None) => {
                    if jwks.keys.len() > MAX_JWKS_KEYS {
                        return Err(RegistryError::TooManyKeys {
                            path: p(),
                            client_id,
                            count: jwks.keys.len(),
                        });
                    }
                    let mut keys = Vec::new();
                    for (i, k) in jwks.keys.iter().enumerate() {
                        match parse_jwk(k) {
                            Ok(Some(key)) => keys.push(key),
                            Ok(None) => {}
                            Err(reason) => {
                                return Err(RegistryError::Key {
                                    path: p(),
                                    client_id,
                                    index: i,
                                    reason,
                                });
                            }
                        }
                    }
                    if keys.is_empty() {
                        return Err(RegistryError::NoKeys {
                            path: p(),
                            client_id,
                        });
                    }
                    KeySource::Inline(keys)
                }
                (None, Some(url)) => {
                    let source =
                        JwksUrlSource::new(&url).map_err(|reason| RegistryError::JwksUrl {
                            path: p(),
                            client_id: client_id.clone(),
                            reason,
                        })?;
                    KeySource::Url(source)
                }
                _ => {
                    return Err(RegistryError::KeySourceChoice {
                        path: p(),
                        client_id,
                    });
                }
            };
            if clients.contains_key(&client_id) {
                return Err(RegistryError::DuplicateClientId {
                    path: p(),
                    client_id,
                });
            }
            let client = RegisteredClient {
                client_id: client_id.clone(),
                max_scope,
                key_sets,
                keys,
            };
            clients.insert(client_id, Arc::new(client));
        }
        Ok(ClientRegistry { clients, fetcher })
    }

    pub fn get(&self, client_id: &str) -> Option<Arc<RegisteredClient>> {
        self.clients.get(client_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn client_ids(&self) -> impl Iterator<Item = &str> {
        self.clients.keys().map(String::as_str)
    }
}

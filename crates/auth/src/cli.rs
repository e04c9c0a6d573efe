//! The client-side subcommands the `fhirhose` binary exposes: `fhirhose jwks` and
//! `fhirhose token`. Defined here so the binary only adds one enum variant and one call each.

use std::path::PathBuf;

use jsonwebtoken::Algorithm;

use crate::client_tools::{
    ClientKey, ClientKeyError, TokenRequestError, jwks_document, request_token,
};

/// `fhirhose jwks KEY.pem…`: print the JWKS (public keys) to register for a client.
#[derive(Debug, Clone, clap::Args)]
pub struct JwksArgs {
    /// PEM private keys (PKCS#8): RSA (RS384), EC P-384 (ES384) or EC P-256 (ES256).
    #[arg(required = true)]
    pub keys: Vec<PathBuf>,
    /// Key id to use instead of the RFC 7638 thumbprint (only with a single key).
    #[arg(long)]
    pub kid: Option<String>,
}

/// `fhirhose token`: sign a client assertion and exchange it for an access token.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The registered client_id.
    #[arg(long)]
    pub client_id: String,
    /// The client's PEM private key (PKCS#8).
    #[arg(long)]
    pub key: PathBuf,
    /// The server's token endpoint, e.g. http://localhost:8080/auth/token.
    #[arg(long)]
    pub token_url: String,
    /// The scopes to request, space-separated.
    #[arg(long, default_value = "system/*.rs")]
    pub scope: String,
    /// Key id; defaults to the key's RFC 7638 thumbprint (what `fhirhose jwks` publishes).
    #[arg(long)]
    pub kid: Option<String>,
    /// Signing algorithm: RS384, RS256, ES384 or ES256 (default: from the key).
    #[arg(long)]
    pub alg: Option<String>,
    /// Print only the signed assertion instead of requesting a token.
    #[arg(long)]
    pub assertion_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: ClientKeyError,
    },
    #[error("--alg must be RS384, RS256, ES384 or ES256")]
    Alg,
    #[error("--kid names one key; give one key file with it")]
    KidWithManyKeys,
    #[error(transparent)]
    Token(#[from] TokenRequestError),
}

fn load(
    path: &PathBuf,
    alg: Option<Algorithm>,
    kid: Option<String>,
) -> Result<ClientKey, CliError> {
    let pem = std::fs::read(path).map_err(|source| CliError::Read {
        path: path.clone(),
        source,
    })?;
    ClientKey::from_pem(&pem, alg, kid).map_err(|source| CliError::Key {
        path: path.clone(),
        source,
    })
}

/// Builds the JWKS document for `fhirhose jwks`.
pub fn run_jwks(args: &JwksArgs) -> Result<String, CliError> {
    if args.kid.is_some() && args.keys.len() > 1 {
        return Err(CliError::KidWithManyKeys);
    }
    let keys = args
        .keys
        .iter()
        .map(|p| load(p, None, args.kid.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let doc = jwks_document(&keys).map_err(|source| CliError::Key {
        path: args.keys[0].clone(),
        source,
    })?;
    Ok(serde_json::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string()))
}

/// Runs `fhirhose token`: the JSON token response (or the bare assertion with
/// `--assertion-only`), to print on stdout.
pub async fn run_token(args: &TokenArgs) -> Result<String, CliError> {
    let alg = match args.alg.as_deref() {
        None => None,
        Some("RS384") => Some(Algorithm::RS384),
        Some("RS256") => Some(Algorithm::RS256),
        Some("ES384") => Some(Algorithm::ES384),
        Some("ES256") => Some(Algorithm::ES256),
        Some(_) => return Err(CliError::Alg),
    };
    let key = load(&args.key, alg, args.kid.clone())?;
    if args.assertion_only {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        return key
            .sign(&args.client_id, &args.token_url, now)
            .map_err(|source| CliError::Key {
                path: args.key.clone(),
                source,
            });
    }
    let response = request_token(&args.token_url, &args.client_id, &key, &args.scope).await?;
    Ok(serde_json::to_string(&response).unwrap_or_default())
}

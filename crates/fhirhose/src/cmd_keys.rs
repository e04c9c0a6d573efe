//! `fhirhose keys create|list|rotate|delete NAME`: named de-identification key sets, kept in the
//! database (SQLite: the data directory's `exports.db`, usable while a server runs; PostgreSQL:
//! the `deid_key_set` table). Key material is never printed: only a fingerprint.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use store::JobQueue;
use store::keysets::KeySet;

use crate::failure::Failure;

/// Where the key sets are: the flags every `keys` command and `anonymize --key-set` take.
#[derive(Debug, Clone, Args)]
pub struct KeyStoreArgs {
    /// Data directory (SQLite; its `exports.db` holds the key sets).
    #[arg(
        long,
        global = true,
        env = "FHIRHOSE_DATA_DIR",
        default_value = "./fhirhose-data"
    )]
    pub data_dir: PathBuf,
    /// The database: `sqlite` (default: the data directory's) or a PostgreSQL URL.
    #[arg(long, global = true, env = "FHIRHOSE_DATABASE")]
    pub database: Option<store::DatabaseArg>,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
    #[command(flatten)]
    pub store: KeyStoreArgs,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key set with fresh random keys (cryptoHashKey, encryptKey, dateShiftKey).
    Create { name: String },
    /// List the key sets: name, version, fingerprint, created and rotated times (no keys).
    List,
    /// Replace a key set's keys with fresh ones (exports after this no longer match earlier ones).
    Rotate { name: String },
    /// Delete a key set.
    Delete { name: String },
}

/// The queue whose database holds the key sets. SQLite: `exports.db` opened directly (no data
/// directory lock, so a running server's key sets can be managed).
pub fn open(args: &KeyStoreArgs) -> Result<Arc<dyn JobQueue>, Failure> {
    let database = store::Database::from_flag(args.database.as_ref(), &args.data_dir);
    match &database {
        store::Database::Sqlite { data_dir } => {
            std::fs::create_dir_all(data_dir)
                .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
            let path = data_dir.join(store::sqlite::JOBS_FILE_NAME);
            let q = store::sqlite::SqliteJobQueue::open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            Ok(Arc::new(q))
        }
        store::Database::Postgres { .. } => {
            let s = store::open(&database, store::OpenOptions::default())
                .map_err(|e| Failure::store(format!("cannot open {}", database.describe()), &e))?;
            s.jobs()
                .map_err(|e| Failure::from(format!("cannot open the job tables: {e}")))
        }
    }
}

/// The keys of a stored set.
pub fn load(args: &KeyStoreArgs, name: &str) -> Result<deid::keys::Keys, Failure> {
    let q = open(args)?;
    let sets = q
        .key_sets()
        .ok_or_else(|| "this database keeps no key sets".to_string())?;
    let set = sets
        .key_set(name)
        .map_err(|e| format!("cannot read key set {name}: {e}"))?
        .ok_or_else(|| format!("no key set named '{name}'"))?;
    Ok(keys_of(&set))
}

fn keys_of(set: &KeySet) -> deid::keys::Keys {
    deid::keys::Keys {
        crypto_hash_key: set.crypto_hash_key.clone(),
        encrypt_key: set.encrypt_key.clone(),
        date_shift_key: set.date_shift_key.clone(),
    }
}

fn check_name(name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err("a key set name is 1-64 letters, digits, '-', '_' or '.'"
            .to_string()
            .into())
    }
}

fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

pub fn run(args: KeysArgs) -> Result<(), Failure> {
    let q = open(&args.store)?;
    let sets = q
        .key_sets()
        .ok_or_else(|| "this database keeps no key sets".to_string())?;
    let now = chrono::Utc::now().timestamp_millis();
    let db = |e: store::QueueError| Failure::from(format!("key sets: {e}"));
    match args.command {
        KeysCommand::Create { name } => {
            check_name(&name)?;
            let k = deid::keys::Keys::generate();
            let set = KeySet {
                name: name.clone(),
                version: 1,
                crypto_hash_key: k.crypto_hash_key.clone(),
                encrypt_key: k.encrypt_key.clone(),
                date_shift_key: k.date_shift_key.clone(),
                created_ms: now,
                rotated_ms: None,
            };
            if !sets.create_key_set(&set).map_err(db)? {
                return Err(
                    format!("key set '{name}' exists (rotate it, or delete it first)").into(),
                );
            }
            tracing::info!(key_set = %name, fingerprint = %k.fingerprint(), "key set created");
            println!(
                "created key set {name} (version 1, fingerprint {})",
                k.fingerprint()
            );
        }
        KeysCommand::List => {
            let all = sets.key_sets().map_err(db)?;
            if all.is_empty() {
                println!("no key sets");
            } else {
                println!(
                    "{:<24} {:>7}  {:<16}  {:<20}  rotated",
                    "name", "version", "fingerprint", "created"
                );
                for s in all {
                    println!(
                        "{:<24} {:>7}  {:<16}  {:<20}  {}",
                        s.name,
                        s.version,
                        keys_of(&s).fingerprint(),
                        when(s.created_ms),
                        s.rotated_ms.map(when).unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        KeysCommand::Rotate { name } => {
            let k = deid::keys::Keys::generate();
            let set = KeySet {
                name: name.clone(),
                version: 0,
                crypto_hash_key: k.crypto_hash_key.clone(),
                encrypt_key: k.encrypt_key.clone(),
                date_shift_key: k.date_shift_key.clone(),
                created_ms: now,
                rotated_ms: Some(now),
            };
            let v = sets
                .rotate_key_set(&set, now)
                .map_err(db)?
                .ok_or_else(|| format!("no key set named '{name}'"))?;
            tracing::info!(key_set = %name, version = v, fingerprint = %k.fingerprint(), "key set rotated");
            println!(
                "rotated key set {name} (version {v}, fingerprint {})",
                k.fingerprint()
            );
        }
        KeysCommand::Delete { name } => {
            if !sets.delete_key_set(&name).map_err(db)? {
                return Err(format!("no key set named '{name}'").into());
            }
            tracing::info!(key_set = %name, "key set deleted");
            println!("deleted key set {name}");
        }
    }
    Ok(())
}

/// `fhirhose anonymize`, with `--key-set NAME` supplying the keys its configuration leaves
/// empty from the database's key set (the same keys `_anonymizationKeySet=NAME` gives an
/// export: the same `cryptoHash` ids and date shifts).
#[derive(Debug, Args)]
pub struct AnonymizeCmd {
    #[command(flatten)]
    pub args: deid_cli::AnonymizeArgs,
    /// A stored key set (`fhirhose keys`) for the keys the configuration leaves empty.
    #[arg(long)]
    pub key_set: Option<String>,
    #[command(flatten)]
    pub store: KeyStoreArgs,
}

/// The anonymize arguments with the key set's keys, when one is named.
pub fn with_key_set(cmd: AnonymizeCmd) -> Result<deid_cli::AnonymizeArgs, Failure> {
    let mut args = cmd.args;
    if let Some(name) = &cmd.key_set {
        args.keys = Some(load(&cmd.store, name)?);
    }
    Ok(args)
}

//! Choosing and opening the store at start: [`Database`] (from `--database` /
//! `FHIRHOSE_DATABASE`) and [`open`], which every command that opens a store goes through, so that
//! the code paths after it are the same for both backends.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::postgres::{PgOptions, PgStore, is_postgres_url};
use crate::sqlite::{SqliteOptions, SqliteStore};
use crate::{Indexer, Store, StoreError};

/// The environment variable of `--database`.
pub const DATABASE_ENV: &str = "FHIRHOSE_DATABASE";

/// Which database the store lives in.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// `fhirhose.db` (and `exports.db`) in the data directory, which the process locks.
    Sqlite { data_dir: PathBuf },
    /// A PostgreSQL database (`postgres://…` or `postgresql://…`, `sslmode=require` for TLS).
    Postgres { url: String },
}

/// Debug never shows a URL (it may hold a password): only the backend and its place.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A `--database` value that names no backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "must be a postgres:// or postgresql:// URL, or `sqlite` (the data directory); got a value starting with '{0}'"
)]
pub struct UnknownDatabase(pub String);

/// The value of `--database` / `FHIRHOSE_DATABASE`, checked when the flags are parsed: `sqlite`
/// (or empty) or a PostgreSQL URL. Anything else is refused, so that a typo never silently starts
/// an empty SQLite store. Its `Debug` shows no URL (passwords travel in URLs).
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseArg {
    Sqlite,
    Postgres(String),
}

impl std::str::FromStr for DatabaseArg {
    type Err = UnknownDatabase;

    fn from_str(value: &str) -> Result<DatabaseArg, UnknownDatabase> {
        match value.trim() {
            "" | "sqlite" => Ok(DatabaseArg::Sqlite),
            url if is_postgres_url(url) => Ok(DatabaseArg::Postgres(url.to_string())),
            other => Err(UnknownDatabase(other.chars().take(12).collect())),
        }
    }
}

impl std::fmt::Debug for DatabaseArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseArg::Sqlite => f.write_str("sqlite"),
            DatabaseArg::Postgres(_) => f.write_str("postgres://…"),
        }
    }
}

impl Database {
    /// The database `--database` names: PostgreSQL, or — absent or `sqlite` — the SQLite files
    /// in `data_dir`.
    pub fn from_flag(value: Option<&DatabaseArg>, data_dir: &Path) -> Database {
        match value {
            Some(DatabaseArg::Postgres(url)) => Database::Postgres { url: url.clone() },
            None | Some(DatabaseArg::Sqlite) => Database::Sqlite {
                data_dir: data_dir.to_path_buf(),
            },
        }
    }

    /// For logs and messages: the data directory, or `postgres://host:port/db` without user,
    /// password or query.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite { data_dir } => format!("sqlite in {}", data_dir.display()),
            Database::Postgres { url } => {
                let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
                let rest = rest.split(['?', '#']).next().unwrap_or("");
                let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://{rest}")
            }
        }
    }

    /// Whether this process is the only one using the database (SQLite: the data directory
    /// lock). Work left running in it at start-up then belongs to a dead process.
    pub fn is_exclusive(&self) -> bool {
        matches!(self, Database::Sqlite { .. })
    }
}

/// How to open the store, whatever the backend.
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// Writes search index rows with every resource (`None`: a load with `--no-index`).
    pub indexer: Option<Arc<dyn Indexer>>,
}

/// Opens the store `database` names. SQLite: creates the data directory and takes its lock
/// ([`StoreError::Locked`] while another process holds it). PostgreSQL: connects and applies the
/// schema migrations ([`StoreError::Unavailable`] when the server cannot be reached).
pub fn open(database: &Database, options: OpenOptions) -> Result<Arc<dyn Store>, StoreError> {
    match database {
        Database::Sqlite { data_dir } => {
            std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
                path: data_dir.display().to_string(),
                source,
            })?;
            let options = SqliteOptions {
                indexer: options.indexer,
                ..SqliteOptions::default()
            };
            Ok(Arc::new(SqliteStore::open_data_dir(data_dir, options)?))
        }
        Database::Postgres { url } => {
            let options = PgOptions {
                indexer: options.indexer,
                ..PgOptions::default()
            };
            Ok(Arc::new(PgStore::connect(url, options)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_names_the_backend_and_a_typo_is_refused() {
        let dir = Path::new("/data");
        let sqlite = Database::Sqlite {
            data_dir: dir.into(),
        };
        let parse = |v: &str| {
            v.parse::<DatabaseArg>()
                .map(|a| Database::from_flag(Some(&a), dir))
        };
        assert_eq!(Database::from_flag(None, dir), sqlite);
        assert_eq!(parse(""), Ok(sqlite.clone()));
        assert_eq!(parse("sqlite"), Ok(sqlite));
        for url in [
            "postgres://u:p@h:5432/fh",
            "postgresql://h/fh?sslmode=require",
        ] {
            assert_eq!(parse(url), Ok(Database::Postgres { url: url.into() }));
        }
        assert!(parse("postgress://h/db").is_err());
        assert!(parse("/var/lib/fhirhose.db").is_err());
        assert_eq!(
            format!("{:?}", "postgres://u:pw@h/db".parse::<DatabaseArg>()),
            "Ok(postgres://…)"
        );
    }

    #[test]
    fn descriptions_carry_no_credentials() {
        let db = Database::Postgres {
            url: "postgres://fh:s3cret@db.example:5433/fhir?sslmode=require&password=x".into(),
        };
        assert_eq!(db.describe(), "postgres://db.example:5433/fhir");
        assert!(!format!("{db:?}").contains("s3cret"));
    }
}

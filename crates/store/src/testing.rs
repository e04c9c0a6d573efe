//! Test support (cargo feature `test-support`): a store per test on the backend the environment
//! names, so that the same tests run against SQLite and PostgreSQL.
//!
//! `FHIRHOSE_TEST_DATABASE` unset: SQLite in a temporary directory. Set to a PostgreSQL URL (a
//! running cluster, e.g. from `scripts/postgres.sh start .pg`): each test gets a database of its
//! own, `CREATE DATABASE fh_<random>`, dropped (`WITH (FORCE)`) when the guard is dropped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::postgres::Target;
use crate::{Indexer, PgOptions, PgStore, SqliteOptions, SqliteStore, Store, StoreError};

/// The environment variable naming the PostgreSQL cluster the tests use.
pub const TEST_DATABASE_ENV: &str = "FHIRHOSE_TEST_DATABASE";

/// The PostgreSQL URL of `FHIRHOSE_TEST_DATABASE`, when set (and not empty).
pub fn test_database_url() -> Option<String> {
    std::env::var(TEST_DATABASE_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// A database created for one test; dropped with it.
#[derive(Debug)]
pub struct TestDatabase {
    /// The URL of the new database (the base URL with its database name replaced).
    pub url: String,
    /// Its name (`fh_…`).
    pub name: String,
    base_url: String,
}

/// `CREATE DATABASE fh_<random>` on the cluster of `base_url`.
pub fn fresh_database(base_url: &str) -> Result<TestDatabase, StoreError> {
    create_database(base_url, None)
}

/// `CREATE DATABASE fh_<random> TEMPLATE template` on the cluster of `base_url`: a copy of a
/// database loaded once (no session may be connected to `template` meanwhile).
pub fn database_from_template(base_url: &str, template: &str) -> Result<TestDatabase, StoreError> {
    create_database(base_url, Some(template))
}

fn create_database(base_url: &str, template: Option<&str>) -> Result<TestDatabase, StoreError> {
    let name = format!("fh_{}", uuid::Uuid::new_v4().simple());
    let target = Target::parse(base_url, Duration::from_secs(10))?;
    let mut client = target.connect()?;
    let from = template
        .map(|t| format!(" TEMPLATE {t}"))
        .unwrap_or_default();
    client.batch_execute(&format!("CREATE DATABASE {name}{from}"))?;
    Ok(TestDatabase {
        url: with_database(base_url, &name),
        name,
        base_url: base_url.to_string(),
    })
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // On a thread of its own: the guard may drop inside an async test, where the blocking
        // client cannot run.
        let (base_url, name) = (self.base_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            Target::parse(&base_url, Duration::from_secs(10))
                .and_then(|t| t.connect())
                .and_then(|mut c| {
                    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .map_err(StoreError::from)
                })
        })
        .join()
        .unwrap_or_else(|_| Err(StoreError::Corrupt("the drop thread panicked".into())));
        if let Err(e) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Runs `sql` on the cluster of `base_url` (test set-ups: refuse a test database's connections,
/// terminate its backends).
pub fn admin_batch(base_url: &str, sql: &str) -> Result<(), StoreError> {
    let target = Target::parse(base_url, Duration::from_secs(10))?;
    target.connect()?.batch_execute(sql)?;
    Ok(())
}

/// A transaction on another connection that holds `ACCESS EXCLUSIVE` locks on tables of the
/// database at `url` until it is dropped (rolled back): every statement that reads them waits,
/// however fast the machine, which is how a test makes a search statement that is still running
/// when its time limit passes.
pub struct TableLock {
    client: Option<postgres::Client>,
}

impl std::fmt::Debug for TableLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableLock").finish_non_exhaustive()
    }
}

/// Locks `tables` of the database at `url` (see [`TableLock`]).
pub fn lock_tables(url: &str, tables: &[&str]) -> Result<TableLock, StoreError> {
    let target = Target::parse(url, Duration::from_secs(10))?;
    let mut client = target.connect()?;
    client.batch_execute(&format!(
        "BEGIN; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    ))?;
    Ok(TableLock {
        client: Some(client),
    })
}

impl Drop for TableLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // On a thread of its own, like the database guard (the blocking client cannot run
            // inside an async runtime).
            let _ = std::thread::spawn(move || {
                let mut client = client;
                let _ = client.batch_execute("ROLLBACK");
            })
            .join();
        }
    }
}

/// `url` with its database (path) replaced by `name`, the query kept.
pub fn with_database(url: &str, name: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let after = scheme_end + 3;
    let rest = &url[after..];
    let authority_end = rest.find(['/', '?']).map_or(url.len(), |i| after + i);
    let query_start = url[authority_end..]
        .find('?')
        .map_or(url.len(), |i| authority_end + i);
    format!("{}/{}{}", &url[..authority_end], name, &url[query_start..])
}

/// Which backend a [`TestStore`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// What keeps a test's database alive.
#[derive(Debug)]
pub enum TestGuard {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

/// A store for one test and the guard of its database (drop the store first: fields drop in
/// order).
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub backend: Backend,
    /// The SQLite file or the PostgreSQL URL (to open a second store on the same data).
    pub location: String,
    pub guard: TestGuard,
}

impl TestStore {
    /// Open another store on the same database (a second process, a restart).
    pub fn reopen(&self, indexer: Option<Arc<dyn Indexer>>) -> Arc<dyn Store> {
        open_at(self.backend, &self.location, indexer).expect("reopen the test store")
    }
}

impl std::ops::Deref for TestStore {
    type Target = dyn Store + 'static;
    fn deref(&self) -> &(dyn Store + 'static) {
        &*self.store
    }
}

fn open_at(
    backend: Backend,
    location: &str,
    indexer: Option<Arc<dyn Indexer>>,
) -> Result<Arc<dyn Store>, StoreError> {
    open_sized(backend, location, indexer, None)
}

fn open_sized(
    backend: Backend,
    location: &str,
    indexer: Option<Arc<dyn Indexer>>,
    connections: Option<usize>,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match backend {
        Backend::Sqlite => {
            let mut options = SqliteOptions {
                indexer,
                ..SqliteOptions::default()
            };
            if let Some(n) = connections {
                options.readers = n;
            }
            Arc::new(SqliteStore::open(&PathBuf::from(location), options)?)
        }
        Backend::Postgres => {
            let mut options = PgOptions {
                indexer,
                ..PgOptions::default()
            };
            if let Some(n) = connections {
                options.pool_size = n;
            }
            Arc::new(PgStore::connect(location, options)?)
        }
    })
}

/// A fresh, empty store on the backend `FHIRHOSE_TEST_DATABASE` selects. Panics when it cannot
/// be created (a test set-up failure).
pub fn test_store(indexer: Option<Arc<dyn Indexer>>) -> TestStore {
    test_store_sized(indexer, None)
}

/// [`test_store`] with `connections` reader connections (SQLite) or pooled connections
/// (PostgreSQL) instead of the default.
pub fn test_store_sized(
    indexer: Option<Arc<dyn Indexer>>,
    connections: Option<usize>,
) -> TestStore {
    match test_database_url() {
        Some(base) => {
            let db = fresh_database(&base).expect("create a test database");
            let location = db.url.clone();
            let store = open_sized(Backend::Postgres, &location, indexer, connections)
                .expect("open PgStore");
            TestStore {
                store,
                backend: Backend::Postgres,
                location,
                guard: TestGuard::Postgres(db),
            }
        }
        None => {
            let dir = tempfile::tempdir().expect("temp dir");
            let location = dir
                .path()
                .join(crate::sqlite::DB_FILE_NAME)
                .display()
                .to_string();
            let store = open_sized(Backend::Sqlite, &location, indexer, connections)
                .expect("open SqliteStore");
            TestStore {
                store,
                backend: Backend::Sqlite,
                location,
                guard: TestGuard::Sqlite(dir),
            }
        }
    }
}

/// `n` lowercase letters from `seed` that neither repeat nor compress: long test values that
/// PostgreSQL's compression of long values and index rows cannot shrink.
pub fn incompressible_letters(seed: u64, n: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced_and_query_kept() {
        assert_eq!(
            with_database("postgres://u:p@h:5/postgres?sslmode=require", "fh_1"),
            "postgres://u:p@h:5/fh_1?sslmode=require"
        );
        assert_eq!(with_database("postgres://h:5", "x"), "postgres://h:5/x");
        assert_eq!(with_database("postgres://h/db", "x"), "postgres://h/x");
    }
}

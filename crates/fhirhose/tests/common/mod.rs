//! What the binary tests share: the `fhirhose` command with a clean environment (the rest of
//! the harness — free ports, a started `serve`, destinations — is the `test-support` crate's),
//! and the database of one test: the data directory's
//! SQLite file, or, with `FHIRHOSE_TEST_DATABASE` set (`scripts/test.sh`'s PostgreSQL pass), a
//! PostgreSQL database of the test's own ([`store::testing::fresh_database`]), dropped with the
//! guard.
#![allow(dead_code)] // each test file uses a part

use std::path::Path;
use std::process::{Command, Stdio};

#[allow(unused_imports)]
pub use test_support::process::{Serve, free_port, wait_until_answering};

/// The binary under test. The tests pass every setting as a flag: nothing from the caller's
/// environment (`FHIRHOSE_*`) may leak in.
pub fn fhirhose() -> Command {
    test_support::process::clean_command(env!("CARGO_BIN_EXE_fhirhose"))
}

/// The database the `fhirhose` commands of one test share.
pub struct TestDb(Option<store::testing::TestDatabase>);

impl TestDb {
    /// SQLite, or a fresh PostgreSQL database when `FHIRHOSE_TEST_DATABASE` is set.
    pub fn fresh() -> TestDb {
        TestDb(
            store::testing::test_database_url()
                .map(|base| store::testing::fresh_database(&base).expect("create a test database")),
        )
    }

    /// The PostgreSQL database, when the test runs on PostgreSQL.
    pub fn postgres(&self) -> Option<&store::testing::TestDatabase> {
        self.0.as_ref()
    }

    pub fn is_postgres(&self) -> bool {
        self.0.is_some()
    }

    /// `c` pointed at this database (`FHIRHOSE_DATABASE`; nothing for SQLite, whose file is in
    /// the data directory).
    pub fn apply<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        match &self.0 {
            Some(db) => c.env("FHIRHOSE_DATABASE", &db.url),
            None => c,
        }
    }
}

/// `fhirhose serve` of `data_dir` on a free port of 127.0.0.1, with `db`'s database when given
/// and the `extra` flags, answering; its errors on the test's stderr; killed when dropped.
pub fn serve(data_dir: &Path, db: Option<&TestDb>, extra: &[&str]) -> Serve {
    serve_on(free_port(), data_dir, db, extra)
}

/// [`serve`] on `port` (a restarted server keeps its address).
pub fn serve_on(port: u16, data_dir: &Path, db: Option<&TestDb>, extra: &[&str]) -> Serve {
    let mut cmd = fhirhose();
    if let Some(db) = db {
        db.apply(&mut cmd);
    }
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(data_dir)
    .args(extra)
    .env("FHIRHOSE_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    Serve::start(&mut cmd, port, None).unwrap_or_else(|e| panic!("{e}"))
}

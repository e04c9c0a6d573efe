//! What the binary tests share: the `fhirhose` command with a clean environment, a free port,
//! waiting for a started `serve` to answer, and the database of one test: the data directory's
//! SQLite file, or, with `FHIRHOSE_TEST_DATABASE` set (`scripts/test.sh`'s PostgreSQL pass), a
//! PostgreSQL database of the test's own ([`store::testing::fresh_database`]), dropped with the
//! guard.
#![allow(dead_code)] // each test file uses a part

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::Duration;

/// The binary under test. The tests pass every setting as a flag: nothing from the caller's
/// environment (`FHIRHOSE_*`) may leak in.
pub fn fhirhose() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhirhose"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRHOSE_") {
            c.env_remove(k);
        }
    }
    c
}

/// A port nothing listens on now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits (at most 60 s) until the `serve` process `child` answers `GET {base}/metadata`; panics
/// when it exits first or never answers.
pub fn wait_until_answering(child: &mut Child, base: &str) {
    let client = reqwest::blocking::Client::new();
    for _ in 0..600 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("fhirhose serve exited early: {status}");
        }
        if client
            .get(format!("{base}/metadata"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("fhirhose serve did not answer on {base}");
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

//! What the binary tests share: the `fhirhose` command with a clean environment (the rest of
//! the harness — free ports, a started `serve`, destinations — is the `test-support` crate's),
//! and the database of one test: the data directory's
//! SQLite file, or, with `FHIRHOSE_TEST_DATABASE` set (`scripts/test.sh`'s PostgreSQL pass), a
//! PostgreSQL database of the test's own ([`store::testing::fresh_database`]), dropped with the
//! guard.
#![allow(dead_code)] // each test file uses a part

use std::process::Command;

#[allow(unused_imports)]
pub use test_support::process::{free_port, wait_until_answering};

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

//! The statements a pooled connection prepared, kept for its next calls: a statement given as
//! SQL text is prepared (Parse/Describe, a round trip) the first time the connection runs it,
//! and later runs only bind and execute it (one round trip instead of two to three: the
//! `postgres` crate otherwise prepares, runs and closes a text statement on every call).
//!
//! [`Conn`] is a pooled connection with its [`StatementCache`]; [`Tx`] is a transaction on one,
//! using the same cache (a statement prepared outside a transaction runs inside one and the
//! other way round: protocol-level prepared statements belong to the session, not to the
//! transaction). Both implement [`Session`], whose `query`/`query_one`/`query_opt`/`execute`
//! go through the cache; everything else reaches the driver's client unchanged
//! ([`Session::raw`]).
//!
//! Bounded: at most [`STATEMENTS_PER_CONNECTION`] statements per connection, the least recently
//! used one closed when a new one needs the room. The search planner's SQL varies with the
//! query's shape, so a client sending ever new shapes costs evictions, never memory.
//!
//! Schema changes: PostgreSQL re-plans a prepared statement by itself when a table it reads is
//! altered, dropped or renamed (the reindex's table swap), but refuses to run one whose result
//! columns changed (`0A000 cached plan must not change result type`), and a statement the
//! session lost (`26000`) cannot run. On either error every connection of the pool forgets its
//! statements (the schema changed for all; the pool's shared epoch moves on) and a statement run
//! outside a transaction is prepared and run once more, which is safe: the error comes before
//! the statement does anything. Inside a transaction the error ends the transaction (it is
//! aborted); the caller's next attempt prepares afresh. The store's own schema changes
//! (migrations, the reindex swap) move the epoch on as well ([`StatementCache::forget_everywhere`]).
//! A connection the pool drops takes its cache with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::postgres::error::SqlState;
use ::postgres::types::{ToSql, Type};
use ::postgres::{CancelToken, Client, Error, GenericClient, Row, Statement, Transaction};

/// Most statements one connection keeps prepared (least recently used evicted beyond).
pub(crate) const STATEMENTS_PER_CONNECTION: usize = 256;

/// The statements one connection prepared, by SQL text (see the module docs).
pub(crate) struct StatementCache {
    entries: HashMap<String, Entry>,
    /// Bumped on every use; an entry's `used` says how recently it served.
    tick: u64,
    capacity: usize,
    /// The pool's schema epoch this cache's entries were prepared under.
    epoch: u64,
    shared_epoch: Arc<AtomicU64>,
    /// Statements prepared by this connection (hits cost none): for tests and logs.
    prepared: u64,
}

struct Entry {
    statement: Statement,
    used: u64,
}

impl StatementCache {
    pub(crate) fn new(shared_epoch: Arc<AtomicU64>, capacity: usize) -> StatementCache {
        StatementCache {
            entries: HashMap::new(),
            tick: 0,
            capacity: capacity.max(1),
            epoch: shared_epoch.load(Ordering::Acquire),
            shared_epoch,
            prepared: 0,
        }
    }

    /// Statements held now.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Statements this connection prepared so far (a cache hit prepares none).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn prepared(&self) -> u64 {
        self.prepared
    }

    /// Make every connection sharing this cache's epoch forget its statements (this one now,
    /// the others at their next statement).
    pub(crate) fn forget_everywhere(&mut self) {
        self.shared_epoch.fetch_add(1, Ordering::AcqRel);
        self.sync_epoch();
    }

    fn sync_epoch(&mut self) {
        let now = self.shared_epoch.load(Ordering::Acquire);
        if now != self.epoch {
            // Dropping a `Statement` closes it on the server (sent with the next message).
            self.entries.clear();
            self.epoch = now;
        }
    }

    /// The statement for `sql` (with the parameter `types` given, or all inferred when empty),
    /// prepared on `client` unless this connection has it already.
    fn statement(
        &mut self,
        client: &mut impl GenericClient,
        sql: &str,
        types: &[Type],
    ) -> Result<Statement, Error> {
        self.sync_epoch();
        self.tick += 1;
        let typed_key;
        let key = if types.is_empty() {
            sql
        } else {
            // The same text prepared with other parameter types is another statement.
            let mut k = String::with_capacity(sql.len() + 8 * types.len());
            k.push_str(sql);
            for t in types {
                k.push('\0');
                k.push_str(&t.oid().to_string());
            }
            typed_key = k;
            typed_key.as_str()
        };
        if let Some(entry) = self.entries.get_mut(key) {
            entry.used = self.tick;
            return Ok(entry.statement.clone());
        }
        let statement = if types.is_empty() {
            client.prepare(sql)?
        } else {
            client.prepare_typed(sql, types)?
        };
        self.prepared += 1;
        if self.entries.len() >= self.capacity
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        self.entries.insert(
            key.to_string(),
            Entry {
                statement: statement.clone(),
                used: self.tick,
            },
        );
        Ok(statement)
    }
}

/// Whether `e` says a prepared statement can no longer run as prepared (see the module docs).
pub(crate) fn is_stale_statement(e: &Error) -> bool {
    match e.code() {
        Some(c) if *c == SqlState::INVALID_SQL_STATEMENT_NAME => true,
        Some(c) if *c == SqlState::FEATURE_NOT_SUPPORTED => e.as_db_error().is_some_and(|d| {
            d.message()
                .contains("cached plan must not change result type")
        }),
        _ => false,
    }
}

/// A connection or a transaction whose text statements go through the connection's
/// [`StatementCache`] (see the module docs).
pub(crate) trait Session {
    /// The driver's client or transaction underneath.
    type Raw: GenericClient;

    /// The driver's client or transaction and the connection's cache.
    fn parts(&mut self) -> (&mut Self::Raw, &mut StatementCache);

    /// Statements run inside an open transaction: a failed one aborts it, so none runs twice.
    const IN_TRANSACTION: bool;

    /// The driver's client or transaction, for what bypasses the cache (`batch_execute`, typed
    /// statements, `COPY`).
    fn raw(&mut self) -> &mut Self::Raw {
        self.parts().0
    }

    /// The cached statement for `sql` (parameter types inferred), for a caller that runs it
    /// on [`Session::raw`] itself: a `COPY` (no result columns to go stale) or a streamed
    /// scan, which hands its run's error to [`Session::forget_if_stale`].
    fn prepared(&mut self, sql: &str) -> Result<Statement, Error> {
        let (client, cache) = self.parts();
        cache.statement(client, sql, &[])
    }

    /// After `e` from running a cached statement: when it says the statement went stale,
    /// every connection of the pool forgets its statements (see the module docs).
    fn forget_if_stale(&mut self, e: &Error) {
        if is_stale_statement(e) {
            tracing::info!(error = %e, "a prepared statement no longer fits the schema; every pooled connection prepares its statements again");
            self.parts().1.forget_everywhere();
        }
    }

    /// Runs `run` with the cached statement for `sql` (`types` as in
    /// [`Session::prepared_typed`]); a stale statement is handled as the module docs say.
    fn with_statement<T>(
        &mut self,
        sql: &str,
        types: &[Type],
        mut run: impl FnMut(&mut Self::Raw, &Statement) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let (client, cache) = self.parts();
        let statement = cache.statement(client, sql, types)?;
        match run(client, &statement) {
            Err(e) if is_stale_statement(&e) => {
                drop(statement);
                cache.forget_everywhere();
                tracing::info!(error = %e, in_transaction = Self::IN_TRANSACTION, "a prepared statement no longer fits the schema; every pooled connection prepares its statements again");
                if Self::IN_TRANSACTION {
                    return Err(e);
                }
                let statement = cache.statement(client, sql, types)?;
                run(client, &statement)
            }
            other => other,
        }
    }

    /// [`GenericClient::query`] through the cache.
    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        self.with_statement(sql, &[], |c, s| c.query(s, params))
    }

    /// [`GenericClient::query_one`] through the cache.
    fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error> {
        self.with_statement(sql, &[], |c, s| c.query_one(s, params))
    }

    /// [`GenericClient::query_opt`] through the cache.
    fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        self.with_statement(sql, &[], |c, s| c.query_opt(s, params))
    }

    /// [`GenericClient::execute`] through the cache.
    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
        self.with_statement(sql, &[], |c, s| c.execute(s, params))
    }

    /// [`GenericClient::batch_execute`] (simple query protocol: nothing to cache).
    fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        self.raw().batch_execute(sql)
    }

    /// [`GenericClient::query_typed_one`].
    fn query_typed_one(
        &mut self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, Error> {
        self.raw().query_typed_one(sql, params)
    }

    /// [`GenericClient::query_typed_opt`].
    fn query_typed_opt(
        &mut self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<Row>, Error> {
        self.raw().query_typed_opt(sql, params)
    }

    /// [`GenericClient::execute_typed`].
    fn execute_typed(
        &mut self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Error> {
        self.raw().execute_typed(sql, params)
    }
}

/// A pooled connection: the driver's client and the statements it prepared.
pub(crate) struct Conn {
    client: Client,
    statements: StatementCache,
}

impl Conn {
    pub(crate) fn new(client: Client, shared_epoch: Arc<AtomicU64>) -> Conn {
        Conn {
            client,
            statements: StatementCache::new(shared_epoch, STATEMENTS_PER_CONNECTION),
        }
    }

    /// A connection outside any pool (a helper of its own): its cache is its alone.
    pub(crate) fn unpooled(client: Client) -> Conn {
        Conn::new(client, Arc::new(AtomicU64::new(0)))
    }

    /// Opens a transaction whose statements use this connection's cache.
    pub(crate) fn transaction(&mut self) -> Result<Tx<'_>, Error> {
        Ok(Tx {
            tx: self.client.transaction()?,
            statements: &mut self.statements,
        })
    }

    /// This connection's statement cache.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn statements(&self) -> &StatementCache {
        &self.statements
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub(crate) fn is_valid(&mut self, timeout: Duration) -> Result<(), Error> {
        self.client.is_valid(timeout)
    }

    pub(crate) fn cancel_token(&self) -> CancelToken {
        self.client.cancel_token()
    }
}

impl Session for Conn {
    type Raw = Client;
    const IN_TRANSACTION: bool = false;

    fn parts(&mut self) -> (&mut Client, &mut StatementCache) {
        (&mut self.client, &mut self.statements)
    }
}

/// A transaction on a [`Conn`], using its statement cache.
pub(crate) struct Tx<'a> {
    tx: Transaction<'a>,
    statements: &'a mut StatementCache,
}

impl Tx<'_> {
    /// Commits the transaction.
    pub(crate) fn commit(self) -> Result<(), Error> {
        self.tx.commit()
    }
}

impl<'a> Session for Tx<'a> {
    type Raw = Transaction<'a>;
    const IN_TRANSACTION: bool = true;

    fn parts(&mut self) -> (&mut Transaction<'a>, &mut StatementCache) {
        (&mut self.tx, self.statements)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ::postgres::SimpleQueryMessage;

    use super::{Conn, STATEMENTS_PER_CONNECTION, Session};
    use crate::postgres::{Pool, Target};

    /// A pool of `size` connections on the test cluster (`FHIRHOSE_TEST_DATABASE` or
    /// `FHIRHOSE_TEST_POSTGRES`); `None` (skipped) without one.
    fn pool(test: &str, size: usize) -> Option<Pool> {
        let url = ["FHIRHOSE_TEST_DATABASE", "FHIRHOSE_TEST_POSTGRES"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|u| !u.trim().is_empty()));
        let Some(url) = url else {
            if std::env::var("FHIRHOSE_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
                panic!("{test} needs FHIRHOSE_TEST_DATABASE or FHIRHOSE_TEST_POSTGRES");
            }
            eprintln!("{test}: skipped, no PostgreSQL cluster named");
            return None;
        };
        let target = Target::parse(&url, Duration::from_secs(10)).expect("test cluster URL");
        Some(Pool::new(target, size))
    }

    /// The named prepared statements the server holds for `c`'s session (asked with the
    /// simple query protocol, which prepares none).
    fn on_server(c: &mut Conn) -> i64 {
        c.raw()
            .simple_query("SELECT count(*) FROM pg_prepared_statements")
            .unwrap()
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                _ => None,
            })
            .unwrap()
    }

    fn sum(c: &mut impl Session, sql: &str, x: i64) -> i64 {
        c.query_one(sql, &[&x]).unwrap().get(0)
    }

    /// A statement is prepared the first time a connection runs it and only bound and run
    /// afterwards, inside transactions too (and one prepared in a transaction rolled back stays
    /// usable); however many statements a connection is given (a client sending ever new search
    /// shapes), it keeps at most STATEMENTS_PER_CONNECTION, on its side and on the server's,
    /// the least recently used evicted first.
    #[test]
    fn statements_are_prepared_once_per_connection_and_at_most_the_cap_are_kept() {
        let Some(pool) = pool("statements_are_prepared_once_per_connection", 1) else {
            return;
        };
        let mut conn = pool.get().unwrap();
        let c = conn.client();
        const ADD_ONE: &str = "SELECT $1::bigint + 1";
        for x in 0..5 {
            assert_eq!(sum(c, ADD_ONE, x), x + 1);
        }
        assert_eq!(c.statements().prepared(), 1);
        assert_eq!(on_server(c), 1);

        let mut tx = c.transaction().unwrap();
        assert_eq!(sum(&mut tx, ADD_ONE, 1), 2);
        const ADD_TWO: &str = "SELECT $1::bigint + 2";
        assert_eq!(sum(&mut tx, ADD_TWO, 1), 3);
        drop(tx); // rolled back
        assert_eq!(sum(c, ADD_TWO, 2), 4);
        assert_eq!(
            c.statements().prepared(),
            2,
            "prepared again after the rollback"
        );

        const HOT: &str = "SELECT $1::bigint * 2";
        for i in 0..3 * STATEMENTS_PER_CONNECTION as i64 {
            let one_off = format!("SELECT {i}::bigint + $1");
            assert_eq!(sum(c, &one_off, 1), i + 1);
            if i % 16 == 0 {
                assert_eq!(sum(c, HOT, i), 2 * i);
            }
        }
        assert_eq!(c.statements().len(), STATEMENTS_PER_CONNECTION);
        assert!(
            on_server(c) <= STATEMENTS_PER_CONNECTION as i64,
            "the server holds {} statements of this session",
            on_server(c)
        );
        let prepared = c.statements().prepared();
        assert_eq!(sum(c, HOT, 3), 6);
        assert_eq!(
            c.statements().prepared(),
            prepared,
            "the hot statement stayed"
        );
        assert_eq!(sum(c, ADD_ONE, 3), 4);
        assert_eq!(
            c.statements().prepared(),
            prepared + 1,
            "the least recently used one went"
        );
    }

    /// A table's columns change under a cached `SELECT *` (PostgreSQL refuses to run the old
    /// statement: `cached plan must not change result type`): outside a transaction the
    /// statement is prepared again and runs; inside one the transaction fails once and the
    /// next attempt prepares afresh. Every connection of the pool forgets its statements.
    #[test]
    fn a_statement_whose_result_columns_changed_is_prepared_again() {
        let Some(pool) = pool("a_statement_whose_result_columns_changed", 2) else {
            return;
        };
        let mut a = pool.get().unwrap();
        let mut b = pool.get().unwrap();
        let (a, b) = (a.client(), b.client());
        a.batch_execute("CREATE TEMP TABLE t(x bigint); INSERT INTO t VALUES (1)")
            .unwrap();
        const ALL: &str = "SELECT * FROM t";
        assert_eq!(a.query(ALL, &[]).unwrap()[0].len(), 1);
        assert_eq!(sum(b, "SELECT $1::bigint", 7), 7);
        assert_eq!(b.statements().prepared(), 1);

        a.batch_execute("ALTER TABLE t ADD COLUMN y bigint DEFAULT 2")
            .unwrap();
        let rows = a.query(ALL, &[]).expect("prepared again after the change");
        assert_eq!((rows[0].len(), rows[0].get::<_, i64>(1)), (2, 2));
        assert_eq!(a.statements().prepared(), 2);
        // The other connection forgot its statements too.
        assert_eq!(sum(b, "SELECT $1::bigint", 7), 7);
        assert_eq!(b.statements().prepared(), 2);

        a.batch_execute("ALTER TABLE t ADD COLUMN z bigint DEFAULT 3")
            .unwrap();
        let mut tx = a.transaction().unwrap();
        let e = tx.query(ALL, &[]).unwrap_err();
        assert!(super::is_stale_statement(&e), "{e}");
        drop(tx);
        let mut tx = a.transaction().unwrap();
        assert_eq!(tx.query(ALL, &[]).unwrap()[0].len(), 3);
        tx.commit().unwrap();
    }
}

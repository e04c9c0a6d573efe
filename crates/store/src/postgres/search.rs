//! [`crate::Store::search`] on PostgreSQL: the shared plan translation ([`crate::sql_plan`]) with
//! PostgreSQL's dialect, all statements of one search on one pooled connection.
//!
//! Stop check: asked before every statement, and while a statement runs a watcher thread asks it
//! every few milliseconds and cancels the running statement through the connection's cancel
//! token (the server answers `57014 query_canceled`, the connection stays usable) — the
//! counterpart of SQLite's progress handler.
//!
//! Parameters are written as `$n` and prepared with the types of their values (a statement may
//! bind a parameter it does not use — the driving filter's own condition is left out of the
//! keyset page — whose type the server could not infer).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::statements::{Conn, Session};
use ::postgres::types::{ToSql, Type};

use super::PgStore;
use super::watermark::seq_at_or_after;
use crate::StoreError;
use crate::plan::{SearchPlan, SearchRows, StopCheck};
use crate::sql_plan::{self, Dialect, SearchBackend, SqlCell, SqlParam};

/// How many ANDed filters of a search PostgreSQL may plan as joins ([`Dialect::joined_filters`]).
const JOINED_FILTERS: usize = 4;

/// How often the watcher asks the stop check while a statement runs.
const STOP_POLL: Duration = Duration::from_millis(10);

struct PgDialect;

impl Dialect for PgDialect {
    fn placeholder(&self, n: usize, _p: &SqlParam) -> String {
        format!("${n}")
    }

    fn no_index(&self) -> &'static str {
        ""
    }

    fn bool(&self, b: bool) -> &'static str {
        if b { "TRUE" } else { "FALSE" }
    }

    fn contains(&self, hay: &str, needle: &str) -> String {
        format!("strpos({hay}, {needle}) > 0")
    }

    fn max_text(&self) -> &'static str {
        // U+10FFFF: the largest character, last in the C collation of the text columns.
        "chr(1114111)"
    }

    fn url_has_type(&self, resource_type: &str) -> (&'static str, String) {
        // Type names are letters only: nothing to escape for LIKE.
        ("LIKE", format!("%/{resource_type}/%"))
    }

    fn distinct_page(&self, cols: &str, from: &str, cond: &str, key: &str, limit: &str) -> String {
        format!(
            "SELECT DISTINCT ON ({key}) {cols} FROM {from} WHERE {cond} ORDER BY {key} LIMIT {limit}"
        )
    }

    fn key_lookup(&self, select: &str, table: &str, k: &str, cond: &str) -> String {
        // PostgreSQL has no per-column hint like SQLite's `+`. Without statistics (after a
        // load or a large transaction, until autovacuum's ANALYZE) it turned `min(col)` into a
        // scan of the value index `(type_no, param, col, k)` in `col` order with `k` as a mere
        // filter: every row of the parameter, per resource (an 8-key `_sort` of 5,000 Patients
        // ran 54 s instead of 0.6 s). The `OFFSET 0` subquery is planned on its own, with
        // `k = …` as its only condition: it reads the `(k)` index.
        format!(
            "SELECT {select} FROM (SELECT * FROM {table} WHERE k = {k} OFFSET 0) AS {table} WHERE {cond}"
        )
    }

    fn joined_filters(&self) -> Option<usize> {
        // The planning time of n semi-joins grows steeply (8: ~90 ms, 16: ~460 ms, 120: 14 s
        // and more); four leave the planner its choice of a driving filter.
        Some(JOINED_FILTERS)
    }

    fn opaque(&self, cond: &str) -> String {
        // PostgreSQL pulls up only a sublink that is itself an ANDed condition: under
        // `IS TRUE` it stays a (hashed) subplan, run once, probed per row.
        format!("({cond}) IS TRUE")
    }
}

struct Backend<'a> {
    store: &'a PgStore,
    client: RefCell<&'a mut Conn>,
    stop: Option<&'a StopCheck>,
}

fn param_type(p: &SqlParam) -> Type {
    match p {
        SqlParam::Int(_) => Type::INT8,
        SqlParam::Real(_) => Type::FLOAT8,
        SqlParam::Text(_) | SqlParam::Null => Type::TEXT,
    }
}

/// A parameter in the type the statement has for it.
fn bind(p: &SqlParam, ty: &Type) -> Result<Box<dyn ToSql + Sync>, StoreError> {
    let mismatch = || {
        StoreError::InvalidPlan(format!(
            "search parameter {p:?} does not fit the type {ty} of its place"
        ))
    };
    Ok(match (p, ty) {
        (SqlParam::Int(i), t) if *t == Type::INT8 => Box::new(*i),
        (SqlParam::Int(i), t) if *t == Type::INT4 => {
            Box::new(i32::try_from(*i).map_err(|_| mismatch())?)
        }
        (SqlParam::Int(i), t) if *t == Type::FLOAT8 => Box::new(*i as f64),
        (SqlParam::Real(f), t) if *t == Type::FLOAT8 => Box::new(*f),
        (SqlParam::Text(s), t) if *t == Type::TEXT || *t == Type::VARCHAR => Box::new(s.clone()),
        (SqlParam::Null, t) if *t == Type::INT8 => Box::new(None::<i64>),
        (SqlParam::Null, t) if *t == Type::FLOAT8 => Box::new(None::<f64>),
        (SqlParam::Null, _) => Box::new(None::<String>),
        _ => return Err(mismatch()),
    })
}

fn cell(row: &::postgres::Row, i: usize) -> Result<SqlCell, StoreError> {
    let ty = row.columns()[i].type_();
    Ok(if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?
            .map_or(SqlCell::Null, SqlCell::Int)
    } else if *ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)?
            .map_or(SqlCell::Null, |v| SqlCell::Int(v.into()))
    } else if *ty == Type::FLOAT8 {
        row.try_get::<_, Option<f64>>(i)?
            .map_or(SqlCell::Null, SqlCell::Real)
    } else if *ty == Type::BYTEA {
        row.try_get::<_, Option<Vec<u8>>>(i)?
            .map_or(SqlCell::Null, SqlCell::Blob)
    } else {
        row.try_get::<_, Option<String>>(i)?
            .map_or(SqlCell::Null, SqlCell::Text)
    })
}

/// A cancelled statement is [`StoreError::Cancelled`]; one beyond the server's limits (too deep
/// an expression, too many parameters) is [`StoreError::QueryTooLarge`]; the rest stay
/// [`StoreError::Postgres`] (so that the pool sees a lost connection).
fn classify(e: ::postgres::Error) -> StoreError {
    if let Some(code) = e.code() {
        match code.code() {
            "57014" => return StoreError::Cancelled,
            // program_limit_exceeded, statement_too_complex, too_many_columns...
            c if c.starts_with("54") => {
                tracing::info!(error = %e, "search refused: too large for one SQL statement");
                return StoreError::QueryTooLarge(c.to_string());
            }
            _ => {}
        }
    }
    StoreError::Postgres(e)
}

impl Backend<'_> {
    fn stopped(&self) -> bool {
        self.stop.is_some_and(|s| s())
    }

    /// Runs `sql` as the connection's cached statement (prepared with the types of `params`
    /// the first time this connection runs it; see `statements`), whatever `cached` says: the
    /// page statement of a search shape run again by the next request is worth keeping too,
    /// and the cache is bounded.
    fn run_statement(
        &self,
        client: &mut Conn,
        sql: &str,
        params: &[SqlParam],
    ) -> Result<Vec<Vec<SqlCell>>, StoreError> {
        let types: Vec<Type> = params.iter().map(param_type).collect();
        let rows = client
            .with_statement(sql, &types, |c, stmt| {
                // Inner: this store's own refusals; outer: the database's errors (a stale
                // statement among them, which `with_statement` handles).
                let types = stmt.params();
                if types.len() != params.len() {
                    return Ok(Err(StoreError::InvalidPlan(format!(
                        "{} parameters for {} places",
                        params.len(),
                        types.len()
                    ))));
                }
                let bound = match params
                    .iter()
                    .zip(types)
                    .map(|(p, t)| bind(p, t))
                    .collect::<Result<Vec<_>, _>>()
                {
                    Ok(b) => b,
                    Err(e) => return Ok(Err(e)),
                };
                let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| &**b).collect();
                c.query(stmt, &refs).map(Ok)
            })
            .map_err(classify)??;
        rows.iter()
            .map(|r| (0..r.len()).map(|i| cell(r, i)).collect())
            .collect()
    }
}

impl SearchBackend for Backend<'_> {
    fn dialect(&self) -> &dyn Dialect {
        &PgDialect
    }

    fn type_no(&self, resource_type: &str) -> Result<Option<i64>, StoreError> {
        // On this search's connection: the pool may have no other one free.
        let mut client = self.client.borrow_mut();
        self.store.lookup_type(&mut **client, resource_type)
    }

    fn param_no(&self, code: &str) -> Result<Option<i64>, StoreError> {
        let mut client = self.client.borrow_mut();
        self.store.lookup_param(&mut **client, code)
    }

    fn seq_at_or_after(&self, instant_ms: i64) -> Result<i64, StoreError> {
        let mut client = self.client.borrow_mut();
        seq_at_or_after(&mut **client, instant_ms)
    }

    fn query(
        &self,
        sql: &str,
        params: &[SqlParam],
        _cached: bool,
    ) -> Result<Vec<Vec<SqlCell>>, StoreError> {
        if self.stopped() {
            return Err(StoreError::Cancelled);
        }
        let mut client = self.client.borrow_mut();
        let Some(stop) = self.stop else {
            return self.run_statement(&mut client, sql, params);
        };
        // The watcher cancels the statement when the stop check says so; it ends as soon as
        // the statement does (the sender is dropped).
        let token = client.cancel_token();
        let fired = AtomicBool::new(false);
        let (done, finished) = mpsc::channel::<()>();
        let result = std::thread::scope(|s| {
            let fired = &fired;
            let token = &token;
            let target = &self.store.pool.target;
            s.spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(STOP_POLL) {
                    if stop() {
                        fired.store(true, Ordering::Relaxed);
                        let cancelled = target
                            .tls()
                            .and_then(|tls| token.cancel_query(tls).map_err(StoreError::from));
                        if let Err(e) = cancelled {
                            tracing::warn!(error = %e, "could not cancel a search statement");
                        }
                        return;
                    }
                }
            });
            let result = self.run_statement(&mut client, sql, params);
            drop(done);
            result
        });
        // After the scope: the watcher has ended, so `fired` is final.
        // The watcher sent a cancel (the time limit passed or the client went away): the
        // search stops here even when the statement ended first, and the connection is not
        // reused (the pool closes it on `Cancelled`): a cancel that reaches the server late
        // would stop whatever statement runs next on it.
        if fired.load(Ordering::Relaxed) {
            if let Err(e) = &result
                && !matches!(e, StoreError::Cancelled)
            {
                tracing::debug!(error = %e, "search statement failed while being cancelled");
            }
            return Err(StoreError::Cancelled);
        }
        result
    }
}

/// See [`crate::Store::search`].
pub(super) fn search(
    store: &PgStore,
    plan: &SearchPlan,
    stop: Option<&StopCheck>,
) -> Result<SearchRows, StoreError> {
    if stop.is_some_and(|s| s()) {
        return Err(StoreError::Cancelled);
    }
    store.pool.read(|client| {
        let backend = Backend {
            store,
            client: RefCell::new(client),
            stop,
        };
        sql_plan::run(&backend, plan)
    })
}

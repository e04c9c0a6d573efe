//! Schema changes, each under the migration advisory lock: applying the [`MIGRATIONS`](super::MIGRATIONS)
//! a database lacks, and building the value and `k` indexes of the index tables (on two
//! connections at once, with the build settings restored afterwards).

use std::sync::Mutex;

use super::statements::{Conn, Session};

use crate::StoreError;

use super::target::{Target, describe, is_connection_error};
use super::{BUILD_LOCK, MIGRATION_LOCK, MIGRATIONS};
use crate::index_tables::{INDEX_TABLES, VALUE_INDEXES};

/// Run `f` holding the session advisory lock [`MIGRATION_LOCK`] (schema changes: migrations and
/// the value indexes), so that several processes starting at once do each change once.
pub(super) fn with_schema_lock<T>(
    client: &mut Conn,
    f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let result = f(client);
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    let value = result?;
    unlocked?;
    Ok(value)
}

/// Apply the [`MIGRATIONS`] this database lacks (call under [`with_schema_lock`]). Refuses a
/// database migrated by a newer version.
pub(super) fn migrate(client: &mut Conn) -> Result<usize, StoreError> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations(
           version bigint PRIMARY KEY,
           description text NOT NULL,
           applied_at timestamptz NOT NULL DEFAULT now())",
    )?;
    let done: Vec<i64> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(&newest) = done.last()
        && newest > known
    {
        return Err(StoreError::Corrupt(format!(
            "database schema version {newest}, this build knows versions up to {known}"
        )));
    }
    let mut n = 0;
    for (version, description, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let mut tx = client.transaction()?;
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations(version, description) VALUES ($1, $2)",
            &[version, description],
        )?;
        tx.commit()?;
        tracing::info!(version, description, "applied a database migration");
        n += 1;
    }
    Ok(n)
}

/// The columns of `resource_versions` that ANALYZE samples (all but `json`).
pub(super) const RV_ANALYZE_COLUMNS: &str =
    "k, seq, type_no, id, version, last_updated, method, deleted, superseded_seq";

/// The statistics target of the ANALYZE after a bulk load (PostgreSQL's default is 100: a
/// sample of 30,000 rows per table and 100 most common values per column). 20 samples 6,000
/// rows, enough for the plans' choices between the value indexes, at a quarter of the time
/// (about 0.9 s of 3.1 s for Synthea-100); autovacuum analyses again at the default as the
/// tables change.
pub(super) const LOAD_STATISTICS_TARGET: u32 = 20;

/// Session settings for building indexes: sorting a large index gets memory and parallel workers.
pub(super) const BUILD_SETTINGS: &str =
    "SET maintenance_work_mem = '512MB'; SET max_parallel_maintenance_workers = 4";

/// Undoes [`BUILD_SETTINGS`].
pub(super) const BUILD_RESET: &str =
    "RESET maintenance_work_mem; RESET max_parallel_maintenance_workers";

/// Run `statements` (each on its own, in no particular order) on `client` and on a second
/// connection opened for the purpose, each taking the next statement when it has finished one;
/// with `build`, both use [`BUILD_SETTINGS`] meanwhile. Without a second connection everything
/// runs on `client`.
///
/// A build (`build`) first waits until no session of a dead process is still building: a
/// loader killed with -9 leaves its server sessions running their `CREATE INDEX` to the end (a
/// backend notices a vanished client only when it next talks to it), and a new `CREATE INDEX IF
/// NOT EXISTS` of the same name would race it and fail on the catalog's unique name. Every
/// build session holds [`BUILD_LOCK`] shared, so taking it exclusively once waits for them; the
/// caller holds the schema lock, so no live process starts a build meanwhile. Build sessions
/// also ask the server to check for a vanished client every second (PostgreSQL 14 and later),
/// so such a session stops early.
pub(super) fn run_on_two_connections(
    target: &Target,
    client: &mut Conn,
    statements: Vec<String>,
    build: bool,
) -> Result<usize, StoreError> {
    let n = statements.len();
    if n == 0 {
        return Ok(0);
    }
    if build {
        client.execute("SELECT pg_advisory_lock($1)", &[&BUILD_LOCK])?;
        client.execute("SELECT pg_advisory_unlock($1)", &[&BUILD_LOCK])?;
    }
    let queue = Mutex::new(statements.into_iter());
    let run_all = |c: &mut Conn| -> Result<(), StoreError> {
        loop {
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some(sql) = next else { break };
            c.batch_execute(&sql)?;
        }
        Ok(())
    };
    let work = |c: &mut Conn| -> Result<(), StoreError> {
        if !build {
            return run_all(c);
        }
        c.batch_execute(BUILD_SETTINGS)?;
        let checks_client = c
            .query_one(
                "SELECT current_setting('server_version_num')::int >= 140000",
                &[],
            )?
            .get::<_, bool>(0);
        if checks_client {
            c.batch_execute("SET client_connection_check_interval = '1s'")?;
        }
        c.execute("SELECT pg_advisory_lock_shared($1)", &[&BUILD_LOCK])?;
        let built = run_all(c);
        // Unlocked on failure too: `client` goes back to the pool.
        let unlocked = c.execute("SELECT pg_advisory_unlock_shared($1)", &[&BUILD_LOCK]);
        built?;
        unlocked?;
        if checks_client {
            c.batch_execute("RESET client_connection_check_interval")?;
        }
        c.batch_execute(BUILD_RESET)?;
        Ok(())
    };
    let second = if n > 1 { target.connect().ok() } else { None };
    let (mine, theirs) = std::thread::scope(|scope| {
        let helper = second.map(|c| {
            let mut c = Conn::unpooled(c);
            let work = &work;
            scope.spawn(move || {
                work(&mut c).map_err(|e| match e {
                    StoreError::Postgres(e) if is_connection_error(&e) => {
                        target.unavailable(describe(&e))
                    }
                    e => e,
                })
            })
        });
        let mine = work(client);
        let theirs = helper.map_or(Ok(()), |h| {
            h.join().unwrap_or_else(|_| {
                Err(StoreError::Corrupt("an index build thread panicked".into()))
            })
        });
        (mine, theirs)
    });
    mine?;
    theirs?;
    Ok(n)
}

/// The names of the index tables' indexes that exist.
pub(super) fn present_indexes(client: &mut Conn) -> Result<Vec<String>, StoreError> {
    Ok(client
        .query(
            "SELECT indexname::text FROM pg_indexes
             WHERE schemaname = current_schema() AND indexname LIKE 'idx\\_%'",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The index tables' `k` indexes (schema version 1 creates them; a bulk load drops them with
/// the value indexes, see [`PgStore::suspend_index_upkeep`]): `(table, index name)`.
pub(super) fn k_indexes() -> impl Iterator<Item = (&'static str, String)> {
    INDEX_TABLES.iter().map(|t| (*t, format!("{t}_k")))
}

/// Create the [`VALUE_INDEXES`] and `k` indexes that are missing (two at a time); returns how
/// many were. A missing `k` index means a bulk load suspended index upkeep and may have left the
/// index rows of versions it superseded (their deletion waits for the `k` index, see
/// [`PgStore::write_in`]): they are deleted first, in one pass per table.
pub(super) fn build_value_indexes(target: &Target, client: &mut Conn) -> Result<usize, StoreError> {
    let present = present_indexes(client)?;
    let mut statements: Vec<String> = Vec::new();
    let missing_k = k_indexes().any(|(_, name)| !present.contains(&name));
    if missing_k {
        // The versions' statistics first: the ones a load finds may be from an autovacuum
        // ANALYZE taken before it superseded anything (`superseded_seq` all NULL), which makes
        // the planner expect one superseded version where there are tens of thousands. A sample
        // of the two columns the deletions read, at the load's statistics target: milliseconds.
        client.batch_execute(&format!(
            "SET default_statistics_target = {LOAD_STATISTICS_TARGET}; \
             ANALYZE resource_versions (k, superseded_seq); \
             RESET default_statistics_target"
        ))?;
    }
    for (table, name) in k_indexes() {
        if !present.contains(&name) {
            // Never a nested loop either: a plan that scanned the superseded versions once per
            // index row took over 14 minutes (122,616 rows against 38,971 versions, the fault
            // suite's reload after kill -9). A hash (or merge) join reads each side once.
            let mut tx = client.transaction()?;
            tx.batch_execute("SET LOCAL enable_nestloop = off")?;
            tx.execute(
                &format!(
                    "DELETE FROM {table} WHERE k IN
                     (SELECT k FROM resource_versions WHERE superseded_seq IS NOT NULL)"
                ),
                &[],
            )?;
            tx.commit()?;
            statements.push(format!("CREATE INDEX IF NOT EXISTS {name} ON {table}(k)"));
        }
    }
    statements.extend(
        VALUE_INDEXES
            .iter()
            .filter(|(name, _)| !present.iter().any(|p| p == name))
            .map(|(_, ddl)| ddl.to_string()),
    );
    run_on_two_connections(target, client, statements, true)
}

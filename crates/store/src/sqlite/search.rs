//! [`crate::Store::search`] on SQLite: the shared plan translation ([`crate::sql_plan`]) with
//! SQLite's dialect, run on pooled reader connections. A stop check becomes a progress handler
//! (SQLite asks it every thousand virtual-machine steps), so a long statement stops mid-way.

use rusqlite::types::Value as Sql;

use super::index_upkeep::{INDEX_ROW_BITS, index_key};
use super::{SqliteStore, is_interrupted};
use crate::StoreError;
use crate::ops::MAX_SEQ;
use crate::plan::{SearchPlan, SearchRows, StopCheck};
use crate::sql_plan::{self, Dialect, DrivenPage, SearchBackend, SqlCell, SqlParam};

struct SqliteDialect;

impl Dialect for SqliteDialect {
    fn placeholder(&self, n: usize, _p: &SqlParam) -> String {
        format!("?{n}")
    }

    fn no_index(&self) -> &'static str {
        "+"
    }

    fn version_rows(&self, table: &str, k: &str) -> String {
        // The rows of a version are one rowid range (`index_upkeep::INDEX_ROW_BITS`).
        format!(
            "{table}.rowid >= ((({k}) & {MAX_SEQ}) << {INDEX_ROW_BITS}) \
             AND {table}.rowid < (((({k}) & {MAX_SEQ}) + 1) << {INDEX_ROW_BITS})"
        )
    }

    fn index_key(&self, alias: &str) -> String {
        index_key(alias)
    }

    fn driven_row_cond(&self) -> bool {
        true
    }

    /// In rowid order, which is `k` order within the one type the driver's condition names
    /// (the rowid ends every value index entry, so an equality lookup reads its rows in that
    /// order and stops at `limit`, as with `k` in the index; grouping by an expression of the
    /// rowid would sort every match first). A version may have several matching rows, one
    /// after the other in its rowid range: only the first is taken, the one with no earlier
    /// matching row of its version, looked up in the version's rowid range of the table
    /// (`NOT INDEXED`: through the value index, a lookup of a value without its system would
    /// read every row of the value for each row of the page).
    fn driven_page(&self, page: &DrivenPage<'_>) -> String {
        let DrivenPage {
            cols,
            table,
            cond,
            row_cond,
            after,
            limit,
        } = page;
        let key = index_key("d.");
        let after = after
            .map(|a| format!(" AND d.rowid >= ((({a}) & {MAX_SEQ}) + 1) << {INDEX_ROW_BITS}"))
            .unwrap_or_default();
        let first = match row_cond {
            Some(e) => format!(
                " AND NOT EXISTS (SELECT 1 FROM {table} e NOT INDEXED \
                 WHERE e.rowid >= (d.rowid >> {INDEX_ROW_BITS}) << {INDEX_ROW_BITS} \
                 AND e.rowid < d.rowid AND {e})"
            ),
            None => String::new(),
        };
        format!(
            "SELECT {cols} FROM {table} d JOIN resource_versions rv ON rv.k = {key} \
             WHERE {cond}{after}{first} ORDER BY d.rowid LIMIT {limit}"
        )
    }

    fn token_system_numbers(&self) -> bool {
        true
    }

    fn bool(&self, b: bool) -> &'static str {
        if b { "1" } else { "0" }
    }

    fn contains(&self, hay: &str, needle: &str) -> String {
        format!("instr({hay}, {needle}) > 0")
    }

    fn max_text(&self) -> &'static str {
        "char(1114111)"
    }

    fn url_has_type(&self, resource_type: &str) -> (&'static str, String) {
        ("GLOB", format!("*/{resource_type}/*"))
    }

    fn distinct_page(&self, cols: &str, from: &str, cond: &str, key: &str, limit: &str) -> String {
        format!(
            "SELECT {cols} FROM {from} WHERE {cond} GROUP BY {key} ORDER BY {key} LIMIT {limit}"
        )
    }
}

struct Backend<'s> {
    store: &'s SqliteStore,
    stop: Option<&'s StopCheck>,
}

fn to_sql(p: &SqlParam) -> Sql {
    match p {
        SqlParam::Int(i) => Sql::Integer(*i),
        SqlParam::Real(f) => Sql::Real(*f),
        SqlParam::Text(t) => Sql::Text(t.clone()),
        SqlParam::Null => Sql::Null,
    }
}

fn to_cell(v: Sql) -> SqlCell {
    match v {
        Sql::Integer(i) => SqlCell::Int(i),
        Sql::Real(f) => SqlCell::Real(f),
        Sql::Text(t) => SqlCell::Text(t),
        Sql::Blob(b) => SqlCell::Blob(b),
        Sql::Null => SqlCell::Null,
    }
}

/// A stopped statement is [`StoreError::Cancelled`]; a statement beyond what SQLite takes (too
/// long, too many variables, too deep an expression) is the request's size, not a server fault:
/// [`StoreError::QueryTooLarge`].
fn classify(e: StoreError) -> StoreError {
    if is_interrupted(&e) {
        return StoreError::Cancelled;
    }
    if let StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, msg)) = &e {
        let msg = msg.as_deref().unwrap_or_default();
        if f.code == rusqlite::ErrorCode::TooBig
            || msg.contains("too many SQL variables")
            || msg.contains("too large")
            || msg.contains("too many terms")
            || msg.contains("stack overflow")
        {
            tracing::info!(error = %e, "search refused: too large for one SQL statement");
            return StoreError::QueryTooLarge(msg.to_string());
        }
    }
    e
}

impl SearchBackend for Backend<'_> {
    fn dialect(&self) -> &dyn Dialect {
        &SqliteDialect
    }

    fn type_no(&self, resource_type: &str) -> Result<Option<i64>, StoreError> {
        self.store.type_no(resource_type)
    }

    fn param_no(&self, code: &str) -> Result<Option<i64>, StoreError> {
        self.store.param_no(code)
    }

    fn system_no(&self, system: &str) -> Result<Option<i64>, StoreError> {
        self.store.system_no(system)
    }

    fn seq_at_or_after(&self, instant_ms: i64) -> Result<i64, StoreError> {
        crate::Store::seq_at_or_after(self.store, instant_ms)
    }

    fn query(
        &self,
        sql: &str,
        params: &[SqlParam],
        cached: bool,
    ) -> Result<Vec<Vec<SqlCell>>, StoreError> {
        let collect =
            |stmt: &mut rusqlite::Statement<'_>| -> Result<Vec<Vec<SqlCell>>, StoreError> {
                let ncols = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(to_sql)))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut row = Vec::with_capacity(ncols);
                    for i in 0..ncols {
                        row.push(to_cell(r.get::<_, Sql>(i)?));
                    }
                    out.push(row);
                }
                Ok(out)
            };
        let run = |conn: &rusqlite::Connection| {
            if cached {
                collect(&mut *conn.prepare_cached(sql)?)
            } else {
                collect(&mut conn.prepare(sql)?)
            }
        };
        match self.stop {
            Some(stop) => self.store.with_reader_until(stop, run),
            None => self.store.with_reader(run),
        }
        .map_err(classify)
    }
}

/// See [`crate::Store::search`].
pub(super) fn search(
    store: &SqliteStore,
    plan: &SearchPlan,
    stop: Option<&StopCheck>,
) -> Result<SearchRows, StoreError> {
    sql_plan::run(&Backend { store, stop }, plan)
}

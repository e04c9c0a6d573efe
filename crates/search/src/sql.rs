//! Translation of a typed [`SearchQuery`] into SQL over the SQLite store's index tables, and its
//! execution: keyset paging by (sort keys, `k`), `_total=accurate`, `_include`/`_revinclude`.
//!
//! The comparisons mirror [`crate::matching`] exactly (tests hold them together). Index rows
//! exist only for current, non-deleted versions (the store maintains that), so an `IN` over an
//! index table is already restricted to current resources.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fhir_model::SearchParamType;
use rusqlite::Connection;
use rusqlite::types::Value as Sql;
use serde_json::Value as Json;
use store::{SqliteStore, StoreError};

use crate::bundle::SearchPage;
use crate::error::SearchError;
use crate::query::{Filter, Include, Prefix, SearchQuery, SortKey, StringMatch, TotalMode, Value};
use crate::registry::{self, Storage};
use crate::values::{MAX_MS, MIN_MS};

/// `resource_versions.k = (type_no << 40) | seq`.
const TYPE_SHIFT: u32 = 40;
/// How many `_include:iterate` rounds are followed.
const MAX_ITERATE: usize = 3;

/// Most SQL parameters one statement may bind (SQLite allows 32,766).
const MAX_SQL_PARAMS: usize = 30_000;

impl From<StoreError> for SearchError {
    fn from(e: StoreError) -> Self {
        if store::sqlite::is_interrupted(&e) {
            return SearchError::Cancelled;
        }
        match e {
            StoreError::Sqlite(e) => e.into(),
            e => SearchError::Store(e.to_string()),
        }
    }
}

impl From<rusqlite::Error> for SearchError {
    /// A statement beyond what SQLite takes (too long, too many variables, too deep an
    /// expression) is the request's size, not a server fault: 400.
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, msg) = &e {
            let msg = msg.as_deref().unwrap_or_default();
            if f.code == rusqlite::ErrorCode::OperationInterrupted {
                return SearchError::Cancelled;
            }
            if f.code == rusqlite::ErrorCode::TooBig
                || msg.contains("too many SQL variables")
                || msg.contains("too large")
                || msg.contains("too many terms")
                || msg.contains("stack overflow")
            {
                tracing::info!(error = %e, "search refused: too large for one SQL statement");
                return SearchError::too_costly("", "the search is too large; use fewer values");
            }
        }
        SearchError::Store(e.to_string())
    }
}

/// The owner's handle on a running search: it stops when [`SearchControl::cancel`] is called
/// (the client went away) or its time limit passes, checked by SQLite while statements run.
/// Clones share the state.
#[derive(Debug, Clone)]
pub struct SearchControl {
    cancelled: Arc<AtomicBool>,
    deadline: Option<Instant>,
    limit: Duration,
}

impl SearchControl {
    /// A search that may run for `limit`.
    pub fn new(limit: Duration) -> SearchControl {
        SearchControl {
            cancelled: Arc::new(AtomicBool::new(false)),
            deadline: Instant::now().checked_add(limit),
            limit,
        }
    }

    /// Stops the search at its next check.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    fn timed_out(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn should_stop(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed) || self.timed_out()
    }

    /// A guard that cancels the search when dropped: hold it in the async handler, whose future
    /// is dropped when the client disconnects (the blocking work it started is not).
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// See [`SearchControl::cancel_on_drop`].
#[derive(Debug)]
pub struct CancelOnDrop(SearchControl);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// How [`execute_with`] runs a search.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Stops the search (cancelled or out of time); `None` runs it to the end.
    pub control: Option<SearchControl>,
    /// Resources `_include`/`_revinclude` add to the page at most (more are left out, with a
    /// warning on the page).
    pub max_included: usize,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            control: None,
            max_included: usize::MAX,
        }
    }
}

/// What the statements of one search run with: the store and the stop check.
struct Run<'s> {
    store: &'s SqliteStore,
    stop: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    max_included: usize,
}

impl Run<'_> {
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, SearchError> {
        Ok(match &self.stop {
            Some(stop) => self.store.with_reader_until(stop, f)?,
            None => self.store.with_reader(f)?,
        })
    }
}

/// `a OR b OR …` as a balanced tree: SQLite limits an expression's depth to 1,000, and a flat
/// chain of ORs is as deep as it is long.
fn any_of(conds: &[String]) -> String {
    match conds {
        [] => "0".to_string(),
        [one] => one.clone(),
        _ => {
            let (a, b) = conds.split_at(conds.len() / 2);
            format!("({} OR {})", any_of(a), any_of(b))
        }
    }
}

/// SQL text plus its positional parameters.
struct Builder<'s> {
    store: &'s SqliteStore,
    /// Render the next parameter filter as a correlated `EXISTS` probe instead of `IN`.
    probe: bool,
    params: Vec<Sql>,
}

fn k_bounds(type_no: i64) -> (i64, i64) {
    (type_no << TYPE_SHIFT, ((type_no + 1) << TYPE_SHIFT) - 1)
}

fn text(s: &str) -> Sql {
    Sql::Text(s.to_string())
}

/// Upper bound of all strings starting with `p` (for an index range scan).
fn prefix_upper(p: &str) -> String {
    format!("{p}\u{10FFFF}")
}

impl<'s> Builder<'s> {
    fn new(store: &'s SqliteStore) -> Self {
        Builder {
            store,
            probe: false,
            params: Vec::new(),
        }
    }

    fn p(&mut self, v: Sql) -> String {
        self.params.push(v);
        format!("?{}", self.params.len())
    }

    fn type_no(&self, t: &str) -> Result<i64, SearchError> {
        // A type never written has no rows: -1 matches nothing.
        Ok(self.store.type_no(t)?.unwrap_or(-1))
    }

    /// `<kexpr>` satisfies `f` (a boolean SQL expression), for a resource of `resource_type`.
    fn filter(
        &mut self,
        resource_type: &str,
        f: &Filter,
        kexpr: &str,
        idexpr: &str,
    ) -> Result<String, SearchError> {
        let type_no = self.type_no(resource_type)?;
        Ok(match f {
            Filter::Param {
                code,
                kind,
                values,
                negate,
            } => {
                let cond = match registry::storage(resource_type, code) {
                    Some(Storage::Id) => self.id_values(type_no, values, kexpr),
                    Some(Storage::LastUpdated) => self.last_updated_values(values, kexpr)?,
                    _ => self.param_values(resource_type, type_no, code, *kind, values, kexpr)?,
                };
                if *negate {
                    format!("NOT ({cond})")
                } else {
                    cond
                }
            }
            Filter::Missing { code, missing }
                if matches!(
                    registry::storage(resource_type, code),
                    Some(Storage::Id | Storage::LastUpdated)
                ) =>
            {
                // Every resource has an id and a lastUpdated.
                if *missing { "0".into() } else { "1".into() }
            }
            Filter::Missing { code, missing } => {
                let kind = fhir_model::r4()
                    .search_param(resource_type, code)
                    .map(|p| p.kind)
                    .unwrap_or(SearchParamType::Token);
                let tn = self.p(Sql::Integer(type_no));
                let mut present = Vec::new();
                for t in tables_of(kind) {
                    let pm = self.param_match(resource_type, code, t, "");
                    present.push(format!(
                        "{kexpr} IN (SELECT k FROM {t} WHERE type_no = {tn} AND {pm})"
                    ));
                }
                let present = any_of(&present);
                if *missing {
                    format!("NOT ({present})")
                } else {
                    format!("({present})")
                }
            }
            Filter::Chain {
                code,
                target_types,
                inner,
            } => {
                let mut alts = Vec::new();
                for tt in target_types {
                    let tno = self.type_no(tt)?;
                    let (lo, hi) = k_bounds(tno);
                    let inner_sql = self.filter(tt, inner, "t.k", "t.id")?;
                    let tn = self.p(Sql::Integer(type_no));
                    let pc = self.param_match(resource_type, code, "idx_reference", "r.");
                    let ttp = self.p(text(tt));
                    let lop = self.p(Sql::Integer(lo));
                    let hip = self.p(Sql::Integer(hi));
                    alts.push(format!(
                        "{kexpr} IN (SELECT r.k FROM idx_reference r WHERE r.type_no = {tn} AND {pc} \
                         AND r.target_type = {ttp} AND r.target_id IN (SELECT t.id FROM resource_versions t \
                         WHERE t.k > {lop} AND t.k <= {hip} AND t.superseded_seq IS NULL AND t.deleted = 0 AND {inner_sql}))"
                    ));
                }
                if alts.is_empty() {
                    "0".to_string()
                } else {
                    format!("({})", any_of(&alts))
                }
            }
            Filter::Has {
                source_type,
                ref_code,
                inner,
            } => {
                let sno = self.type_no(source_type)?;
                let inner_sql = self.filter(source_type, inner, "r.k", "")?;
                let sn = self.p(Sql::Integer(sno));
                let pc = self.param_match(source_type, ref_code, "idx_reference", "r.");
                let me = self.p(text(resource_type));
                format!(
                    "{idexpr} IN (SELECT r.target_id FROM idx_reference r WHERE r.type_no = {sn} AND {pc} \
                     AND r.target_type = {me} AND {inner_sql})"
                )
            }
        })
    }

    /// The driving index lookup of an equality filter (token, reference, uri values of one index
    /// table), as conditions on the table aliased `d`; `None` when the filter cannot drive.
    fn driver(
        &mut self,
        resource_type: &str,
        type_no: i64,
        f: &Filter,
    ) -> Option<(&'static str, String)> {
        let Filter::Param {
            code,
            kind,
            values,
            negate: false,
        } = f
        else {
            return None;
        };
        if !matches!(
            kind,
            SearchParamType::Token | SearchParamType::Reference | SearchParamType::Uri
        ) || !matches!(
            registry::storage(resource_type, code),
            Some(Storage::Rows | Storage::Alias { .. })
        ) || values.iter().any(|v| matches!(v, Value::TokenText(_)))
        {
            return None;
        }
        let mut table = None;
        let mut conds = Vec::new();
        for v in values {
            let (t, c) = self.value_cond(v);
            if table.is_some_and(|x| x != t) {
                return None;
            }
            table = Some(t);
            conds.push(c);
        }
        let table = table?;
        let tn = self.p(Sql::Integer(type_no));
        let pm = self.param_match(resource_type, code, table, "d.");
        Some((
            table,
            format!("d.type_no = {tn} AND {pm} AND ({})", any_of(&conds)),
        ))
    }

    /// The parameter condition on an index table (columns prefixed with `a`): its own rows, or
    /// those of the parameters it is an alias of.
    fn param_match(&mut self, resource_type: &str, code: &str, table: &str, a: &str) -> String {
        match registry::storage(resource_type, code) {
            Some(Storage::Alias { codes, ref_type }) => {
                let list: Vec<String> = codes.iter().map(|c| self.p(text(c))).collect();
                let mut s = format!("{a}param IN ({})", list.join(", "));
                if let (Some(t), "idx_reference") = (ref_type, table) {
                    let tp = self.p(text(&t));
                    let gp = self.p(text(&format!("*/{t}/*")));
                    s = format!("{s} AND ({a}target_type = {tp} OR {a}url GLOB {gp})");
                }
                s
            }
            _ => format!("{a}param = {}", self.p(text(code))),
        }
    }

    /// `_id` values against the id column. An id has no system: `id` and `|id` match, `sys|id`
    /// cannot.
    fn id_values(&mut self, type_no: i64, values: &[Value], kexpr: &str) -> String {
        let ids: Vec<String> = values
            .iter()
            .filter_map(|v| match v {
                Value::Token {
                    system,
                    code: Some(c),
                } if system.as_deref().is_none_or(str::is_empty) => Some(c.clone()),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return "0".into();
        }
        let tn = self.p(Sql::Integer(type_no));
        let list: Vec<String> = ids.iter().map(|i| self.p(text(i))).collect();
        format!(
            "{kexpr} IN (SELECT k FROM resource_versions WHERE type_no = {tn} AND id IN ({}) \
             AND superseded_seq IS NULL AND deleted = 0)",
            list.join(", ")
        )
    }

    /// `_lastUpdated` values as seq bounds: lastUpdated is the same for a transaction's rows and
    /// increases between transactions, so `lastUpdated >= t` iff `seq >= seq_at_or_after(t)`.
    /// A stored lastUpdated is a millisecond point `[t, t+1)`; the prefixes reduce accordingly.
    fn last_updated_values(
        &mut self,
        values: &[Value],
        kexpr: &str,
    ) -> Result<String, SearchError> {
        let seq = format!("({kexpr} & {})", (1i64 << TYPE_SHIFT) - 1);
        let mut alts = Vec::new();
        for v in values {
            let Value::Date { prefix, range } = v else {
                continue;
            };
            // Bind only the bounds the condition uses: every bound parameter must appear in the
            // statement (a `ge` with an unused upper bound failed in count mode).
            let (need_lo, need_hi) = match prefix {
                Prefix::Eq | Prefix::Ap | Prefix::Ne => (true, true),
                Prefix::Gt | Prefix::Sa | Prefix::Le => (false, true),
                Prefix::Lt | Prefix::Eb | Prefix::Ge => (true, false),
            };
            let lo = if need_lo {
                let s_lo = store::Store::seq_at_or_after(self.store, range.lo)?;
                self.p(Sql::Integer(s_lo))
            } else {
                String::new()
            };
            let hi = if need_hi {
                let s_hi = store::Store::seq_at_or_after(self.store, range.hi)?;
                self.p(Sql::Integer(s_hi))
            } else {
                String::new()
            };
            alts.push(match prefix {
                Prefix::Eq | Prefix::Ap => format!("({seq} >= {lo} AND {seq} < {hi})"),
                Prefix::Ne => format!("NOT ({seq} >= {lo} AND {seq} < {hi})"),
                Prefix::Gt | Prefix::Sa => format!("{seq} >= {hi}"),
                Prefix::Lt | Prefix::Eb => format!("{seq} < {lo}"),
                Prefix::Ge => format!("{seq} >= {lo}"),
                Prefix::Le => format!("{seq} < {hi}"),
            });
        }
        Ok(if alts.is_empty() {
            "0".into()
        } else {
            format!("({})", any_of(&alts))
        })
    }

    /// An OR list of values of one parameter, grouped by index table.
    fn param_values(
        &mut self,
        resource_type: &str,
        type_no: i64,
        code: &str,
        _kind: SearchParamType,
        values: &[Value],
        kexpr: &str,
    ) -> Result<String, SearchError> {
        let mut by_table: Vec<(&'static str, Vec<String>)> = Vec::new();
        for v in values {
            let (table, cond) = self.value_cond(v);
            match by_table.iter_mut().find(|(t, _)| *t == table) {
                Some((_, conds)) => conds.push(cond),
                None => by_table.push((table, vec![cond])),
            }
        }
        let probe = std::mem::replace(&mut self.probe, false);
        let mut parts = Vec::new();
        for (table, conds) in by_table {
            let tn = self.p(Sql::Integer(type_no));
            if probe {
                // A per-row lookup through the `(k)` index (see `execute`).
                let pc = self.param_match(resource_type, code, table, "+");
                parts.push(format!(
                    "EXISTS (SELECT 1 FROM {table} WHERE k = {kexpr} AND +type_no = {tn} AND {pc} AND ({}))",
                    any_of(&conds)
                ));
            } else {
                let pc = self.param_match(resource_type, code, table, "");
                parts.push(format!(
                    "{kexpr} IN (SELECT k FROM {table} WHERE type_no = {tn} AND {pc} AND ({}))",
                    any_of(&conds)
                ));
            }
        }
        Ok(if parts.is_empty() {
            "0".into()
        } else {
            format!("({})", any_of(&parts))
        })
    }

    fn token_cond(
        &mut self,
        system: &Option<String>,
        code: &Option<String>,
        scol: &str,
        ccol: &str,
    ) -> String {
        let mut c = Vec::new();
        if let Some(code) = code {
            c.push(format!("{ccol} = {}", self.p(text(code))));
        }
        match system.as_deref() {
            None => {}
            Some("") => c.push(format!("{scol} IS NULL")),
            Some(s) => c.push(format!("{scol} = {}", self.p(text(s)))),
        }
        if c.is_empty() {
            "1".into()
        } else {
            c.join(" AND ")
        }
    }

    fn prefix_cond(&mut self, col: &str, v: &str) -> String {
        let a = self.p(text(v));
        let b = self.p(text(&prefix_upper(v)));
        let n = self.p(Sql::Integer(v.chars().count() as i64));
        format!("({col} >= {a} AND {col} < {b} AND substr({col}, 1, {n}) = {a})")
    }

    fn number_cond(&mut self, col: &str, prefix: Prefix, d: &crate::values::Decimal) -> String {
        let v = self.p(Sql::Real(d.value));
        match prefix {
            Prefix::Eq | Prefix::Ne => {
                let lo = self.p(Sql::Real(d.lo));
                let hi = self.p(Sql::Real(d.hi));
                let c = format!("({col} >= {lo} AND {col} < {hi})");
                if prefix == Prefix::Ne {
                    format!("NOT {c}")
                } else {
                    c
                }
            }
            Prefix::Gt | Prefix::Sa => format!("{col} > {v}"),
            Prefix::Lt | Prefix::Eb => format!("{col} < {v}"),
            Prefix::Ge => format!("{col} >= {v}"),
            Prefix::Le => format!("{col} <= {v}"),
            Prefix::Ap => {
                let tol = (d.value.abs() * 0.1).max(d.hi - d.value);
                let t = self.p(Sql::Real(tol));
                format!("abs({col} - {v}) <= {t}")
            }
        }
    }

    /// The index table and the row condition of one search value.
    fn value_cond(&mut self, v: &Value) -> (&'static str, String) {
        match v {
            Value::Token { system, code } => {
                ("idx_token", self.token_cond(system, code, "system", "code"))
            }
            Value::TokenText(t) => ("idx_token_text", self.prefix_cond("text", t)),
            Value::String { value, mode } => {
                let c = match mode {
                    StringMatch::Prefix => self.prefix_cond("normalized", value),
                    StringMatch::Contains => {
                        format!("instr(normalized, {}) > 0", self.p(text(value)))
                    }
                    StringMatch::Exact => format!("exact = {}", self.p(text(value))),
                };
                ("idx_string", c)
            }
            Value::Date { prefix, range } => {
                let plo = self.p(Sql::Integer(range.lo));
                let phi = self.p(Sql::Integer(range.hi));
                let c = match prefix {
                    Prefix::Eq => format!("(lo >= {plo} AND hi <= {phi})"),
                    Prefix::Ne => format!("NOT (lo >= {plo} AND hi <= {phi})"),
                    Prefix::Gt => format!("hi > {phi}"),
                    Prefix::Lt => format!("lo < {plo}"),
                    Prefix::Ge => format!("hi > {plo}"),
                    Prefix::Le => format!("lo < {phi}"),
                    Prefix::Sa => format!("lo >= {phi}"),
                    Prefix::Eb => format!("hi <= {plo}"),
                    Prefix::Ap => format!("(lo < {phi} AND hi > {plo})"),
                };
                ("idx_date", c)
            }
            Value::Number { prefix, value } => {
                ("idx_number", self.number_cond("value", *prefix, value))
            }
            Value::Quantity {
                prefix,
                value,
                system,
                code,
            } => {
                let mut c = vec![self.number_cond("value", *prefix, value)];
                if let Some(s) = system {
                    c.push(format!("system = {}", self.p(text(s))));
                }
                if let Some(code) = code {
                    let cp = self.p(text(code));
                    if system.is_some() {
                        c.push(format!("code = {cp}"));
                    } else {
                        c.push(format!("(code = {cp} OR unit = {cp})"));
                    }
                }
                ("idx_quantity", c.join(" AND "))
            }
            Value::Reference { target_type, id } => {
                let mut c = format!("target_id = {}", self.p(text(id)));
                if let Some(t) = target_type {
                    c = format!("{c} AND target_type = {}", self.p(text(t)));
                }
                ("idx_reference", format!("({c})"))
            }
            Value::ReferenceUrl(u) => ("idx_reference", format!("url = {}", self.p(text(u)))),
            Value::ReferenceIdentifier { system, code } => (
                "idx_reference_identifier",
                format!("({})", self.token_cond(system, code, "system", "value")),
            ),
            Value::Uri(u) => ("idx_uri", format!("uri = {}", self.p(text(u)))),
        }
    }

    /// The SQL expression of a sort key for the row `rv` (never NULL: missing values sort last).
    fn sort_expr(&mut self, resource_type: &str, type_no: i64, key: &SortKey) -> String {
        match key.code.as_str() {
            "_id" => return "rv.id".into(),
            "_lastUpdated" => return "rv.seq".into(),
            _ => {}
        }
        let tn = self.p(Sql::Integer(type_no));
        let agg = if key.descending { "max" } else { "min" };
        let (table, col, missing) = match key.kind {
            SearchParamType::Date => (
                "idx_date",
                if key.descending { "hi" } else { "lo" },
                if key.descending {
                    MIN_MS.to_string()
                } else {
                    MAX_MS.to_string()
                },
            ),
            SearchParamType::String => (
                "idx_string",
                "normalized",
                if key.descending {
                    "''".into()
                } else {
                    "char(1114111)".into()
                },
            ),
            _ => (
                "idx_token",
                "code",
                if key.descending {
                    "''".into()
                } else {
                    "char(1114111)".into()
                },
            ),
        };
        // `+` keeps the planner on the `(k)` index: one lookup per row, not a scan of the
        // parameter's rows.
        let pc = self.param_match(resource_type, &key.code, table, "+");
        format!(
            "coalesce((SELECT {agg}({col}) FROM {table} WHERE k = rv.k AND +type_no = {tn} AND {pc}), {missing})"
        )
    }
}

fn tables_of(kind: SearchParamType) -> &'static [&'static str] {
    match kind {
        SearchParamType::Token => &["idx_token", "idx_token_text"],
        SearchParamType::String => &["idx_string"],
        SearchParamType::Date => &["idx_date"],
        SearchParamType::Number => &["idx_number"],
        SearchParamType::Quantity => &["idx_quantity"],
        SearchParamType::Reference => &["idx_reference", "idx_reference_identifier"],
        SearchParamType::Uri => &["idx_uri"],
        SearchParamType::Composite | SearchParamType::Special => &[],
    }
}

/// A sort value as stored in a cursor.
fn sql_to_json(v: &Sql) -> Json {
    match v {
        Sql::Integer(i) => Json::from(*i),
        Sql::Real(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Sql::Text(t) => Json::String(t.clone()),
        _ => Json::Null,
    }
}

fn json_to_sql(v: &Json) -> Sql {
    match v {
        Json::Number(n) => n
            .as_i64()
            .map(Sql::Integer)
            .unwrap_or_else(|| Sql::Real(n.as_f64().unwrap_or(0.0))),
        Json::String(s) => Sql::Text(s.clone()),
        _ => Sql::Null,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Decodes a `_cursor`: the sort values and `k` of the last row of the previous page.
fn decode_cursor(c: &str, nkeys: usize) -> Result<(Vec<Sql>, i64), SearchError> {
    let bad = || SearchError::invalid("_cursor", "malformed paging cursor");
    let bytes = unhex(c).ok_or_else(bad)?;
    let v: Json = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let a = v.as_array().ok_or_else(bad)?;
    if a.len() != nkeys + 1 {
        return Err(bad());
    }
    let k = a[nkeys].as_i64().ok_or_else(bad)?;
    Ok((a[..nkeys].iter().map(json_to_sql).collect(), k))
}

fn encode_cursor(vals: &[Sql], k: i64) -> String {
    let mut a: Vec<Json> = vals.iter().map(sql_to_json).collect();
    a.push(Json::from(k));
    hex(Json::Array(a).to_string().as_bytes())
}

fn parse_json(bytes: &[u8]) -> Result<Json, SearchError> {
    serde_json::from_slice(bytes)
        .map_err(|e| SearchError::Store(format!("stored resource is not JSON: {e}")))
}

/// Runs a search on the SQLite store: one page of matches, includes, total and next cursor.
pub fn execute(store: &SqliteStore, q: &SearchQuery) -> Result<SearchPage, SearchError> {
    execute_with(store, q, &ExecOptions::default())
}

/// [`execute`] that stops when `opts.control` says so ([`SearchError::Timeout`] past its time
/// limit, [`SearchError::Cancelled`] when cancelled) and bounds the included resources.
pub fn execute_with(
    store: &SqliteStore,
    q: &SearchQuery,
    opts: &ExecOptions,
) -> Result<SearchPage, SearchError> {
    let run = Run {
        store,
        stop: opts
            .control
            .clone()
            .map(|c| Arc::new(move || c.should_stop()) as Arc<dyn Fn() -> bool + Send + Sync>),
        max_included: opts.max_included,
    };
    match run_page(&run, q) {
        Err(SearchError::Cancelled) => match &opts.control {
            Some(c) if c.timed_out() => Err(SearchError::Timeout { limit: c.limit }),
            _ => Err(SearchError::Cancelled),
        },
        other => other,
    }
}

fn run_page(run: &Run<'_>, q: &SearchQuery) -> Result<SearchPage, SearchError> {
    let store = run.store;
    let mut b = Builder::new(store);
    let type_no = b.type_no(&q.resource_type)?;
    let (lo, hi) = k_bounds(type_no);
    let mut where_ = format!(
        "rv.k > {} AND rv.k <= {} AND rv.superseded_seq IS NULL AND rv.deleted = 0",
        b.p(Sql::Integer(lo)),
        b.p(Sql::Integer(hi))
    );
    // Selective filters (codes, references, strings, chains) drive the query as `IN` lists;
    // range filters (dates, negations) then become per-row probes, so a wide date range never
    // materializes its whole match set. With only range filters, the first one drives.
    let selective = |f: &Filter| match f {
        Filter::Param { kind, negate, .. } => !*negate && *kind != SearchParamType::Date,
        Filter::Chain { .. } | Filter::Has { .. } => true,
        Filter::Missing { .. } => false,
    };
    let any_selective = q.filters.iter().any(selective);
    let mut driver_chosen = any_selective;
    let mut filter_sqls = Vec::with_capacity(q.filters.len());
    for f in &q.filters {
        b.probe = if selective(f) {
            false
        } else if !driver_chosen && matches!(f, Filter::Param { negate: false, .. }) {
            driver_chosen = true;
            false
        } else {
            true
        };
        let c = b.filter(&q.resource_type, f, "rv.k", "rv.id")?;
        b.probe = false;
        filter_sqls.push(c);
    }
    if b.params.len() > MAX_SQL_PARAMS {
        return Err(SearchError::too_costly(
            "",
            "the search is too large; use fewer values",
        ));
    }
    let base_where = where_.clone();
    for c in &filter_sqls {
        where_.push_str(" AND ");
        where_.push_str(c);
    }

    let mut page = SearchPage::default();
    if q.total == TotalMode::Accurate || q.summary_count || q.count == 0 {
        let sql = format!("SELECT count(*) FROM resource_versions rv WHERE {where_}");
        let n: i64 = run.read(|conn| {
            Ok(conn
                .prepare(&sql)?
                .query_row(rusqlite::params_from_iter(b.params.iter()), |r| r.get(0))?)
        })?;
        page.total = Some(n as u64);
    }
    if q.summary_count || q.count == 0 {
        return Ok(page);
    }

    if q.sort.is_empty()
        && let Some((i, (table, cond))) = q
            .filters
            .iter()
            .enumerate()
            .find_map(|(i, f)| b.driver(&q.resource_type, type_no, f).map(|d| (i, d)))
    {
        // Pages in `k` order driven by an equality filter's index (whose entries end in `k`):
        // the page stops after `count` matches instead of collecting every match first.
        let mut w = base_where;
        for (j, c) in filter_sqls.iter().enumerate() {
            if j != i {
                w.push_str(" AND ");
                w.push_str(c);
            }
        }
        if let Some(c) = &q.cursor {
            let (_, ck) = decode_cursor(c, 0)?;
            w.push_str(&format!(" AND d.k > {}", b.p(Sql::Integer(ck))));
        }
        let limit = b.p(Sql::Integer(q.count as i64 + 1));
        let sql = format!(
            "SELECT rv.k, rv.id, rv.json FROM {table} d JOIN resource_versions rv ON rv.k = d.k \
             WHERE {cond} AND {w} GROUP BY d.k ORDER BY d.k LIMIT {limit}"
        );
        let rows: Vec<(i64, String, Vec<u8>, Vec<Sql>)> = run.read(|conn| {
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(b.params.iter()), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, Vec::new()))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })?;
        return finish_page(run, q, page, rows);
    }
    let sort_exprs: Vec<String> = q
        .sort
        .iter()
        .map(|k| b.sort_expr(&q.resource_type, type_no, k))
        .collect();
    let select_sorts: String = sort_exprs
        .iter()
        .enumerate()
        .map(|(i, e)| format!(", {e} AS s{i}"))
        .collect();
    let mut outer_where = String::from("1");
    if let Some(c) = &q.cursor {
        let (vals, ck) = decode_cursor(c, q.sort.len())?;
        // (s0, s1, …, k) after the cursor, each key in its own direction; k always ascending.
        let mut cond = format!("k > {}", b.p(Sql::Integer(ck)));
        for (i, key) in q.sort.iter().enumerate().rev() {
            let v = b.p(vals[i].clone());
            let op = if key.descending { "<" } else { ">" };
            cond = format!("(s{i} {op} {v} OR (s{i} = {v} AND {cond}))");
        }
        outer_where = cond;
    }
    let order: String = q
        .sort
        .iter()
        .enumerate()
        .map(|(i, k)| format!("s{i}{}, ", if k.descending { " DESC" } else { "" }))
        .collect::<String>()
        + "k";
    let limit = b.p(Sql::Integer(q.count as i64 + 1));
    let sql = format!(
        "SELECT * FROM (SELECT rv.k AS k, rv.id AS id, rv.json AS json{select_sorts} FROM resource_versions rv WHERE {where_}) \
         WHERE {outer_where} ORDER BY {order} LIMIT {limit}"
    );
    let nsort = q.sort.len();
    let rows: Vec<(i64, String, Vec<u8>, Vec<Sql>)> = run.read(|conn| {
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(b.params.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut sorts = Vec::with_capacity(nsort);
            for i in 0..nsort {
                sorts.push(r.get::<_, Sql>(3 + i)?);
            }
            out.push((r.get(0)?, r.get(1)?, r.get(2)?, sorts));
        }
        Ok(out)
    })?;
    finish_page(run, q, page, rows)
}

/// Cuts the extra row into a cursor, parses the matches and adds the includes.
fn finish_page(
    run: &Run<'_>,
    q: &SearchQuery,
    mut page: SearchPage,
    mut rows: Vec<(i64, String, Vec<u8>, Vec<Sql>)>,
) -> Result<SearchPage, SearchError> {
    if rows.len() > q.count as usize {
        rows.truncate(q.count as usize);
        if let Some((k, _, _, sorts)) = rows.last() {
            page.next_cursor = Some(encode_cursor(sorts, *k));
        }
    }
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut page_refs: Vec<(String, String, i64)> = Vec::new();
    for (k, id, json, _) in &rows {
        seen.insert((q.resource_type.clone(), id.clone()));
        page_refs.push((q.resource_type.clone(), id.clone(), *k));
        page.matches.push(parse_json(json)?);
    }
    if !q.includes.is_empty() || !q.revincludes.is_empty() {
        let (included, complete) = includes(run, q, page_refs, &mut seen)?;
        page.included = included;
        if !complete {
            tracing::info!(
                resource_type = %q.resource_type,
                limit = run.max_included,
                "included resources left out at the limit"
            );
            page.warnings.push(format!(
                "only the first {} included resources are in this page (the server's limit); ask for a smaller _count or fewer includes to get them all",
                run.max_included
            ));
        }
    }
    Ok(page)
}

/// `_include` and `_revinclude` (with `:iterate` up to [`MAX_ITERATE`] rounds), at most
/// `run.max_included` resources; the flag is false when some were left out at that limit.
fn includes(
    run: &Run<'_>,
    q: &SearchQuery,
    mut frontier: Vec<(String, String, i64)>,
    seen: &mut HashSet<(String, String)>,
) -> Result<(Vec<Json>, bool), SearchError> {
    let store = run.store;
    let max = run.max_included;
    let mut out = Vec::new();
    let mut type_nos: HashMap<String, i64> = HashMap::new();
    let mut type_no = |t: &str| -> Result<i64, SearchError> {
        if let Some(n) = type_nos.get(t) {
            return Ok(*n);
        }
        let n = store.type_no(t)?.unwrap_or(-1);
        type_nos.insert(t.to_string(), n);
        Ok(n)
    };
    for round in 0..=MAX_ITERATE {
        let applies = |inc: &Include| round == 0 || inc.iterate;
        let mut next = Vec::new();
        for inc in q.includes.iter().filter(|i| applies(i)) {
            for (t, _, k) in frontier.iter().filter(|(t, _, _)| *t == inc.source_type) {
                let tno = type_no(t)?;
                let targets = include_targets(run, tno, *k, inc)?;
                for (tt, tid) in targets {
                    if seen.insert((tt.clone(), tid.clone())) {
                        let ttno = type_no(&tt)?;
                        if let Some((k2, json)) = read_current(run, ttno, &tid)? {
                            if out.len() >= max {
                                return Ok((out, false));
                            }
                            out.push(parse_json(&json)?);
                            next.push((tt, tid, k2));
                        }
                    }
                }
            }
        }
        for inc in q.revincludes.iter().filter(|i| applies(i)) {
            let sno = type_no(&inc.source_type)?;
            for (t, id, _) in &frontier {
                if inc.target_type.as_ref().is_some_and(|tt| tt != t) {
                    continue;
                }
                // One more than may still be added: enough to tell that the limit was reached.
                let room = max.saturating_sub(out.len()).saturating_add(1);
                for (k2, sid, json) in revinclude_sources(run, sno, inc, t, id, room)? {
                    if seen.insert((inc.source_type.clone(), sid.clone())) {
                        if out.len() >= max {
                            return Ok((out, false));
                        }
                        out.push(parse_json(&json)?);
                        next.push((inc.source_type.clone(), sid, k2));
                    }
                }
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    Ok((out, true))
}

fn include_targets(
    run: &Run<'_>,
    type_no: i64,
    k: i64,
    inc: &Include,
) -> Result<Vec<(String, String)>, SearchError> {
    let mut b = Builder::new(run.store);
    let mut sql = format!(
        "SELECT target_type, target_id FROM idx_reference WHERE k = {} AND +type_no = {} AND target_id IS NOT NULL",
        b.p(Sql::Integer(k)),
        b.p(Sql::Integer(type_no))
    );
    if let Some(p) = &inc.param {
        let pm = b.param_match(&inc.source_type, p, "idx_reference", "+");
        sql.push_str(&format!(" AND {pm}"));
    }
    if let Some(t) = &inc.target_type {
        sql.push_str(&format!(" AND target_type = {}", b.p(text(t))));
    }
    let params = b.params;
    run.read(|conn| {
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    })
}

fn revinclude_sources(
    run: &Run<'_>,
    source_type_no: i64,
    inc: &Include,
    target_type: &str,
    target_id: &str,
    limit: usize,
) -> Result<Vec<(i64, String, Vec<u8>)>, SearchError> {
    let mut b = Builder::new(run.store);
    let mut sql = format!(
        "SELECT DISTINCT rv.k, rv.id, rv.json FROM idx_reference r JOIN resource_versions rv ON rv.k = r.k \
         WHERE r.type_no = {} AND r.target_id = {} AND r.target_type = {}",
        b.p(Sql::Integer(source_type_no)),
        b.p(text(target_id)),
        b.p(text(target_type))
    );
    if let Some(p) = &inc.param {
        let pm = b.param_match(&inc.source_type, p, "idx_reference", "r.");
        sql.push_str(&format!(" AND {pm}"));
    }
    let limit = b.p(Sql::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
    let params = b.params;
    sql.push_str(&format!(" ORDER BY rv.k LIMIT {limit}"));
    run.read(|conn| {
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    })
}

fn read_current(
    run: &Run<'_>,
    type_no: i64,
    id: &str,
) -> Result<Option<(i64, Vec<u8>)>, SearchError> {
    use rusqlite::OptionalExtension;
    run.read(|conn: &Connection| {
        Ok(conn
            .prepare_cached(
                "SELECT k, json FROM resource_versions WHERE type_no = ?1 AND id = ?2 \
                 AND superseded_seq IS NULL AND deleted = 0",
            )?
            .query_row(rusqlite::params![type_no, id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    })
}

/// The whole `GET /[type]` / `POST /[type]/_search` flow for the server: parse the request's
/// (name, value) pairs, run the page, and build the searchset Bundle. `base` is the server's
/// base URL (links and `fullUrl`s). Errors carry their HTTP status and OperationOutcome
/// ([`SearchError::http_status`], [`SearchError::operation_outcome`]).
pub fn search_bundle(
    store: &SqliteStore,
    base: &str,
    resource_type: &str,
    params: &[(String, String)],
    lenient: bool,
) -> Result<Json, SearchError> {
    let q = crate::query::parse_query(
        resource_type,
        params,
        crate::query::ParseOptions {
            lenient,
            predicate_only: false,
        },
    )?;
    let page = execute(store, &q)?;
    Ok(crate::bundle::searchset_bundle(base, &q, params, &page))
}

//! A [`SearchPlan`] as SQL over the index tables, shared by the SQL backends: the statements and
//! the whole page algorithm (count, keyset page, includes) live here once; a backend supplies a
//! [`Dialect`] (placeholders, the few functions that differ) and a [`SearchBackend`] (type
//! numbers, seqs, running one statement with its stop check).
//!
//! Both backends have the same table shapes: `resource_versions(k, seq, type_no, id, deleted,
//! superseded_seq, json)` with `k = (type_no << 40) | seq`, and the index tables
//! `idx_*(type_no, param_no, <values>, k)` holding rows only for current, non-deleted versions (so an
//! `IN` over an index table is already restricted to current resources). SQLite's index rows
//! store no `k` ([`Dialect::index_key`] gives it from their type and rowid).
//!
//! Paging is keyset by (sort keys, `k`). With no sort and an equality filter (token, reference,
//! uri), that filter's index drives the page in `k` order and the page stops after `count`
//! matches instead of collecting every match first.

use std::collections::{HashMap, HashSet};

use crate::StoreError;
use crate::index::index_text;
use crate::ops::{page_cut, small_json};
use crate::plan::{
    ChainTarget, CursorValue, IncludeSpec, MAX_INCLUDE_ROUNDS, NumberRange, PageCursor, ParamKind,
    ParamMatch, ParamOn, PlanFilter, PlanValue, Prefix, SearchPlan, SearchRows, SortKey, SortOn,
    StringMatch,
};

/// `resource_versions.k = (type_no << 40) | seq`.
pub(crate) const TYPE_SHIFT: u32 = 40;

/// Most SQL parameters one statement may bind (SQLite allows 32,766, PostgreSQL 65,535).
const MAX_SQL_PARAMS: usize = 30_000;

/// Sort value of a date parameter a resource has no value of (sorts last either way).
const MISSING_DATE_ASC: i64 = i64::MAX / 2;
const MISSING_DATE_DESC: i64 = i64::MIN / 2;

/// A bound statement parameter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SqlParam {
    Int(i64),
    Real(f64),
    Text(String),
    Null,
}

/// One column value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SqlCell {
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
    Null,
}

impl SqlCell {
    fn int(&self) -> Result<i64, StoreError> {
        match self {
            SqlCell::Int(i) => Ok(*i),
            other => Err(StoreError::Corrupt(format!(
                "search: integer expected, got {other:?}"
            ))),
        }
    }

    fn text(self) -> Result<String, StoreError> {
        match self {
            SqlCell::Text(s) => Ok(s),
            other => Err(StoreError::Corrupt(format!(
                "search: text expected, got {other:?}"
            ))),
        }
    }

    fn bytes(self) -> Result<Vec<u8>, StoreError> {
        match self {
            SqlCell::Blob(b) => Ok(b),
            SqlCell::Text(s) => Ok(s.into_bytes()),
            other => Err(StoreError::Corrupt(format!(
                "search: resource JSON expected, got {other:?}"
            ))),
        }
    }

    fn cursor_value(self) -> CursorValue {
        match self {
            SqlCell::Int(i) => CursorValue::Int(i),
            SqlCell::Real(f) => CursorValue::Real(f),
            SqlCell::Text(t) => CursorValue::Text(t),
            SqlCell::Blob(_) | SqlCell::Null => CursorValue::Null,
        }
    }
}

fn cursor_param(v: &CursorValue) -> SqlParam {
    match v {
        CursorValue::Int(i) => SqlParam::Int(*i),
        CursorValue::Real(f) => SqlParam::Real(*f),
        CursorValue::Text(t) => SqlParam::Text(t.clone()),
        CursorValue::Null => SqlParam::Null,
    }
}

/// What differs between the SQL of the backends.
pub(crate) trait Dialect {
    /// The text of the `n`th (1-based) parameter, whose value is `p`.
    fn placeholder(&self, n: usize, p: &SqlParam) -> String;
    /// Written before a column name to keep the planner from using an index on it (SQLite's
    /// unary `+`); empty where the planner needs no such hint.
    fn no_index(&self) -> &'static str;
    /// `SELECT {select} FROM {table} WHERE k = {k} AND {cond}`: a per-row lookup (a sort value)
    /// that must read the table through the version's rows ([`Dialect::version_rows`]), whatever the other conditions and the
    /// planner's statistics.
    fn key_lookup(&self, select: &str, table: &str, k: &str, cond: &str) -> String {
        let rows = self.version_rows(table, k);
        format!("SELECT {select} FROM {table} WHERE {rows} AND {cond}")
    }
    /// The condition that selects the rows of index table `table` (not aliased) that belong to
    /// the stored version whose key is `k` (an SQL expression): `k = {k}`, read through the
    /// table's `(k)` index where it has one (SQLite has none: a rowid range).
    fn version_rows(&self, _table: &str, k: &str) -> String {
        format!("k = {k}")
    }
    /// The version key `k` of the index-table row whose columns are prefixed with `alias` (`""`,
    /// or a table alias and a dot): its `k` column where the rows store one.
    fn index_key(&self, alias: &str) -> String {
        format!("{alias}k")
    }
    /// The page of a search driven by an equality filter's index ([`Builder::driver`]): `cols` of
    /// the rows of `table` (aliased `d`) joined with their versions (`resource_versions rv`) that
    /// satisfy `cond` (the driver's row condition on `d` and the other filters on `rv`), one
    /// row per version, in key order, after the key `after` (a parameter) when given, at most
    /// `limit`. `row_cond` is the driver's row condition alone on the same table aliased `e`,
    /// written only where [`Dialect::driven_row_cond`] asks for it (every bound parameter must
    /// appear in the statement).
    fn driven_page(&self, page: &DrivenPage<'_>) -> String {
        let after = page
            .after
            .map(|a| format!(" AND d.k > {a}"))
            .unwrap_or_default();
        self.distinct_page(
            page.cols,
            &format!("{} d JOIN resource_versions rv ON rv.k = d.k", page.table),
            &format!("{}{after}", page.cond),
            "d.k",
            page.limit,
        )
    }
    /// Whether [`Dialect::driven_page`] needs the driver's row condition on alias `e`.
    fn driven_row_cond(&self) -> bool {
        false
    }
    /// Whether `idx_token` names its system by number (`system_no`, SQLite) rather than by its
    /// text (`system`).
    fn token_system_numbers(&self) -> bool {
        false
    }
    /// The boolean constants.
    fn bool(&self, b: bool) -> &'static str;
    /// `needle` (a parameter) occurs in `hay`.
    fn contains(&self, hay: &str, needle: &str) -> String;
    /// A string greater than any stored text (the missing value of an ascending text sort).
    fn max_text(&self) -> &'static str;
    /// The operator and pattern that test whether a URL column contains the path segment
    /// `/{resource_type}/`.
    fn url_has_type(&self, resource_type: &str) -> (&'static str, String);
    /// `SELECT {cols} FROM {from} WHERE {cond}` with one row per distinct `key`, in `key` order,
    /// at most `limit` rows (`key` is a column of the driving table).
    fn distinct_page(&self, cols: &str, from: &str, cond: &str, key: &str, limit: &str) -> String;
    /// How many of a search's ANDed filters are written as they are, for the planner to turn
    /// into joins it may reorder and drive from; the filters after them are written through
    /// [`Dialect::opaque`]. `None`: all of them as they are.
    fn joined_filters(&self) -> Option<usize> {
        None
    }
    /// A filter condition the planner evaluates as written (per row, a subquery once into a
    /// hash) instead of turning it into a join. PostgreSQL turns every ANDed `IN (subquery)` into
    /// a semi-join and then searches join orders over all of them: 120 ANDed `_id` filters took
    /// 14-27 s to plan (60 ms to run).
    fn opaque(&self, cond: &str) -> String {
        cond.to_string()
    }
}

/// The parts of a driven page's statement ([`Dialect::driven_page`]).
pub(crate) struct DrivenPage<'a> {
    pub(crate) cols: &'a str,
    pub(crate) table: &'a str,
    pub(crate) cond: &'a str,
    pub(crate) row_cond: Option<&'a str>,
    pub(crate) after: Option<&'a str>,
    pub(crate) limit: &'a str,
}

/// A backend that runs the statements of [`run`].
pub(crate) trait SearchBackend {
    fn dialect(&self) -> &dyn Dialect;
    /// The type number of a resource type; `None` if the type was never written.
    fn type_no(&self, resource_type: &str) -> Result<Option<i64>, StoreError>;
    /// The number of a search parameter code in the index rows' `param_no`; `None` if no
    /// index row was ever written for it.
    fn param_no(&self, code: &str) -> Result<Option<i64>, StoreError>;
    /// The number of a token system in `idx_token.system_no`, where the dialect numbers them
    /// ([`Dialect::token_system_numbers`]); `None` if no token row was ever written with it.
    fn system_no(&self, _system: &str) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }
    /// See [`crate::Store::seq_at_or_after`].
    fn seq_at_or_after(&self, instant_ms: i64) -> Result<i64, StoreError>;
    /// Runs one statement and returns its rows. `cached`: the statement is one of a few shapes
    /// run many times (worth a prepared-statement cache entry). A stopped statement fails with
    /// [`StoreError::Cancelled`], one beyond the database's limits with
    /// [`StoreError::QueryTooLarge`].
    fn query(
        &self,
        sql: &str,
        params: &[SqlParam],
        cached: bool,
    ) -> Result<Vec<Vec<SqlCell>>, StoreError>;
}

/// `a OR b OR …` as a balanced tree: SQLite limits an expression's depth to 1,000, and a flat
/// chain of ORs is as deep as it is long.
fn any_of(d: &dyn Dialect, conds: &[String]) -> String {
    match conds {
        [] => d.bool(false).to_string(),
        [one] => one.clone(),
        _ => {
            let (a, b) = conds.split_at(conds.len() / 2);
            format!("({} OR {})", any_of(d, a), any_of(d, b))
        }
    }
}

fn k_bounds(type_no: i64) -> (i64, i64) {
    (type_no << TYPE_SHIFT, ((type_no + 1) << TYPE_SHIFT) - 1)
}

/// A search value compared with an indexed text: cut as the index cut it
/// ([`crate::index::index_text`]).
fn key(v: &str) -> SqlParam {
    text(index_text(v))
}

fn text(s: &str) -> SqlParam {
    SqlParam::Text(s.to_string())
}

/// Upper bound of all strings starting with `p` (for an index range scan).
fn prefix_upper(p: &str) -> String {
    format!("{p}\u{10FFFF}")
}

fn tables_of(kind: ParamKind) -> &'static [&'static str] {
    match kind {
        ParamKind::Token => &["idx_token", "idx_token_text"],
        ParamKind::String => &["idx_string"],
        ParamKind::Date => &["idx_date"],
        ParamKind::Number => &["idx_number"],
        ParamKind::Quantity => &["idx_quantity"],
        ParamKind::Reference => &["idx_reference", "idx_reference_identifier"],
        ParamKind::Uri => &["idx_uri"],
        ParamKind::Other => &[],
    }
}

/// A driving filter's index table, its row condition on alias `d`, and on alias `e` where the
/// dialect asks for it ([`Builder::driver`]).
type DriverRows = (&'static str, String, Option<String>);

/// SQL text plus its positional parameters.
struct Builder<'b> {
    backend: &'b dyn SearchBackend,
    d: &'b dyn Dialect,
    /// Render the next parameter filter as a correlated `EXISTS` probe instead of `IN`.
    probe: bool,
    params: Vec<SqlParam>,
}

impl<'b> Builder<'b> {
    fn new(backend: &'b dyn SearchBackend) -> Self {
        Builder {
            backend,
            d: backend.dialect(),
            probe: false,
            params: Vec::new(),
        }
    }

    fn p(&mut self, v: SqlParam) -> String {
        self.params.push(v);
        self.d
            .placeholder(self.params.len(), self.params.last().expect("pushed"))
    }

    fn t(&self, b: bool) -> String {
        self.d.bool(b).to_string()
    }

    fn type_no(&self, t: &str) -> Result<i64, StoreError> {
        // A type never written has no rows: -1 matches nothing.
        Ok(self.backend.type_no(t)?.unwrap_or(-1))
    }

    fn param_no(&self, code: &str) -> Result<i64, StoreError> {
        // A parameter never indexed has no rows: -1 matches nothing.
        Ok(self.backend.param_no(code)?.unwrap_or(-1))
    }

    /// `<kexpr>` satisfies `f` (a boolean SQL expression), for a resource of `resource_type`.
    fn filter(
        &mut self,
        resource_type: &str,
        f: &PlanFilter,
        kexpr: &str,
        idexpr: &str,
    ) -> Result<String, StoreError> {
        let type_no = self.type_no(resource_type)?;
        Ok(match f {
            PlanFilter::Param {
                on, values, negate, ..
            } => {
                let cond = match on {
                    ParamOn::Id => self.id_values(type_no, values, kexpr),
                    ParamOn::LastUpdated => self.last_updated_values(values, kexpr)?,
                    ParamOn::Index(pm) => self.param_values(type_no, pm, values, kexpr)?,
                };
                if *negate {
                    format!("NOT ({cond})")
                } else {
                    cond
                }
            }
            // Every resource has an id and a lastUpdated.
            PlanFilter::Missing {
                on: ParamOn::Id | ParamOn::LastUpdated,
                missing,
                ..
            } => self.t(!*missing),
            PlanFilter::Missing {
                on: ParamOn::Index(pm),
                kind,
                missing,
            } => {
                let tn = self.p(SqlParam::Int(type_no));
                let mut present = Vec::new();
                let ik = self.d.index_key("");
                for t in tables_of(*kind) {
                    let pmc = self.param_match(pm, t, "")?;
                    present.push(format!(
                        "{kexpr} IN (SELECT {ik} FROM {t} WHERE type_no = {tn} AND {pmc})"
                    ));
                }
                let present = any_of(self.d, &present);
                if *missing {
                    format!("NOT ({present})")
                } else {
                    format!("({present})")
                }
            }
            PlanFilter::Chain { param, targets } => {
                let mut alts = Vec::new();
                for ChainTarget { target_type, inner } in targets {
                    let tno = self.type_no(target_type)?;
                    let (lo, hi) = k_bounds(tno);
                    let inner_sql = self.filter(target_type, inner, "t.k", "t.id")?;
                    let tn = self.p(SqlParam::Int(type_no));
                    let pc = self.param_match(param, "idx_reference", "r.")?;
                    let ttp = self.p(text(target_type));
                    let lop = self.p(SqlParam::Int(lo));
                    let hip = self.p(SqlParam::Int(hi));
                    let rk = self.d.index_key("r.");
                    alts.push(format!(
                        "{kexpr} IN (SELECT {rk} FROM idx_reference r WHERE r.type_no = {tn} AND {pc} \
                         AND r.target_type = {ttp} AND r.target_id IN (SELECT t.id FROM resource_versions t \
                         WHERE t.k > {lop} AND t.k <= {hip} AND t.superseded_seq IS NULL AND t.deleted = 0 AND {inner_sql}))"
                    ));
                }
                if alts.is_empty() {
                    self.t(false)
                } else {
                    format!("({})", any_of(self.d, &alts))
                }
            }
            PlanFilter::Has {
                source_type,
                param,
                inner,
            } => {
                let sno = self.type_no(source_type)?;
                let rk = self.d.index_key("r.");
                let inner_sql = self.filter(source_type, inner, &rk, "")?;
                let sn = self.p(SqlParam::Int(sno));
                let pc = self.param_match(param, "idx_reference", "r.")?;
                let me = self.p(text(resource_type));
                format!(
                    "{idexpr} IN (SELECT r.target_id FROM idx_reference r WHERE r.type_no = {sn} AND {pc} \
                     AND r.target_type = {me} AND {inner_sql})"
                )
            }
        })
    }

    /// The driving index lookup of an equality filter (token, reference, uri values of one index
    /// table), as conditions on the table aliased `d` (and on `e`, see
    /// [`Dialect::driven_row_cond`]); `None` when the filter cannot drive.
    fn driver(&mut self, type_no: i64, f: &PlanFilter) -> Result<Option<DriverRows>, StoreError> {
        let PlanFilter::Param {
            on: ParamOn::Index(pm),
            kind,
            values,
            negate: false,
        } = f
        else {
            return Ok(None);
        };
        if !matches!(
            kind,
            ParamKind::Token | ParamKind::Reference | ParamKind::Uri
        ) || values.iter().any(|v| matches!(v, PlanValue::TokenText(_)))
        {
            return Ok(None);
        }
        let mut table = None;
        let mut conds = Vec::new();
        for v in values {
            let (t, c) = self.value_cond(v)?;
            if table.is_some_and(|x| x != t) {
                return Ok(None);
            }
            table = Some(t);
            conds.push(c);
        }
        let Some(table) = table else {
            return Ok(None);
        };
        let tn = self.p(SqlParam::Int(type_no));
        let pmc = self.param_match(pm, table, "d.")?;
        // The value conditions name no table: on `d` in the page's statement, on `e` in a
        // subquery over `e`.
        let values = any_of(self.d, &conds);
        let row_cond = if self.d.driven_row_cond() {
            let pme = self.param_match(pm, table, "e.")?;
            Some(format!("e.type_no = {tn} AND {pme} AND ({values})"))
        } else {
            None
        };
        Ok(Some((
            table,
            format!("d.type_no = {tn} AND {pmc} AND ({values})"),
            row_cond,
        )))
    }

    /// The parameter condition on an index table (columns prefixed with `a`): its own rows, or
    /// those of the parameters it is an alias of.
    /// Parameter codes are compared by their numbers (`param_no`); a code without a number
    /// has no rows, and -1 matches nothing.
    fn param_match(&mut self, pm: &ParamMatch, table: &str, a: &str) -> Result<String, StoreError> {
        Ok(match pm {
            ParamMatch::Alias { codes, ref_type } => {
                let mut list = Vec::with_capacity(codes.len());
                for c in codes {
                    let no = self.param_no(c)?;
                    list.push(self.p(SqlParam::Int(no)));
                }
                let mut s = format!("{a}param_no IN ({})", list.join(", "));
                if let (Some(t), "idx_reference") = (ref_type, table) {
                    let tp = self.p(text(t));
                    let (op, pattern) = self.d.url_has_type(t);
                    let gp = self.p(SqlParam::Text(pattern));
                    s = format!("{s} AND ({a}target_type = {tp} OR {a}url {op} {gp})");
                }
                s
            }
            ParamMatch::Own(code) => {
                let no = self.param_no(code)?;
                format!("{a}param_no = {}", self.p(SqlParam::Int(no)))
            }
        })
    }

    /// `_id` values against the id column. An id has no system: `id` and `|id` match, `sys|id`
    /// cannot.
    fn id_values(&mut self, type_no: i64, values: &[PlanValue], kexpr: &str) -> String {
        let ids: Vec<String> = values
            .iter()
            .filter_map(|v| match v {
                PlanValue::Token {
                    system,
                    code: Some(c),
                } if system.as_deref().is_none_or(str::is_empty) => Some(c.clone()),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return self.t(false);
        }
        let tn = self.p(SqlParam::Int(type_no));
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
        values: &[PlanValue],
        kexpr: &str,
    ) -> Result<String, StoreError> {
        let seq = format!("({kexpr} & {})", (1i64 << TYPE_SHIFT) - 1);
        let mut alts = Vec::new();
        for v in values {
            let PlanValue::Date { prefix, range } = v else {
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
                let s_lo = self.backend.seq_at_or_after(range.lo)?;
                self.p(SqlParam::Int(s_lo))
            } else {
                String::new()
            };
            let hi = if need_hi {
                let s_hi = self.backend.seq_at_or_after(range.hi)?;
                self.p(SqlParam::Int(s_hi))
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
            self.t(false)
        } else {
            format!("({})", any_of(self.d, &alts))
        })
    }

    /// An OR list of values of one parameter, grouped by index table.
    fn param_values(
        &mut self,
        type_no: i64,
        pm: &ParamMatch,
        values: &[PlanValue],
        kexpr: &str,
    ) -> Result<String, StoreError> {
        let mut by_table: Vec<(&'static str, Vec<String>)> = Vec::new();
        for v in values {
            let (table, cond) = self.value_cond(v)?;
            match by_table.iter_mut().find(|(t, _)| *t == table) {
                Some((_, conds)) => conds.push(cond),
                None => by_table.push((table, vec![cond])),
            }
        }
        let probe = std::mem::replace(&mut self.probe, false);
        let ni = self.d.no_index();
        let mut parts = Vec::new();
        for (table, conds) in by_table {
            let tn = self.p(SqlParam::Int(type_no));
            if probe {
                // A per-row lookup of the version's rows (see `run`).
                let pc = self.param_match(pm, table, ni)?;
                let rows = self.d.version_rows(table, kexpr);
                parts.push(format!(
                    "EXISTS (SELECT 1 FROM {table} WHERE {rows} AND {ni}type_no = {tn} AND {pc} AND ({}))",
                    any_of(self.d, &conds)
                ));
            } else {
                let pc = self.param_match(pm, table, "")?;
                let ik = self.d.index_key("");
                parts.push(format!(
                    "{kexpr} IN (SELECT {ik} FROM {table} WHERE type_no = {tn} AND {pc} AND ({}))",
                    any_of(self.d, &conds)
                ));
            }
        }
        Ok(if parts.is_empty() {
            self.t(false)
        } else {
            format!("({})", any_of(self.d, &parts))
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
            c.push(format!("{ccol} = {}", self.p(key(code))));
        }
        match system.as_deref() {
            None => {}
            Some("") => c.push(format!("{scol} IS NULL")),
            Some(s) => c.push(format!("{scol} = {}", self.p(key(s)))),
        }
        if c.is_empty() {
            self.t(true)
        } else {
            c.join(" AND ")
        }
    }

    /// [`Builder::token_cond`] on `idx_token` with systems by number: a system no token row
    /// was ever written with matches nothing (-1).
    fn numbered_token_cond(
        &mut self,
        system: &Option<String>,
        code: &Option<String>,
    ) -> Result<String, StoreError> {
        let mut c = Vec::new();
        if let Some(code) = code {
            c.push(format!("code = {}", self.p(key(code))));
        }
        match system.as_deref() {
            None => {}
            Some("") => c.push("system_no IS NULL".to_string()),
            Some(s) => {
                let no = self.backend.system_no(index_text(s))?.unwrap_or(-1);
                c.push(format!("system_no = {}", self.p(SqlParam::Int(no))));
            }
        }
        Ok(if c.is_empty() {
            self.t(true)
        } else {
            c.join(" AND ")
        })
    }

    fn prefix_cond(&mut self, col: &str, v: &str) -> String {
        let a = self.p(text(v));
        let b = self.p(text(&prefix_upper(v)));
        // The length is ours, not the client's: a literal (an integer the functions of every
        // backend accept).
        let n = v.chars().count();
        format!("({col} >= {a} AND {col} < {b} AND substr({col}, 1, {n}) = {a})")
    }

    fn number_cond(&mut self, col: &str, prefix: Prefix, d: &NumberRange) -> String {
        let v = self.p(SqlParam::Real(d.value));
        match prefix {
            Prefix::Eq | Prefix::Ne => {
                let lo = self.p(SqlParam::Real(d.lo));
                let hi = self.p(SqlParam::Real(d.hi));
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
                let (low, high) = d.ap_range();
                let (a, b) = (self.p(SqlParam::Real(low)), self.p(SqlParam::Real(high)));
                format!("({col} >= {a} AND {col} <= {b})")
            }
        }
    }

    /// The index table and the row condition of one search value.
    fn value_cond(&mut self, v: &PlanValue) -> Result<(&'static str, String), StoreError> {
        Ok(match v {
            PlanValue::Token { system, code } if self.d.token_system_numbers() => {
                ("idx_token", self.numbered_token_cond(system, code)?)
            }
            PlanValue::Token { system, code } => {
                ("idx_token", self.token_cond(system, code, "system", "code"))
            }
            PlanValue::TokenText(t) => ("idx_token_text", self.prefix_cond("text", index_text(t))),
            PlanValue::String { value, mode } => {
                let c = match mode {
                    StringMatch::Prefix => self.prefix_cond("normalized", index_text(value)),
                    StringMatch::Contains => {
                        let p = self.p(key(value));
                        self.d.contains("normalized", &p)
                    }
                    StringMatch::Exact => format!("exact = {}", self.p(text(value))),
                };
                ("idx_string", c)
            }
            PlanValue::Date { prefix, range } => {
                let plo = self.p(SqlParam::Int(range.lo));
                let phi = self.p(SqlParam::Int(range.hi));
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
            PlanValue::Number { prefix, value } => {
                ("idx_number", self.number_cond("value", *prefix, value))
            }
            PlanValue::Quantity {
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
            PlanValue::Reference { target_type, id } => {
                let mut c = format!("target_id = {}", self.p(key(id)));
                if let Some(t) = target_type {
                    c = format!("{c} AND target_type = {}", self.p(key(t)));
                }
                ("idx_reference", format!("({c})"))
            }
            PlanValue::ReferenceUrl(u) => ("idx_reference", format!("url = {}", self.p(key(u)))),
            PlanValue::ReferenceIdentifier { system, code } => (
                "idx_reference_identifier",
                format!("({})", self.token_cond(system, code, "system", "value")),
            ),
            PlanValue::Uri(u) => ("idx_uri", format!("uri = {}", self.p(key(u)))),
        })
    }

    /// The SQL expression of a sort key for the row `rv` (never NULL: missing values sort last).
    fn sort_expr(&mut self, type_no: i64, key: &SortKey) -> Result<String, StoreError> {
        let (pm, kind) = match &key.on {
            SortOn::Id => return Ok("rv.id".into()),
            SortOn::LastUpdated => return Ok("rv.seq".into()),
            SortOn::Index { param, kind } => (param, *kind),
        };
        let tn = self.p(SqlParam::Int(type_no));
        let agg = if key.descending { "max" } else { "min" };
        let max_text = self.d.max_text();
        let (table, col, missing) = match kind {
            ParamKind::Date => (
                "idx_date",
                if key.descending { "hi" } else { "lo" },
                if key.descending {
                    MISSING_DATE_DESC.to_string()
                } else {
                    MISSING_DATE_ASC.to_string()
                },
            ),
            ParamKind::String => (
                "idx_string",
                "normalized",
                if key.descending {
                    "''".into()
                } else {
                    max_text.into()
                },
            ),
            _ => (
                "idx_token",
                "code",
                if key.descending {
                    "''".into()
                } else {
                    max_text.into()
                },
            ),
        };
        // The no-index hint keeps the planner on the version's rows: one lookup per row, not a
        // scan of the parameter's rows.
        let ni = self.d.no_index();
        let pc = self.param_match(pm, table, ni)?;
        let lookup = self.d.key_lookup(
            &format!("{agg}({col})"),
            table,
            "rv.k",
            &format!("{ni}type_no = {tn} AND {pc}"),
        );
        Ok(format!("coalesce(({lookup}), {missing})"))
    }
}

/// A match of the page: its key, id, JSON (`None` when longer than 64 KiB, [`small_json!`]: read
/// apart, only when the page's [`SearchPlan::max_page_bytes`] takes it), the JSON's length
/// and the sort values.
type PageRow = (i64, String, Option<Vec<u8>>, usize, Vec<CursorValue>);

/// The select-list columns of a page row's JSON and its length (see [`page_row`]).
fn json_columns() -> &'static str {
    concat!(small_json!("rv.json"), ", length(rv.json)")
}

fn page_row(row: Vec<SqlCell>) -> Result<PageRow, StoreError> {
    let mut it = row.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| StoreError::Corrupt("search: short row".into()))
    };
    let k = next()?.int()?;
    let id = next()?.text()?;
    let json = match next()? {
        SqlCell::Null => None,
        cell => Some(cell.bytes()?),
    };
    let len = usize::try_from(next()?.int()?).unwrap_or(usize::MAX);
    let sorts = it.map(SqlCell::cursor_value).collect();
    Ok((k, id, json, len, sorts))
}

/// The stored JSON of the version with key `k`, read when its page row left it out.
fn json_of(
    backend: &dyn SearchBackend,
    k: i64,
    json: Option<Vec<u8>>,
) -> Result<Vec<u8>, StoreError> {
    if let Some(j) = json {
        return Ok(j);
    }
    let mut b = Builder::new(backend);
    let sql = format!(
        "SELECT json FROM resource_versions WHERE k = {}",
        b.p(SqlParam::Int(k))
    );
    match backend.query(&sql, &b.params, true)?.into_iter().next() {
        Some(row) => row
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt("search: short row".into()))?
            .bytes(),
        None => Err(StoreError::Corrupt(format!("search: version {k} vanished"))),
    }
}

/// Runs `plan` on `backend`: the count, one page of matches, its includes and the next cursor.
pub(crate) fn run(
    backend: &dyn SearchBackend,
    plan: &SearchPlan,
) -> Result<SearchRows, StoreError> {
    let d = backend.dialect();
    let mut b = Builder::new(backend);
    let type_no = b.type_no(&plan.resource_type)?;
    let (lo, hi) = k_bounds(type_no);
    let mut where_ = format!(
        "rv.k > {} AND rv.k <= {} AND rv.superseded_seq IS NULL AND rv.deleted = 0",
        b.p(SqlParam::Int(lo)),
        b.p(SqlParam::Int(hi))
    );
    // Selective filters (codes, references, strings, chains) drive the query as `IN` lists;
    // range filters (dates, negations) then become per-row probes, so a wide date range never
    // materializes its whole match set. With only range filters, the first one drives.
    let selective = |f: &PlanFilter| match f {
        PlanFilter::Param { kind, negate, .. } => !*negate && *kind != ParamKind::Date,
        PlanFilter::Chain { .. } | PlanFilter::Has { .. } => true,
        PlanFilter::Missing { .. } => false,
    };
    let any_selective = plan.filters.iter().any(selective);
    let mut driver_chosen = any_selective;
    let mut filter_sqls = Vec::with_capacity(plan.filters.len());
    for f in &plan.filters {
        b.probe = if selective(f) {
            false
        } else if !driver_chosen && matches!(f, PlanFilter::Param { negate: false, .. }) {
            driver_chosen = true;
            false
        } else {
            true
        };
        let c = b.filter(&plan.resource_type, f, "rv.k", "rv.id")?;
        b.probe = false;
        let c = match d.joined_filters() {
            Some(n) if filter_sqls.len() >= n => d.opaque(&c),
            _ => c,
        };
        filter_sqls.push(c);
    }
    if b.params.len() > MAX_SQL_PARAMS {
        return Err(StoreError::QueryTooLarge(format!(
            "{} parameters",
            b.params.len()
        )));
    }
    let base_where = where_.clone();
    for c in &filter_sqls {
        where_.push_str(" AND ");
        where_.push_str(c);
    }

    let mut out = SearchRows {
        included_complete: true,
        ..SearchRows::default()
    };
    if plan.count_total {
        let sql = format!("SELECT count(*) FROM resource_versions rv WHERE {where_}");
        let rows = backend.query(&sql, &b.params, false)?;
        let n = rows
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next())
            .ok_or_else(|| StoreError::Corrupt("search: no count".into()))?
            .int()?;
        out.total = Some(u64::try_from(n).unwrap_or(0));
    }
    if plan.page_size == 0 {
        return Ok(out);
    }

    let mut driven = None;
    if plan.sort.is_empty() {
        for (i, f) in plan.filters.iter().enumerate() {
            if let Some(d) = b.driver(type_no, f)? {
                driven = Some((i, d));
                break;
            }
        }
    }
    if let Some((i, (table, cond, row_cond))) = driven {
        // Pages in `k` order driven by an equality filter's index (whose entries end in `k`,
        // or in the rowid that gives it): the page stops after `count` matches instead of
        // collecting every match first.
        let mut w = base_where;
        for (j, c) in filter_sqls.iter().enumerate() {
            if j != i {
                w.push_str(" AND ");
                w.push_str(c);
            }
        }
        let after = plan.cursor.as_ref().map(|c| b.p(SqlParam::Int(c.key)));
        let limit = b.p(SqlParam::Int(i64::from(plan.page_size) + 1));
        let sql = d.driven_page(&DrivenPage {
            cols: &format!("rv.k, rv.id, {}", json_columns()),
            table,
            cond: &format!("{cond} AND {w}"),
            row_cond: row_cond.as_deref(),
            after: after.as_deref(),
            limit: &limit,
        });
        let rows = backend
            .query(&sql, &b.params, false)?
            .into_iter()
            .map(page_row)
            .collect::<Result<Vec<_>, _>>()?;
        return finish_page(backend, plan, out, rows);
    }
    let sort_exprs: Vec<String> = plan
        .sort
        .iter()
        .map(|k| b.sort_expr(type_no, k))
        .collect::<Result<_, _>>()?;
    let select_sorts: String = sort_exprs
        .iter()
        .enumerate()
        .map(|(i, e)| format!(", {e} AS s{i}"))
        .collect();
    let mut outer_where = b.t(true);
    if let Some(c) = &plan.cursor {
        if c.sort_values.len() != plan.sort.len() {
            return Err(StoreError::InvalidPlan(
                "cursor sort values do not match the sort keys".into(),
            ));
        }
        // (s0, s1, …, k) after the cursor, each key in its own direction; k always ascending.
        let mut cond = format!("k > {}", b.p(SqlParam::Int(c.key)));
        for (i, key) in plan.sort.iter().enumerate().rev() {
            let v = b.p(cursor_param(&c.sort_values[i]));
            let op = if key.descending { "<" } else { ">" };
            cond = format!("(s{i} {op} {v} OR (s{i} = {v} AND {cond}))");
        }
        outer_where = cond;
    }
    let order: String = plan
        .sort
        .iter()
        .enumerate()
        .map(|(i, k)| format!("s{i}{}, ", if k.descending { " DESC" } else { "" }))
        .collect::<String>()
        + "k";
    let limit = b.p(SqlParam::Int(i64::from(plan.page_size) + 1));
    let sql = format!(
        "SELECT * FROM (SELECT rv.k AS k, rv.id AS id, {small} AS json, \
         length(rv.json) AS json_len{select_sorts} FROM resource_versions rv WHERE {where_}) AS page \
         WHERE {outer_where} ORDER BY {order} LIMIT {limit}",
        small = small_json!("rv.json")
    );
    let rows = backend
        .query(&sql, &b.params, false)?
        .into_iter()
        .map(page_row)
        .collect::<Result<Vec<_>, _>>()?;
    finish_page(backend, plan, out, rows)
}

/// Cuts the extra row into a cursor and adds the includes.
fn finish_page(
    backend: &dyn SearchBackend,
    plan: &SearchPlan,
    mut out: SearchRows,
    mut rows: Vec<PageRow>,
) -> Result<SearchRows, StoreError> {
    let page_size = plan.page_size as usize;
    // The page ends at `page_size` matches, or before the first match (never the page's
    // first) that would take its stored JSON over `max_page_bytes`.
    let (end, used) = page_cut(
        rows.iter().take(page_size).map(|r| r.3),
        plan.max_page_bytes,
    );
    if rows.len() > end {
        rows.truncate(end);
        if let Some((k, _, _, _, sorts)) = rows.last() {
            out.next = Some(PageCursor {
                sort_values: sorts.clone(),
                key: *k,
            });
        }
    }
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut page_refs: Vec<(String, String, i64)> = Vec::new();
    for (k, id, json, _, _) in rows {
        seen.insert((plan.resource_type.clone(), id.clone()));
        page_refs.push((plan.resource_type.clone(), id, k));
        out.matches.push(json_of(backend, k, json)?);
    }
    if !plan.includes.is_empty() || !plan.revincludes.is_empty() {
        let room = plan.max_page_bytes.saturating_sub(used);
        let (included, complete) = includes(backend, plan, page_refs, &mut seen, room)?;
        out.included = included;
        out.included_complete = complete;
    }
    Ok(out)
}

/// `_include` and `_revinclude` (with `:iterate` up to [`MAX_INCLUDE_ROUNDS`] more rounds), at
/// most `plan.max_included` resources of at most `room` bytes of stored JSON together; the flag
/// is false when some were left out at either limit.
fn includes(
    backend: &dyn SearchBackend,
    plan: &SearchPlan,
    mut frontier: Vec<(String, String, i64)>,
    seen: &mut HashSet<(String, String)>,
    mut room: usize,
) -> Result<(Vec<Vec<u8>>, bool), StoreError> {
    let max = plan.max_included;
    let mut out = Vec::new();
    let mut type_nos: HashMap<String, i64> = HashMap::new();
    let mut type_no = |t: &str| -> Result<i64, StoreError> {
        if let Some(n) = type_nos.get(t) {
            return Ok(*n);
        }
        let n = backend.type_no(t)?.unwrap_or(-1);
        type_nos.insert(t.to_string(), n);
        Ok(n)
    };
    for round in 0..=MAX_INCLUDE_ROUNDS {
        let applies = |inc: &IncludeSpec| round == 0 || inc.iterate;
        let mut next = Vec::new();
        for inc in plan.includes.iter().filter(|i| applies(i)) {
            for (t, _, k) in frontier.iter().filter(|(t, _, _)| *t == inc.source_type) {
                let tno = type_no(t)?;
                let targets = include_targets(backend, tno, *k, inc)?;
                for (tt, tid) in targets {
                    if seen.insert((tt.clone(), tid.clone())) {
                        let ttno = type_no(&tt)?;
                        if let Some((k2, json)) = read_current(backend, ttno, &tid)? {
                            if out.len() >= max || json.len() > room {
                                return Ok((out, false));
                            }
                            room -= json.len();
                            out.push(json);
                            next.push((tt, tid, k2));
                        }
                    }
                }
            }
        }
        for inc in plan.revincludes.iter().filter(|i| applies(i)) {
            let sno = type_no(&inc.source_type)?;
            for (t, id, _) in &frontier {
                if inc.target_types.as_ref().is_some_and(|tt| !tt.contains(t)) {
                    continue;
                }
                // One more than may still be added: enough to tell that the limit was reached.
                let slots = max.saturating_sub(out.len()).saturating_add(1);
                for (k2, sid, json, len, _) in revinclude_sources(backend, sno, inc, t, id, slots)?
                {
                    if seen.insert((inc.source_type.clone(), sid.clone())) {
                        if out.len() >= max || len > room {
                            return Ok((out, false));
                        }
                        room -= len;
                        out.push(json_of(backend, k2, json)?);
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
    backend: &dyn SearchBackend,
    type_no: i64,
    k: i64,
    inc: &IncludeSpec,
) -> Result<Vec<(String, String)>, StoreError> {
    // Restricted to no type (a client that may read none of the targets): nothing is read.
    if inc.target_types.as_ref().is_some_and(Vec::is_empty) {
        return Ok(Vec::new());
    }
    let mut b = Builder::new(backend);
    let ni = b.d.no_index();
    let kp = b.p(SqlParam::Int(k));
    let rows = b.d.version_rows("idx_reference", &kp);
    let mut sql = format!(
        "SELECT target_type, target_id FROM idx_reference WHERE {rows} AND {ni}type_no = {} AND target_id IS NOT NULL",
        b.p(SqlParam::Int(type_no))
    );
    if let Some(pm) = &inc.param {
        let pmc = b.param_match(pm, "idx_reference", ni)?;
        sql.push_str(&format!(" AND {pmc}"));
    }
    if let Some(types) = &inc.target_types {
        let list: Vec<String> = types.iter().map(|t| b.p(text(t))).collect();
        sql.push_str(&format!(" AND target_type IN ({})", list.join(", ")));
    }
    backend
        .query(&sql, &b.params, true)?
        .into_iter()
        .map(|r| {
            let mut it = r.into_iter();
            match (it.next(), it.next()) {
                (Some(t), Some(id)) => Ok((t.text()?, id.text()?)),
                _ => Err(StoreError::Corrupt("search: short row".into())),
            }
        })
        .collect()
}

fn revinclude_sources(
    backend: &dyn SearchBackend,
    source_type_no: i64,
    inc: &IncludeSpec,
    target_type: &str,
    target_id: &str,
    limit: usize,
) -> Result<Vec<PageRow>, StoreError> {
    let mut b = Builder::new(backend);
    let rk = b.d.index_key("r.");
    let mut sql = format!(
        "SELECT DISTINCT rv.k, rv.id, {} FROM idx_reference r JOIN resource_versions rv ON rv.k = {rk} \
         WHERE r.type_no = {} AND r.target_id = {} AND r.target_type = {}",
        json_columns(),
        b.p(SqlParam::Int(source_type_no)),
        b.p(text(target_id)),
        b.p(text(target_type))
    );
    if let Some(pm) = &inc.param {
        let pmc = b.param_match(pm, "idx_reference", "r.")?;
        sql.push_str(&format!(" AND {pmc}"));
    }
    let limit = b.p(SqlParam::Int(i64::try_from(limit).unwrap_or(i64::MAX)));
    sql.push_str(&format!(" ORDER BY rv.k LIMIT {limit}"));
    backend
        .query(&sql, &b.params, true)?
        .into_iter()
        .map(page_row)
        .collect()
}

fn read_current(
    backend: &dyn SearchBackend,
    type_no: i64,
    id: &str,
) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
    let mut b = Builder::new(backend);
    let sql = format!(
        "SELECT k, json FROM resource_versions WHERE type_no = {} AND id = {} \
         AND superseded_seq IS NULL AND deleted = 0",
        b.p(SqlParam::Int(type_no)),
        b.p(text(id))
    );
    let Some(row) = backend.query(&sql, &b.params, true)?.into_iter().next() else {
        return Ok(None);
    };
    let mut it = row.into_iter();
    match (it.next(), it.next()) {
        (Some(k), Some(json)) => Ok(Some((k.int()?, json.bytes()?))),
        _ => Err(StoreError::Corrupt("search: short row".into())),
    }
}

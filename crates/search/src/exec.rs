//! Execution of a typed [`SearchQuery`]: compiled into the store's backend-neutral
//! [`SearchPlan`] (parameter storage resolved through the [`registry`], values in the forms the
//! indexer wrote), run by [`Store::search`] (which owns all SQL), and the rows turned into a
//! [`SearchPage`]. The cursor the client carries is the plan's keyset position, hex-encoded JSON.
//!
//! The meaning of every value is the one of [`crate::matching`] (the store's translation is held
//! to it by the tests).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fhir_model::SearchParamType;
use serde_json::Value as Json;
use store::plan::{
    ChainTarget, CursorValue, IncludeSpec, MsRange, NumberRange, PageCursor, ParamKind, ParamMatch,
    ParamOn, PlanFilter, PlanValue, SearchPlan, SearchRows, SortOn, StopCheck,
};
use store::{Store, StoreError};

use crate::bundle::{PageRows, SearchPage};
use crate::error::SearchError;
use crate::query::{Filter, Include, SearchQuery, TotalMode, Value};
use crate::registry::{self, Storage};
use crate::values::Decimal;

impl From<StoreError> for SearchError {
    /// A stopped search is [`SearchError::Cancelled`] (told apart from a timeout by
    /// [`execute_with`]); a statement beyond what the database takes is the request's size, not
    /// a server fault: 400 too-costly.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Cancelled => SearchError::Cancelled,
            StoreError::QueryTooLarge(_) => {
                SearchError::too_costly("", "the search is too large; use fewer values")
            }
            e @ StoreError::Unavailable { .. } => SearchError::Unavailable(e.to_string()),
            e => SearchError::Store(e.to_string()),
        }
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

    /// The same control with its time limit counted from now; a cancellation reaches both.
    pub fn restarted(&self) -> SearchControl {
        SearchControl {
            cancelled: self.cancelled.clone(),
            deadline: Instant::now().checked_add(self.limit),
            limit: self.limit,
        }
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
    /// Bytes of stored JSON one page may hold, matches and included resources together
    /// ([`store::plan::SearchPlan::max_page_bytes`]): the page ends early, with a next link.
    pub max_page_bytes: usize,
}

impl ExecOptions {
    /// The options of a search run under `limits` (its time limit, include and page-bytes
    /// bounds), and the guard that stops it when dropped: an async handler holds the guard, so
    /// that the blocking search stops when the client goes away.
    pub fn under(limits: &crate::query::SearchLimits) -> (ExecOptions, CancelOnDrop) {
        let control = SearchControl::new(limits.timeout);
        let guard = control.cancel_on_drop();
        let exec = ExecOptions {
            control: Some(control),
            max_included: limits.max_included,
            max_page_bytes: limits.max_page_bytes,
        };
        (exec, guard)
    }

    /// These options with the time limit counted from now (the cancellation shared): for a
    /// search set up before it waits, e.g. a conditional create's condition, which waits for
    /// its lock and then has the whole time limit, as any search.
    pub fn from_now(&self) -> ExecOptions {
        ExecOptions {
            control: self.control.as_ref().map(SearchControl::restarted),
            ..self.clone()
        }
    }
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            control: None,
            max_included: usize::MAX,
            max_page_bytes: store::plan::DEFAULT_MAX_PAGE_BYTES,
        }
    }
}

fn kind(k: SearchParamType) -> ParamKind {
    match k {
        SearchParamType::Token => ParamKind::Token,
        SearchParamType::String => ParamKind::String,
        SearchParamType::Date => ParamKind::Date,
        SearchParamType::Number => ParamKind::Number,
        SearchParamType::Quantity => ParamKind::Quantity,
        SearchParamType::Reference => ParamKind::Reference,
        SearchParamType::Uri => ParamKind::Uri,
        SearchParamType::Composite | SearchParamType::Special => ParamKind::Other,
    }
}

/// The index rows of a parameter: its own, or those of the parameters it is an alias of.
fn param_match(resource_type: &str, code: &str) -> ParamMatch {
    match registry::storage(resource_type, code) {
        Some(Storage::Alias { codes, ref_type }) => ParamMatch::Alias { codes, ref_type },
        _ => ParamMatch::Own(code.to_string()),
    }
}

fn param_on(resource_type: &str, code: &str) -> ParamOn {
    match registry::storage(resource_type, code) {
        Some(Storage::Id) => ParamOn::Id,
        Some(Storage::LastUpdated) => ParamOn::LastUpdated,
        _ => ParamOn::Index(param_match(resource_type, code)),
    }
}

fn number(d: &Decimal) -> NumberRange {
    NumberRange {
        value: d.value,
        lo: d.lo,
        hi: d.hi,
    }
}

fn plan_value(v: &Value) -> PlanValue {
    match v {
        Value::Token { system, code } => PlanValue::Token {
            system: system.clone(),
            code: code.clone(),
        },
        Value::TokenText(t) => PlanValue::TokenText(t.clone()),
        Value::String { value, mode } => PlanValue::String {
            value: value.clone(),
            mode: *mode,
        },
        Value::Date { prefix: p, range } => PlanValue::Date {
            prefix: *p,
            range: MsRange {
                lo: range.lo,
                hi: range.hi,
            },
        },
        Value::Number { prefix: p, value } => PlanValue::Number {
            prefix: *p,
            value: number(value),
        },
        Value::Quantity {
            prefix: p,
            value,
            system,
            code,
        } => PlanValue::Quantity {
            prefix: *p,
            value: number(value),
            system: system.clone(),
            code: code.clone(),
        },
        Value::Reference { target_type, id } => PlanValue::Reference {
            target_type: target_type.clone(),
            id: id.clone(),
        },
        Value::ReferenceUrl(u) => PlanValue::ReferenceUrl(u.clone()),
        Value::ReferenceIdentifier { system, code } => PlanValue::ReferenceIdentifier {
            system: system.clone(),
            code: code.clone(),
        },
        Value::Uri(u) => PlanValue::Uri(u.clone()),
    }
}

/// A filter on `resource_type` as a plan condition.
fn plan_filter(resource_type: &str, f: &Filter) -> PlanFilter {
    match f {
        Filter::Param {
            code,
            kind: k,
            values,
            negate,
        } => PlanFilter::Param {
            on: param_on(resource_type, code),
            kind: kind(*k),
            values: values.iter().map(plan_value).collect(),
            negate: *negate,
        },
        Filter::Missing { code, missing } => PlanFilter::Missing {
            on: param_on(resource_type, code),
            kind: fhir_model::r4()
                .search_param(resource_type, code)
                .map_or(ParamKind::Token, |p| kind(p.kind)),
            missing: *missing,
        },
        Filter::Chain {
            code,
            target_types,
            inner,
        } => PlanFilter::Chain {
            param: param_match(resource_type, code),
            targets: target_types
                .iter()
                .map(|tt| ChainTarget {
                    target_type: tt.clone(),
                    inner: Box::new(plan_filter(tt, inner)),
                })
                .collect(),
        },
        Filter::Has {
            source_type,
            ref_code,
            inner,
        } => PlanFilter::Has {
            source_type: source_type.clone(),
            param: param_match(source_type, ref_code),
            inner: Box::new(plan_filter(source_type, inner)),
        },
    }
}

fn include_spec(inc: &Include) -> IncludeSpec {
    IncludeSpec {
        source_type: inc.source_type.clone(),
        param: inc
            .param
            .as_deref()
            .map(|p| param_match(&inc.source_type, p)),
        target_types: inc.target_types(),
        iterate: inc.iterate,
    }
}

/// Compiles `q` into the store's [`SearchPlan`], with at most `max_included` included
/// resources. Fails only on a malformed `_cursor` (400).
pub fn compile(q: &SearchQuery, max_included: usize) -> Result<SearchPlan, SearchError> {
    let only_total = !q.returns_resources();
    // A cursor only matters for a page of matches (a count ignores it, as it always did).
    let cursor = match &q.cursor {
        Some(c) if !only_total => Some(decode_cursor(c, q.sort.len())?),
        _ => None,
    };
    let sort: Vec<store::plan::SortKey> = q
        .sort
        .iter()
        .map(|k| store::plan::SortKey {
            on: match k.code.as_str() {
                "_id" => SortOn::Id,
                "_lastUpdated" => SortOn::LastUpdated,
                code => SortOn::Index {
                    param: param_match(&q.resource_type, code),
                    kind: kind(k.kind),
                },
            },
            descending: k.descending,
        })
        .collect();
    if let Some(c) = &cursor
        && !cursor_fits(c, &sort)
    {
        return Err(SearchError::invalid("_cursor", "malformed paging cursor"));
    }
    Ok(SearchPlan {
        resource_type: q.resource_type.clone(),
        filters: q
            .filters
            .iter()
            .map(|f| plan_filter(&q.resource_type, f))
            .collect(),
        sort,
        page_size: if only_total { 0 } else { q.count },
        count_total: q.total == TotalMode::Accurate || only_total,
        cursor,
        includes: q.includes.iter().map(include_spec).collect(),
        revincludes: q.revincludes.iter().map(include_spec).collect(),
        max_included,
        max_page_bytes: store::plan::DEFAULT_MAX_PAGE_BYTES,
    })
}

/// Whether each sort value of a cursor has the type its key's values have (an integer for
/// `_lastUpdated` and dates, text otherwise), as every cursor this server wrote does. A cursor
/// edited by the client is refused here: PostgreSQL refused to compare the values of another
/// type (a 500), where SQLite compared them anyway; nor does a PostgreSQL text hold a NUL.
fn cursor_fits(c: &PageCursor, sort: &[store::plan::SortKey]) -> bool {
    c.sort_values.len() == sort.len()
        && c.sort_values.iter().zip(sort).all(|(v, k)| {
            let int = match &k.on {
                SortOn::Id => false,
                SortOn::LastUpdated => true,
                SortOn::Index { kind, .. } => *kind == store::plan::ParamKind::Date,
            };
            match v {
                CursorValue::Int(_) => int,
                CursorValue::Text(t) => !int && !t.contains('\0'),
                CursorValue::Real(_) | CursorValue::Null => false,
            }
        })
}

/// A sort value as stored in a cursor.
fn cursor_value_to_json(v: &CursorValue) -> Json {
    match v {
        CursorValue::Int(i) => Json::from(*i),
        CursorValue::Real(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        CursorValue::Text(t) => Json::String(t.clone()),
        CursorValue::Null => Json::Null,
    }
}

fn json_to_cursor_value(v: &Json) -> CursorValue {
    match v {
        Json::Number(n) => n
            .as_i64()
            .map(CursorValue::Int)
            .unwrap_or_else(|| CursorValue::Real(n.as_f64().unwrap_or(0.0))),
        Json::String(s) => CursorValue::Text(s.clone()),
        _ => CursorValue::Null,
    }
}

/// Decodes a `_cursor`: the sort values and row key of the last row of the previous page.
fn decode_cursor(c: &str, nkeys: usize) -> Result<PageCursor, SearchError> {
    let bad = || SearchError::invalid("_cursor", "malformed paging cursor");
    let bytes = hex::decode(c).map_err(|_| bad())?;
    let v: Json = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let a = v.as_array().ok_or_else(bad)?;
    if a.len() != nkeys + 1 {
        return Err(bad());
    }
    let key = a[nkeys].as_i64().ok_or_else(bad)?;
    Ok(PageCursor {
        sort_values: a[..nkeys].iter().map(json_to_cursor_value).collect(),
        key,
    })
}

fn encode_cursor(c: &PageCursor) -> String {
    let mut a: Vec<Json> = c.sort_values.iter().map(cursor_value_to_json).collect();
    a.push(Json::from(c.key));
    hex::encode(Json::Array(a).to_string())
}

/// Runs a search: one page of matches, includes, total and next cursor.
pub fn execute(store: &dyn Store, q: &SearchQuery) -> Result<SearchPage, SearchError> {
    execute_with(store, q, &ExecOptions::default())
}

/// [`execute`] that stops when `opts.control` says so ([`SearchError::Timeout`] past its time
/// limit, [`SearchError::Cancelled`] when cancelled) and bounds the included resources.
pub fn execute_with(
    store: &dyn Store,
    q: &SearchQuery,
    opts: &ExecOptions,
) -> Result<SearchPage, SearchError> {
    execute_rows(store, q, opts)?.parse()
}

/// [`execute_with`] leaving each resource as the store keeps it (JSON bytes), for
/// [`crate::bundle::write_searchset`].
pub fn execute_rows(
    store: &dyn Store,
    q: &SearchQuery,
    opts: &ExecOptions,
) -> Result<PageRows, SearchError> {
    let plan = SearchPlan {
        max_page_bytes: opts.max_page_bytes,
        ..compile(q, opts.max_included)?
    };
    let stop: Option<StopCheck> = opts
        .control
        .clone()
        .map(|c| Arc::new(move || c.should_stop()) as StopCheck);
    match store.search(&plan, stop.as_ref()) {
        Ok(rows) => page(q, &plan, rows),
        Err(StoreError::Cancelled) => match &opts.control {
            Some(c) if c.timed_out() => Err(SearchError::Timeout { limit: c.limit }),
            _ => Err(SearchError::Cancelled),
        },
        Err(e) => Err(e.into()),
    }
}

/// The rows of a plan as a [`PageRows`].
fn page(q: &SearchQuery, plan: &SearchPlan, rows: SearchRows) -> Result<PageRows, SearchError> {
    let included = rows.included.len();
    let mut page = PageRows {
        matches: rows.matches,
        included: rows.included,
        total: rows.total,
        next_cursor: rows.next.as_ref().map(encode_cursor),
        warnings: Vec::new(),
    };
    if !rows.included_complete {
        tracing::info!(
            resource_type = %q.resource_type,
            limit = plan.max_included,
            "included resources left out at the limit"
        );
        page.warnings.push(format!(
            "only the first {} included resources are in this page (the server's limits: {} resources, {} bytes in a page); ask for a smaller _count or fewer includes to get them all",
            included,
            plan.max_included,
            plan.max_page_bytes
        ));
    }
    Ok(page)
}

/// The whole `GET /[type]` / `POST /[type]/_search` flow for the server: parse the request's
/// (name, value) pairs, run the page, and build the searchset Bundle. `base` is the server's
/// base URL (links and `fullUrl`s). Errors carry their HTTP status and OperationOutcome
/// ([`SearchError::http_status`], [`SearchError::operation_outcome`]).
pub fn search_bundle(
    store: &dyn Store,
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
    Ok(crate::bundle::into_searchset_bundle(base, &q, params, page))
}

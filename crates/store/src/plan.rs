//! The backend-neutral search plan: what the search crate compiles a FHIR search into, and what
//! every backend's [`crate::Store::search`] turns into its own SQL (see `sql_plan`, shared by the
//! SQLite and PostgreSQL backends through a small dialect).
//!
//! A plan is pure data with everything the search crate knows already resolved: which index rows
//! a parameter reads (its own, the rows of the parameters it is an alias of, the `id` column, the
//! version's `lastUpdated`), values normalized into the comparable forms the indexer wrote
//! (normalized text, millisecond ranges, decimal ranges), chains and `_has` as nested filters.
//! What only the store knows stays in the store: type numbers, row keys, seqs, SQL.
//!
//! Meaning (the same as the search crate's in-memory `matching`): the [`SearchPlan::filters`]
//! are ANDed; the values of one [`PlanFilter::Param`] are ORed. Only current, non-deleted
//! versions match.

/// Comparison prefixes of number, date and quantity values (FHIR search semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// How a string value is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringMatch {
    /// Prefix of the normalized text (the default).
    Prefix,
    /// Equality with the raw (exact) text.
    Exact,
    /// Substring of the normalized text.
    Contains,
}

/// A half-open millisecond range `[lo, hi)` (UTC, since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsRange {
    pub lo: i64,
    pub hi: i64,
}

/// A decimal search value: its value and the range its precision implies (`[lo, hi)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumberRange {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl NumberRange {
    /// The numbers an `ap` search matches, `[low, high]` ([`ap_range`]).
    pub fn ap_range(&self) -> (f64, f64) {
        ap_range(self.value, self.lo, self.hi)
    }
}

/// The numbers an `ap` search of `value` (precision range `[lo, hi)`) matches, both ends
/// included: within 10 % of the value, or within its precision's half width when that is wider
/// (FHIR leaves `ap` to the server). Near `f64::MAX` the precision range's far end overflows to
/// infinity (`ap` of `f64::MAX`: `hi` is +∞); the half width is then taken from the finite end, else
/// `ap` would match every number, negative ones included. A range rather than
/// `abs(x - value) <= tolerance`: the subtraction overflows (PostgreSQL raises an error), and a
/// range can use the value index. Search's in-memory matching takes it from here, so both say
/// the same.
pub fn ap_range(value: f64, lo: f64, hi: f64) -> (f64, f64) {
    let half = match (hi - value, value - lo) {
        (up, _) if up.is_finite() => up,
        (_, down) => down,
    };
    let tolerance = (value.abs() * 0.1).max(half);
    (value - tolerance, value + tolerance)
}

/// The kind of a search parameter, which decides its index table(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    String,
    Date,
    Number,
    Quantity,
    Reference,
    Uri,
    /// Composite and special parameters: no index rows.
    Other,
}

/// Which index rows stand for a parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamMatch {
    /// The parameter's own rows (index rows carry the parameter code).
    Own(String),
    /// A parameter with no rows of its own: the union of the rows of `codes`; on reference rows
    /// further restricted to targets of `ref_type` (`patient` = `subject` to a Patient).
    Alias {
        codes: Vec<String>,
        ref_type: Option<String>,
    },
}

/// Where a parameter's values are compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamOn {
    /// Index rows of the parameter.
    Index(ParamMatch),
    /// `_id`: the resource id (token values; only those without a system can match).
    Id,
    /// `_lastUpdated`: the version's `lastUpdated` (date values).
    LastUpdated,
}

/// One value of an OR list, in the form the index holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanValue {
    /// `system|code`; `system: Some("")` means "no system"; `None` means any.
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    /// Prefix of the normalized display text of a token (`:text`).
    TokenText(String),
    /// A string value, normalized for prefix/contains, raw for exact.
    String {
        value: String,
        mode: StringMatch,
    },
    Date {
        prefix: Prefix,
        range: MsRange,
    },
    Number {
        prefix: Prefix,
        value: NumberRange,
    },
    /// A quantity; without a system, `code` also matches the unit text.
    Quantity {
        prefix: Prefix,
        value: NumberRange,
        system: Option<String>,
        code: Option<String>,
    },
    /// A local reference `Type/id` (any type when `None`).
    Reference {
        target_type: Option<String>,
        id: String,
    },
    /// An absolute reference URL, compared as written.
    ReferenceUrl(String),
    /// `:identifier` of a reference.
    ReferenceIdentifier {
        system: Option<String>,
        code: Option<String>,
    },
    Uri(String),
}

/// One target type of a chain, with the condition the referenced resource must meet.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainTarget {
    pub target_type: String,
    pub inner: Box<PlanFilter>,
}

/// One condition on the resources of a type.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanFilter {
    /// Some value of `values` matches (with `negate`, `:not`: none does, resources without the
    /// element included). `kind` is the parameter's kind (a backend uses it to order its
    /// lookups: dates and negations are range probes, the others are selective).
    Param {
        on: ParamOn,
        kind: ParamKind,
        values: Vec<PlanValue>,
        negate: bool,
    },
    /// `:missing=true|false`.
    Missing {
        on: ParamOn,
        kind: ParamKind,
        missing: bool,
    },
    /// Chain `ref[:Type].inner`: the resource references, through `param`, a resource of one of
    /// the target types that meets that target's condition.
    Chain {
        param: ParamMatch,
        targets: Vec<ChainTarget>,
    },
    /// `_has:Type:ref:inner`: some resource of `source_type` references this one through its
    /// parameter `param` and meets `inner` (a condition on the `source_type` resource).
    Has {
        source_type: String,
        param: ParamMatch,
        inner: Box<PlanFilter>,
    },
}

/// What a sort key orders by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortOn {
    Id,
    LastUpdated,
    /// A date (by range start ascending, range end descending), string (normalized) or token
    /// (code) parameter; resources without a value sort last.
    Index {
        param: ParamMatch,
        kind: ParamKind,
    },
}

/// A `_sort` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub on: SortOn,
    pub descending: bool,
}

/// A sort value in a [`PageCursor`].
#[derive(Debug, Clone, PartialEq)]
pub enum CursorValue {
    Int(i64),
    Real(f64),
    Text(String),
    Null,
}

/// Keyset position after the last row of a page: its sort values (one per [`SortKey`]) and its
/// row key (an opaque store value that breaks ties). The search crate carries it to the client
/// opaquely and hands it back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct PageCursor {
    pub sort_values: Vec<CursorValue>,
    pub key: i64,
}

/// `_include` / `_revinclude`: references from `source_type` through `param` (all reference
/// parameters when `None`), to `target_types` only when set (for an `_include`: the types it
/// may fetch, none when empty; for a `_revinclude`: the types of the resources referred to);
/// `iterate` follows them again from the resources they added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncludeSpec {
    pub source_type: String,
    pub param: Option<ParamMatch>,
    pub target_types: Option<Vec<String>>,
    pub iterate: bool,
}

/// How many `:iterate` rounds of includes are followed after the first.
pub const MAX_INCLUDE_ROUNDS: usize = 3;

/// A compiled search of one resource type.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchPlan {
    pub resource_type: String,
    /// ANDed conditions.
    pub filters: Vec<PlanFilter>,
    /// Sort keys; rows with equal keys (or no keys) come in row-key order.
    pub sort: Vec<SortKey>,
    /// Matches per page; 0 asks for no matches (only the total).
    pub page_size: u32,
    /// Count every match (`_total=accurate`, `_summary=count`, `_count=0`).
    pub count_total: bool,
    /// Continue after this position (from [`SearchRows::next`] of the previous page).
    pub cursor: Option<PageCursor>,
    pub includes: Vec<IncludeSpec>,
    pub revincludes: Vec<IncludeSpec>,
    /// At most this many included resources are returned (the rest are left out and
    /// [`SearchRows::included_complete`] is false).
    pub max_included: usize,
    /// Bytes of stored JSON one page may hold, matches and included resources together: a page
    /// ends before the match that would go over it (with a cursor to the next; never before
    /// its first match), and included resources beyond it are left out as beyond
    /// `max_included`. Without it a page of 1,000 large resources (attachments) was held in
    /// memory whole.
    pub max_page_bytes: usize,
}

/// The default of [`SearchPlan::max_page_bytes`] (`--search-max-page-bytes`).
pub const DEFAULT_MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;

/// The answer of [`crate::Store::search`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchRows {
    /// Stored JSON of the matches of the page, in order.
    pub matches: Vec<Vec<u8>>,
    /// Stored JSON of the resources the includes added (each resource once, not a match).
    pub included: Vec<Vec<u8>>,
    /// False when included resources were left out at [`SearchPlan::max_included`] or
    /// [`SearchPlan::max_page_bytes`].
    pub included_complete: bool,
    /// The number of all matches when [`SearchPlan::count_total`].
    pub total: Option<u64>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageCursor>,
}

/// A stop check for a running search (client gone, time limit), asked while statements run.
pub type StopCheck = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

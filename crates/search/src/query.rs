//! The typed search query and its parser: from a resource type and the (name, value) pairs of a
//! GET query or form body to a validated [`SearchQuery`].

use fhir_model::{SearchParamType, r4};

use crate::elements::{check_combination, parse_elements, summary_of};
use crate::error::SearchError;
use crate::subset::Summary;
use crate::values::{self, DateRange, Decimal};

/// Comparison prefixes and string modes are the store plan's own types (the query hands them to
/// the plan unchanged).
pub use store::plan::{Prefix, StringMatch};

/// The prefix a number, date or quantity value starts with (`eq`, `gt`, ...), if any.
fn parse_prefix(s: &str) -> Option<Prefix> {
    Some(match s {
        "eq" => Prefix::Eq,
        "ne" => Prefix::Ne,
        "gt" => Prefix::Gt,
        "lt" => Prefix::Lt,
        "ge" => Prefix::Ge,
        "le" => Prefix::Le,
        "sa" => Prefix::Sa,
        "eb" => Prefix::Eb,
        "ap" => Prefix::Ap,
        _ => return None,
    })
}

/// One value of an OR list, typed by the parameter's type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `system|code`, `|code` (system absent: `Some("")`), `system|` (any code), `code` (any system).
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    /// `:text` on a token: normalized prefix of Coding.display / CodeableConcept.text.
    TokenText(String),
    /// Normalized (for prefix/contains) or raw (for exact) text.
    String {
        value: String,
        mode: StringMatch,
    },
    Date {
        prefix: Prefix,
        range: DateRange,
    },
    Number {
        prefix: Prefix,
        value: Decimal,
    },
    Quantity {
        prefix: Prefix,
        value: Decimal,
        system: Option<String>,
        code: Option<String>,
    },
    /// `Type/id` or a bare `id` (type `None`, or fixed by a `:Type` modifier).
    Reference {
        target_type: Option<String>,
        id: String,
    },
    /// An absolute URL reference that is not one of ours: compared as written.
    ReferenceUrl(String),
    /// `:identifier` on a reference: matches `Reference.identifier`.
    ReferenceIdentifier {
        system: Option<String>,
        code: Option<String>,
    },
    Uri(String),
}

/// One search condition; the conditions of a [`SearchQuery`] are ANDed.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// A parameter of the searched type with an OR list of values. `negate` is `:not`: the
    /// resource matches when no value matches (resources without the element included).
    Param {
        code: String,
        kind: SearchParamType,
        values: Vec<Value>,
        negate: bool,
    },
    /// `:missing=true|false`.
    Missing { code: String, missing: bool },
    /// `ref[:Type].inner`: some resource of `target_types` referenced through `ref` matches `inner`.
    Chain {
        code: String,
        target_types: Vec<String>,
        inner: Box<Filter>,
    },
    /// `_has:Type:ref:inner`: some resource of `source_type` that points at this one through
    /// its parameter `ref` matches `inner`.
    Has {
        source_type: String,
        ref_code: String,
        inner: Box<Filter>,
    },
}

/// `_include` / `_revinclude`: `source_type:param[:target_type]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub source_type: String,
    /// `None` for `*` (all reference parameters).
    pub param: Option<String>,
    pub target_type: Option<String>,
    pub iterate: bool,
    /// When set, references are followed only to these types: the types the client may read,
    /// set by the server's authorization ([`SearchQuery::include_only_targets`]) before the
    /// search runs, so that resources it may not read are never fetched nor counted against
    /// the page's limits. `None`: any type.
    pub only_targets: Option<Vec<String>>,
}

impl Include {
    /// The types this include may reach: its `target_type` (when that is among
    /// `only_targets`) or `only_targets`; `None` when any type.
    pub fn target_types(&self) -> Option<Vec<String>> {
        match (&self.target_type, &self.only_targets) {
            (Some(t), Some(only)) => Some(only.iter().filter(|o| *o == t).cloned().collect()),
            (Some(t), None) => Some(vec![t.clone()]),
            (None, only) => only.clone(),
        }
    }
}

impl SearchQuery {
    /// Whether the search answers with resources (matches, and what they include): every
    /// search but a total alone (`_summary=count`, `_count=0`).
    pub fn returns_resources(&self) -> bool {
        !(self.summary == Summary::Count || self.count == 0)
    }

    /// Restricts every `_include` (and `_include:iterate`) to references to `types`. A
    /// `_revinclude` adds resources of its source type only, which the caller authorizes as
    /// such.
    pub fn include_only_targets(&mut self, types: &[String]) {
        for inc in &mut self.includes {
            inc.only_targets = Some(types.to_vec());
        }
    }
}

/// A `_sort` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    /// `_id`, `_lastUpdated`, or a date/string/token parameter code.
    pub code: String,
    pub kind: SearchParamType,
    pub descending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TotalMode {
    #[default]
    None,
    Estimate,
    Accurate,
}

/// A parameter left out under `Prefer: handling=lenient`, with the reason (for the
/// OperationOutcome entry of the Bundle).
#[derive(Debug, Clone, PartialEq)]
pub struct Ignored {
    pub param: String,
    pub reason: String,
}

/// Default and maximum page sizes.
pub const DEFAULT_COUNT: u32 = 50;
pub const MAX_COUNT: u32 = 1000;

/// A validated search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub resource_type: String,
    pub filters: Vec<Filter>,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    pub sort: Vec<SortKey>,
    /// Page size (`_count`), capped at [`MAX_COUNT`]; `0` asks only for the total.
    pub count: u32,
    pub total: TotalMode,
    /// `_summary`: `count` for a total alone, `true`, `text` or `data` for a subset of each
    /// resource, matches and included ones alike ([`crate::subset`]). Never other than
    /// `false` together with `elements` (the pair is refused).
    pub summary: Summary,
    /// `_elements`: top-level element names to keep of each match.
    pub elements: Option<Vec<String>>,
    /// Opaque keyset-paging cursor (`_cursor`) produced by a previous page.
    pub cursor: Option<String>,
    pub ignored: Vec<Ignored>,
}

/// Options of [`parse_query`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// `Prefer: handling=lenient`: unknown and unsupported parameters are ignored and listed.
    pub lenient: bool,
    /// Reject result parameters (`_include`, `_sort`, `_elements`, …) and chains/`_has`, as
    /// `_typeFilter` requires.
    pub predicate_only: bool,
}

/// Bounds on what one search request may ask for (the server's `--search-*` flags). A request
/// beyond one is refused with [`SearchError::TooCostly`] (400 `too-costly`) naming the
/// parameter; included resources beyond [`SearchLimits::max_included`] are left out of the page
/// with a warning. Chains are one level deep and `_has` does not nest, whatever the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchLimits {
    /// Parameters in one request (`_format` and `_pretty` not counted).
    pub max_params: usize,
    /// Bytes of one parameter, name and value together (after percent-decoding).
    pub max_value_bytes: usize,
    /// Bytes of all parameters together.
    pub max_query_bytes: usize,
    /// Values over the whole request: every item of every comma-separated OR list.
    pub max_values: usize,
    /// `_sort` keys.
    pub max_sort_keys: usize,
    /// `_include` and `_revinclude` parameters together.
    pub max_includes: usize,
    /// Resources `_include`/`_revinclude` add to one page; more are left out, with a warning in
    /// the Bundle's OperationOutcome.
    pub max_included: usize,
    /// Bytes of stored JSON in one page, matches and included resources together: the page
    /// ends early (with a next link), and includes beyond it are left out with a warning.
    pub max_page_bytes: usize,
    /// Longest a search may run before it is stopped (503 `timeout`).
    pub timeout: std::time::Duration,
}

impl Default for SearchLimits {
    fn default() -> Self {
        SearchLimits {
            max_params: 50,
            max_value_bytes: 8 * 1024,
            max_query_bytes: 32 * 1024,
            max_values: 1000,
            max_sort_keys: 8,
            max_includes: 10,
            max_included: 1000,
            max_page_bytes: store::plan::DEFAULT_MAX_PAGE_BYTES,
            timeout: std::time::Duration::from_secs(30),
        }
    }
}

impl SearchLimits {
    /// The checks on the raw (name, value) pairs, before any parsing work: how many there are
    /// and how long they are.
    pub fn check_request(&self, params: &[(String, String)]) -> Result<(), SearchError> {
        let mut count = 0usize;
        let mut total = 0usize;
        for (name, value) in params {
            if matches!(name.as_str(), "_format" | "_pretty") {
                continue;
            }
            count += 1;
            if count > self.max_params {
                return Err(SearchError::too_costly(
                    name,
                    format!("more than {} search parameters", self.max_params),
                ));
            }
            let len = name.len() + value.len();
            if len > self.max_value_bytes {
                return Err(SearchError::too_costly(
                    clip(name),
                    format!(
                        "the parameter has {len} bytes; at most {} are allowed",
                        self.max_value_bytes
                    ),
                ));
            }
            total += len;
            if total > self.max_query_bytes {
                return Err(SearchError::too_costly(
                    clip(name),
                    format!(
                        "the search parameters have more than {} bytes together",
                        self.max_query_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The checks on a parsed query: sort keys, includes and values.
    pub fn check_query(&self, q: &SearchQuery) -> Result<(), SearchError> {
        if q.sort.len() > self.max_sort_keys {
            return Err(SearchError::too_costly(
                "_sort",
                format!(
                    "{} sort keys; at most {} are allowed",
                    q.sort.len(),
                    self.max_sort_keys
                ),
            ));
        }
        let includes = q.includes.len() + q.revincludes.len();
        if includes > self.max_includes {
            let param = if q.revincludes.is_empty() {
                "_include"
            } else {
                "_revinclude"
            };
            return Err(SearchError::too_costly(
                param,
                format!(
                    "{includes} _include/_revinclude parameters; at most {} are allowed",
                    self.max_includes
                ),
            ));
        }
        let mut values = 0usize;
        for f in &q.filters {
            values += f.value_count();
            if values > self.max_values {
                return Err(SearchError::too_costly(
                    f.code(),
                    format!(
                        "more than {} search values in one request (comma-separated values count one each)",
                        self.max_values
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A parameter name short enough to be echoed in an OperationOutcome.
fn clip(name: &str) -> &str {
    match name.char_indices().nth(100) {
        Some((i, _)) => &name[..i],
        None => name,
    }
}

impl Filter {
    /// The values this filter compares (its OR list, or its inner filter's).
    pub fn value_count(&self) -> usize {
        match self {
            Filter::Param { values, .. } => values.len(),
            Filter::Missing { .. } => 1,
            Filter::Chain { inner, .. } | Filter::Has { inner, .. } => inner.value_count(),
        }
    }

    /// The parameter code of the searched type this filter is about (`_has` for `_has`).
    pub fn code(&self) -> &str {
        match self {
            Filter::Param { code, .. }
            | Filter::Missing { code, .. }
            | Filter::Chain { code, .. } => code,
            Filter::Has { .. } => "_has",
        }
    }
}

/// Parses a search request.
pub fn parse_query(
    resource_type: &str,
    params: &[(String, String)],
    opts: ParseOptions,
) -> Result<SearchQuery, SearchError> {
    let model = r4();
    if !model.resource_types().iter().any(|t| t == resource_type) {
        return Err(SearchError::UnknownResourceType {
            resource_type: resource_type.to_string(),
        });
    }
    let mut q = SearchQuery {
        resource_type: resource_type.to_string(),
        filters: Vec::new(),
        includes: Vec::new(),
        revincludes: Vec::new(),
        sort: Vec::new(),
        count: DEFAULT_COUNT,
        total: TotalMode::None,
        summary: summary_of(params)?,
        elements: None,
        cursor: None,
        ignored: Vec::new(),
    };
    for (name, value) in params {
        // No FHIR string holds one, and no PostgreSQL text can (it refused the statement: 500).
        if value.contains('\0') {
            return Err(SearchError::invalid(
                name,
                "a search value cannot contain a NUL character",
            ));
        }
        match parse_one(&mut q, name, value, opts) {
            Ok(()) => {}
            Err(e) if opts.lenient && e.is_lenient_ignorable() => q.ignored.push(Ignored {
                param: name.clone(),
                reason: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
    }
    check_combination(q.summary, q.elements.as_deref())?;
    Ok(q)
}

/// Parses a query string (`a=b&c=d`, form-encoded: percent escapes, `+` for a space) into pairs.
pub fn parse_query_string(s: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

const RESULT_PARAMS: &[&str] = &[
    "_sort",
    "_count",
    "_total",
    "_summary",
    "_elements",
    "_include",
    "_revinclude",
    "_cursor",
];

fn parse_one(
    q: &mut SearchQuery,
    name: &str,
    value: &str,
    opts: ParseOptions,
) -> Result<(), SearchError> {
    let base = name.split(':').next().unwrap_or(name);
    if matches!(base, "_format" | "_pretty") {
        return Ok(());
    }
    if opts.predicate_only && RESULT_PARAMS.contains(&base) {
        return Err(SearchError::InvalidValue {
            param: name.to_string(),
            reason: "result parameters are not allowed in _typeFilter".into(),
        });
    }
    match base {
        "_count" => {
            let n: i64 = value
                .trim()
                .parse()
                .map_err(|_| SearchError::invalid(name, format!("'{value}' is not an integer")))?;
            if n < 0 {
                return Err(SearchError::invalid(name, "must not be negative"));
            }
            q.count = n.min(MAX_COUNT as i64) as u32;
        }
        "_total" => {
            q.total = match value {
                "none" => TotalMode::None,
                "estimate" => TotalMode::Estimate,
                "accurate" => TotalMode::Accurate,
                _ => {
                    return Err(SearchError::invalid(
                        name,
                        "expected none, estimate or accurate",
                    ));
                }
            }
        }
        // Taken with its repeats before the loop ([`summary_of`]).
        "_summary" => {}
        "_elements" => q
            .elements
            .get_or_insert_with(Vec::new)
            .extend(parse_elements(value)),
        "_cursor" => q.cursor = Some(value.to_string()),
        "_sort" => {
            for key in value.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                let (code, descending) = match key.strip_prefix('-') {
                    Some(c) => (c, true),
                    None => (key, false),
                };
                let p = r4().search_param(&q.resource_type, code).ok_or_else(|| {
                    SearchError::UnknownParameter {
                        resource_type: q.resource_type.clone(),
                        param: format!("_sort={code}"),
                    }
                })?;
                if !matches!(
                    p.kind,
                    SearchParamType::Date | SearchParamType::String | SearchParamType::Token
                ) {
                    return Err(SearchError::unsupported(
                        name,
                        format!("cannot sort by {} parameter '{code}'", p.kind.as_str()),
                    ));
                }
                q.sort.push(SortKey {
                    code: code.to_string(),
                    kind: p.kind,
                    descending,
                });
            }
        }
        "_include" | "_revinclude" => {
            let iterate = match name.split_once(':') {
                None => false,
                Some((_, "iterate")) | Some((_, "recurse")) => true,
                Some((_, m)) => {
                    return Err(SearchError::invalid(
                        name,
                        format!("unknown modifier ':{m}'"),
                    ));
                }
            };
            let inc = parse_include(name, value, iterate)?;
            if base == "_include" {
                q.includes.push(inc);
            } else {
                q.revincludes.push(inc);
            }
        }
        "_has" => {
            if opts.predicate_only {
                return Err(SearchError::unsupported(
                    name,
                    "_has is unsupported in _typeFilter",
                ));
            }
            let f = parse_has(&q.resource_type, name, value)?;
            q.filters.push(f);
        }
        _ => {
            let f = parse_filter(&q.resource_type, name, value, opts.predicate_only, true)?;
            q.filters.push(f);
        }
    }
    Ok(())
}

fn parse_include(name: &str, value: &str, iterate: bool) -> Result<Include, SearchError> {
    let model = r4();
    let mut parts = value.split(':');
    let source_type = parts.next().unwrap_or_default().to_string();
    if !model.resource_types().contains(&source_type) {
        return Err(SearchError::invalid(
            name,
            format!("unknown resource type '{source_type}'"),
        ));
    }
    let param = match parts.next() {
        None | Some("*") => None,
        Some(p) => {
            let sp = model.search_param(&source_type, p).ok_or_else(|| {
                SearchError::invalid(name, format!("unknown parameter {source_type}:{p}"))
            })?;
            if sp.kind != SearchParamType::Reference {
                return Err(SearchError::invalid(
                    name,
                    format!("{source_type}:{p} is not a reference parameter"),
                ));
            }
            Some(p.to_string())
        }
    };
    let target_type = match parts.next() {
        None => None,
        Some(t) if model.resource_types().iter().any(|x| x == t) => Some(t.to_string()),
        Some(t) => {
            return Err(SearchError::invalid(
                name,
                format!("unknown target type '{t}'"),
            ));
        }
    };
    Ok(Include {
        source_type,
        param,
        target_type,
        iterate,
        only_targets: None,
    })
}

/// `_has:Observation:patient:code=1234` (one level).
fn parse_has(resource_type: &str, name: &str, value: &str) -> Result<Filter, SearchError> {
    let model = r4();
    let mut parts = name.splitn(4, ':');
    parts.next();
    let (Some(source_type), Some(ref_code), Some(rest)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(SearchError::invalid(
            name,
            "expected _has:Type:reference:parameter",
        ));
    };
    if !model.resource_types().iter().any(|t| t == source_type) {
        return Err(SearchError::invalid(
            name,
            format!("unknown resource type '{source_type}'"),
        ));
    }
    let rp =
        model
            .search_param(source_type, ref_code)
            .ok_or_else(|| SearchError::UnknownParameter {
                resource_type: source_type.to_string(),
                param: name.to_string(),
            })?;
    if rp.kind != SearchParamType::Reference {
        return Err(SearchError::invalid(
            name,
            format!("{source_type}:{ref_code} is not a reference parameter"),
        ));
    }
    if !rp.targets.is_empty() && !rp.targets.iter().any(|t| t == resource_type) {
        return Err(SearchError::invalid(
            name,
            format!("{source_type}:{ref_code} does not point at {resource_type}"),
        ));
    }
    if rest.starts_with("_has") {
        return Err(SearchError::unsupported(name, "nested _has"));
    }
    let inner =
        parse_filter(source_type, rest, value, false, false).map_err(|e| rename(e, name))?;
    Ok(Filter::Has {
        source_type: source_type.to_string(),
        ref_code: ref_code.to_string(),
        inner: Box::new(inner),
    })
}

/// Reports an inner error under the parameter name the client wrote.
fn rename(e: SearchError, name: &str) -> SearchError {
    match e {
        SearchError::UnknownParameter { resource_type, .. } => SearchError::UnknownParameter {
            resource_type,
            param: name.to_string(),
        },
        SearchError::Unsupported { reason, .. } => SearchError::unsupported(name, reason),
        SearchError::InvalidValue { reason, .. } => SearchError::invalid(name, reason),
        other => other,
    }
}

/// A parameter filter, possibly chained (`allow_chain`: one level only).
fn parse_filter(
    resource_type: &str,
    name: &str,
    value: &str,
    predicate_only: bool,
    allow_chain: bool,
) -> Result<Filter, SearchError> {
    let model = r4();
    let (head, chain) = match name.split_once('.') {
        Some((h, c)) => (h, Some(c)),
        None => (name, None),
    };
    let (code, modifier) = match head.split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (head, None),
    };
    let p =
        model
            .search_param(resource_type, code)
            .ok_or_else(|| SearchError::UnknownParameter {
                resource_type: resource_type.to_string(),
                param: name.to_string(),
            })?;
    match p.kind {
        SearchParamType::Composite => {
            return Err(SearchError::unsupported(
                name,
                "composite parameters are not supported",
            ));
        }
        SearchParamType::Special => {
            return Err(SearchError::unsupported(
                name,
                "special parameters are not supported",
            ));
        }
        _ => {}
    }
    if p.expression.is_none() {
        return Err(SearchError::unsupported(
            name,
            "the parameter has no expression",
        ));
    }
    if let Some(chain) = chain {
        if p.kind != SearchParamType::Reference {
            return Err(SearchError::invalid(
                name,
                format!(
                    "chain on '{code}', which is a {} parameter",
                    p.kind.as_str()
                ),
            ));
        }
        if predicate_only {
            return Err(SearchError::unsupported(
                name,
                "chained parameters are unsupported in _typeFilter",
            ));
        }
        if !allow_chain {
            return Err(SearchError::unsupported(
                name,
                "chains are supported one level deep",
            ));
        }
        let explicit = modifier.map(|m| {
            if model.resource_types().iter().any(|t| t == m) {
                Ok(m.to_string())
            } else {
                Err(SearchError::invalid(
                    name,
                    format!("unknown modifier ':{m}'"),
                ))
            }
        });
        let candidates: Vec<String> = match explicit {
            Some(t) => vec![t?],
            None if p.targets.is_empty() => model.resource_types().to_vec(),
            None => p.targets.clone(),
        };
        let inner_code = chain.split([':', '.']).next().unwrap_or(chain);
        // The targets that know the chained parameter; the first error names what went wrong.
        let mut target_types = Vec::new();
        let mut inner_filter = None;
        let mut first_err = None;
        for t in &candidates {
            if model.search_param(t, inner_code).is_none() {
                continue;
            }
            match parse_filter(t, chain, value, false, false) {
                Ok(f) => {
                    target_types.push(t.clone());
                    inner_filter.get_or_insert(f);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        return match inner_filter {
            // Same parameter code on several targets parses to the same filter: one Chain.
            Some(inner) => Ok(Filter::Chain {
                code: code.to_string(),
                target_types,
                inner: Box::new(inner),
            }),
            None => Err(rename(
                first_err.unwrap_or_else(|| SearchError::UnknownParameter {
                    resource_type: candidates.join("|"),
                    param: name.to_string(),
                }),
                name,
            )),
        };
    }
    if modifier == Some("missing") {
        let missing = match value {
            "true" => true,
            "false" => false,
            _ => return Err(SearchError::invalid(name, "expected true or false")),
        };
        return Ok(Filter::Missing {
            code: code.to_string(),
            missing,
        });
    }
    let mut negate = false;
    let vals = split_or(value);
    if vals.iter().all(|v| v.is_empty()) {
        return Err(SearchError::invalid(name, "empty value"));
    }
    let mut values = Vec::with_capacity(vals.len());
    for raw in &vals {
        let v = match (p.kind, modifier) {
            (SearchParamType::Token, None) => parse_token(raw),
            (SearchParamType::Token, Some("not")) => {
                negate = true;
                parse_token(raw)
            }
            (SearchParamType::Token, Some("text")) => {
                Value::TokenText(values::normalize_string(&unescape(raw)))
            }
            (SearchParamType::String, None) => Value::String {
                value: values::normalize_string(&unescape(raw)),
                mode: StringMatch::Prefix,
            },
            (SearchParamType::String, Some("contains")) => Value::String {
                value: values::normalize_string(&unescape(raw)),
                mode: StringMatch::Contains,
            },
            (SearchParamType::String, Some("exact")) => Value::String {
                value: unescape(raw),
                mode: StringMatch::Exact,
            },
            (SearchParamType::Date, None) => {
                let (prefix, rest) = split_prefix(name, raw)?;
                let range =
                    values::parse_date_range(rest).map_err(|r| SearchError::invalid(name, r))?;
                Value::Date { prefix, range }
            }
            (SearchParamType::Number, None) => {
                let (prefix, rest) = split_prefix(name, raw)?;
                let value =
                    values::parse_decimal(rest).map_err(|r| SearchError::invalid(name, r))?;
                Value::Number { prefix, value }
            }
            (SearchParamType::Quantity, None) => parse_quantity(name, raw)?,
            (SearchParamType::Reference, None) => parse_reference(name, raw, None, &p.targets)?,
            (SearchParamType::Reference, Some("identifier")) => {
                let (system, code) = token_parts(raw);
                Value::ReferenceIdentifier { system, code }
            }
            (SearchParamType::Reference, Some(t))
                if model.resource_types().iter().any(|x| x == t) =>
            {
                if !p.targets.is_empty() && !p.targets.iter().any(|x| x == t) {
                    return Err(SearchError::invalid(
                        name,
                        format!("'{code}' cannot point at {t}"),
                    ));
                }
                parse_reference(name, raw, Some(t), &p.targets)?
            }
            (SearchParamType::Uri, None) => Value::Uri(unescape(raw)),
            (
                SearchParamType::Uri | SearchParamType::Token,
                Some(m @ ("above" | "below" | "in" | "not-in" | "of-type")),
            ) => {
                return Err(SearchError::unsupported(
                    name,
                    format!("modifier ':{m}' is not supported"),
                ));
            }
            (_, Some(m)) => {
                return Err(SearchError::invalid(
                    name,
                    format!(
                        "modifier ':{m}' does not apply to {} parameters",
                        p.kind.as_str()
                    ),
                ));
            }
            (SearchParamType::Composite | SearchParamType::Special, None) => {
                return Err(SearchError::unsupported(name, "unsupported parameter type"));
            }
        };
        values.push(v);
    }
    Ok(Filter::Param {
        code: code.to_string(),
        kind: p.kind,
        values,
        negate,
    })
}

/// Splits an OR list on unescaped commas, keeping other escapes for the per-type parser.
fn split_or(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(',') => out.last_mut().map(|s| s.push(',')).unwrap_or(()),
                Some(n) => {
                    if let Some(s) = out.last_mut() {
                        s.push('\\');
                        s.push(n);
                    }
                }
                None => out.last_mut().map(|s| s.push('\\')).unwrap_or(()),
            },
            ',' => out.push(String::new()),
            c => out.last_mut().map(|s| s.push(c)).unwrap_or(()),
        }
    }
    out
}

/// Splits on the first unescaped `|` and unescapes both sides.
fn split_pipe(s: &str) -> (String, Option<String>) {
    let mut left = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, n)) = chars.next() {
                    left.push(n);
                }
            }
            '|' => return (left, Some(unescape(&s[i + 1..]))),
            c => left.push(c),
        }
    }
    (left, None)
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(n) = chars.next()
        {
            out.push(n);
            continue;
        }
        out.push(c);
    }
    out
}

fn parse_token(raw: &str) -> Value {
    let (system, code) = token_parts(raw);
    Value::Token { system, code }
}

/// `system|code`, `|code`, `system|` or `code`, unescaped.
fn token_parts(raw: &str) -> (Option<String>, Option<String>) {
    match split_pipe(raw) {
        (code, None) => (None, Some(code)),
        (system, Some(code)) => (Some(system), (!code.is_empty()).then_some(code)),
    }
}

fn split_prefix<'a>(name: &str, raw: &'a str) -> Result<(Prefix, &'a str), SearchError> {
    let b = raw.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1].is_ascii_alphabetic() {
        let p = parse_prefix(&raw[..2])
            .ok_or_else(|| SearchError::invalid(name, format!("unknown prefix '{}'", &raw[..2])))?;
        return Ok((p, &raw[2..]));
    }
    Ok((Prefix::Eq, raw))
}

fn parse_quantity(name: &str, raw: &str) -> Result<Value, SearchError> {
    let (prefix, rest) = split_prefix(name, raw)?;
    let mut parts = rest.splitn(3, '|');
    let num = parts.next().unwrap_or_default();
    let value = values::parse_decimal(num).map_err(|r| SearchError::invalid(name, r))?;
    let system = parts.next().map(unescape).filter(|s| !s.is_empty());
    let code = parts.next().map(unescape).filter(|s| !s.is_empty());
    Ok(Value::Quantity {
        prefix,
        value,
        system,
        code,
    })
}

/// `Type/id`, `id`, or an absolute URL (`http://x/fhir/Patient/1` is kept as a URL; a server
/// that knows its base can strip it before calling the parser).
fn parse_reference(
    name: &str,
    raw: &str,
    fixed_type: Option<&str>,
    targets: &[String],
) -> Result<Value, SearchError> {
    let raw = unescape(raw);
    if raw.contains("://") || raw.starts_with("urn:") {
        return Ok(Value::ReferenceUrl(raw));
    }
    let parts: Vec<&str> = raw.split('/').collect();
    match parts.as_slice() {
        [id] => Ok(Value::Reference {
            target_type: fixed_type
                .map(str::to_string)
                .or_else(|| (targets.len() == 1).then(|| targets[0].clone())),
            id: (*id).to_string(),
        }),
        [t, id] | [t, id, "_history", _] => {
            if !r4().resource_types().iter().any(|x| x == t) {
                return Err(SearchError::invalid(
                    name,
                    format!("unknown resource type '{t}'"),
                ));
            }
            if fixed_type.is_some_and(|f| f != *t) {
                return Err(SearchError::invalid(
                    name,
                    "type modifier and reference type differ",
                ));
            }
            Ok(Value::Reference {
                target_type: Some((*t).to_string()),
                id: (*id).to_string(),
            })
        }
        _ => Err(SearchError::invalid(
            name,
            format!("'{raw}' is not a reference"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> Vec<(String, String)> {
        parse_query_string(s)
    }

    fn parse(t: &str, s: &str) -> Result<SearchQuery, SearchError> {
        parse_query(t, &pairs(s), ParseOptions::default())
    }

    #[test]
    fn token_forms_and_or_lists() {
        let q = parse(
            "Observation",
            "code=http://loinc.org|8867-4,|abc,sys|,x\\,y",
        )
        .unwrap();
        let Filter::Param { values, .. } = &q.filters[0] else {
            panic!()
        };
        assert_eq!(values.len(), 4);
        assert_eq!(
            values[0],
            Value::Token {
                system: Some("http://loinc.org".into()),
                code: Some("8867-4".into())
            }
        );
        assert_eq!(
            values[1],
            Value::Token {
                system: Some(String::new()),
                code: Some("abc".into())
            }
        );
        assert_eq!(
            values[2],
            Value::Token {
                system: Some("sys".into()),
                code: None
            }
        );
        assert_eq!(
            values[3],
            Value::Token {
                system: None,
                code: Some("x,y".into())
            }
        );
    }

    #[test]
    fn and_by_repetition_and_prefixes() {
        let q = parse("Observation", "date=ge2020-01-01&date=lt2021").unwrap();
        assert_eq!(q.filters.len(), 2);
        let Filter::Param { values, .. } = &q.filters[0] else {
            panic!()
        };
        assert!(matches!(
            values[0],
            Value::Date {
                prefix: Prefix::Ge,
                ..
            }
        ));
    }

    #[test]
    fn bad_values_name_the_parameter() {
        for (s, p) in [
            ("date=2020-13-45", "date"),
            ("_count=-1", "_count"),
            ("date=xx2020", "date"),
            ("code.name=x", "code.name"),
            ("value-quantity=abc", "value-quantity"),
            ("code:exact=x", "code:exact"),
        ] {
            let e = parse("Observation", s).unwrap_err();
            assert_eq!(e.param(), Some(p), "{s}: {e}");
            assert!(matches!(e, SearchError::InvalidValue { .. }), "{s}: {e}");
        }
    }

    #[test]
    fn unknown_parameters_and_lenient() {
        let e = parse("Patient", "foo=bar").unwrap_err();
        assert!(matches!(e, SearchError::UnknownParameter { .. }));
        let q = parse_query(
            "Patient",
            &pairs("foo=bar&name=smith"),
            ParseOptions {
                lenient: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(q.ignored.len(), 1);
        assert_eq!(q.filters.len(), 1);
        let e = parse("Observation", "code-value-quantity=x").unwrap_err();
        assert!(matches!(e, SearchError::Unsupported { .. }));
    }

    #[test]
    fn chains_and_has() {
        let q = parse("Observation", "subject:Patient.name=peter").unwrap();
        let Filter::Chain {
            code,
            target_types,
            inner,
        } = &q.filters[0]
        else {
            panic!()
        };
        assert_eq!(code, "subject");
        assert_eq!(target_types, &["Patient".to_string()]);
        assert!(matches!(**inner, Filter::Param { .. }));
        let q = parse("Observation", "patient.birthdate=ge1970").unwrap();
        assert!(matches!(q.filters[0], Filter::Chain { .. }));
        let q = parse("Patient", "_has:Observation:patient:code=1234").unwrap();
        assert!(matches!(q.filters[0], Filter::Has { .. }));
        assert!(parse("Patient", "_has:Observation:code:code=1").is_err());
    }

    #[test]
    fn summary_values() {
        for (text, summary) in [
            ("_summary=count", Summary::Count),
            ("_summary=true", Summary::True),
            ("_summary=text", Summary::Text),
            ("_summary=data", Summary::Data),
            ("_summary=false", Summary::False),
            ("_summary=true&_summary=true", Summary::True),
        ] {
            let q = parse("Observation", text).unwrap();
            assert_eq!(q.summary, summary, "{text}");
            assert_eq!(q.returns_resources(), summary != Summary::Count, "{text}");
        }
        let lenient = ParseOptions {
            lenient: true,
            ..Default::default()
        };
        // Refused even under handling=lenient: ignoring them would return what the client
        // did not ask for.
        for bad in [
            "_summary=yes",
            "_summary=TRUE",
            "_summary=true&_summary=count",
            "_summary=false&_summary=data",
            "_summary=data&_summary=false",
            "_summary=true&_elements=status",
            "_elements=status&_summary=data",
            "_summary=count&_elements=status",
        ] {
            for opts in [ParseOptions::default(), lenient] {
                let e = parse_query("Observation", &pairs(bad), opts).unwrap_err();
                assert!(
                    matches!(&e, SearchError::InvalidValue { param, .. } if param == "_summary"),
                    "{bad}: {e:?}"
                );
            }
        }
        let q = parse("Observation", "_summary=false&_elements=status").unwrap();
        assert_eq!(q.elements.as_deref().unwrap(), ["status"]);
    }

    #[test]
    fn result_parameters() {
        let q = parse(
            "Observation",
            "_sort=-date,_id&_count=10&_total=accurate&_include=Observation:subject&_revinclude=Provenance:target&_elements=id,Observation.status&_summary=false&_format=json",
        )
        .unwrap();
        assert_eq!(q.sort.len(), 2);
        assert!(q.sort[0].descending);
        assert_eq!(q.count, 10);
        assert_eq!(q.total, TotalMode::Accurate);
        assert_eq!(q.includes.len(), 1);
        assert_eq!(q.revincludes.len(), 1);
        assert_eq!(q.summary, Summary::False);
        assert_eq!(q.elements.as_deref().unwrap(), ["id", "status"]);
        let e = parse_query(
            "Observation",
            &pairs("_sort=date"),
            ParseOptions {
                predicate_only: true,
                ..Default::default()
            },
        );
        assert!(e.is_err());
    }

    #[test]
    fn quantities_and_references() {
        let q = parse("Observation", "value-quantity=gt5.4|http://unitsofmeasure.org|mg&subject=Patient/1&subject:Patient=2&subject:identifier=sys|v").unwrap();
        let Filter::Param { values, .. } = &q.filters[0] else {
            panic!()
        };
        assert!(
            matches!(&values[0], Value::Quantity { prefix: Prefix::Gt, code: Some(c), .. } if c == "mg")
        );
        let Filter::Param { values, .. } = &q.filters[2] else {
            panic!()
        };
        assert_eq!(
            values[0],
            Value::Reference {
                target_type: Some("Patient".into()),
                id: "2".into()
            }
        );
        assert!(
            matches!(q.filters[3], Filter::Param { ref values, .. } if matches!(values[0], Value::ReferenceIdentifier { .. }))
        );
    }
}

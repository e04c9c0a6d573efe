//! Compiled search predicates evaluated in memory, for bulk export `_typeFilter`.
//!
//! A [`Predicate`] is parsed once; [`Predicate::matches`] evaluates only the parameters its
//! filters name, with the same extraction as indexing, so it agrees with a database search.

use std::collections::HashMap;

use serde_json::Value as Json;

use crate::error::SearchError;
use crate::extract::IndexValue;
use crate::matching;
use crate::query::{self, Filter, ParseOptions};
use crate::registry;

/// One `_typeFilter` query (`Observation?code=…&date=ge2020`), compiled.
#[derive(Debug, Clone)]
pub struct Predicate {
    resource_type: String,
    filters: Vec<Filter>,
}

impl Predicate {
    /// Compiles a query string (without the `Type?` part; a leading `?` is accepted).
    /// Result parameters, chains and `_has` are rejected, as `_typeFilter` requires.
    pub fn compile(resource_type: &str, query_string: &str) -> Result<Predicate, SearchError> {
        let pairs = query::parse_query_string(query_string.trim_start_matches('?'));
        Self::from_pairs(resource_type, &pairs)
    }

    /// Compiles already-decoded (name, value) pairs.
    pub fn from_pairs(
        resource_type: &str,
        pairs: &[(String, String)],
    ) -> Result<Predicate, SearchError> {
        let q = query::parse_query(
            resource_type,
            pairs,
            ParseOptions {
                lenient: false,
                predicate_only: true,
            },
        )?;
        Ok(Predicate {
            resource_type: q.resource_type,
            filters: q.filters,
        })
    }

    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// Whether the resource satisfies every filter. A resource of another type never matches.
    pub fn matches(&self, resource: &Json) -> bool {
        if resource.get("resourceType").and_then(Json::as_str) != Some(self.resource_type.as_str())
        {
            return false;
        }
        let mut cache: HashMap<&str, Vec<IndexValue>> = HashMap::new();
        self.filters
            .iter()
            .all(|f| filter_matches(&self.resource_type, f, resource, &mut cache))
    }
}

fn filter_matches<'f>(
    resource_type: &str,
    f: &'f Filter,
    resource: &Json,
    cache: &mut HashMap<&'f str, Vec<IndexValue>>,
) -> bool {
    let (code, values, negate) = match f {
        Filter::Param {
            code,
            values,
            negate,
            ..
        } => (code.as_str(), Some(values), *negate),
        Filter::Missing { code, .. } => (code.as_str(), None, false),
        // Rejected by `compile`; a hand-built predicate with them matches nothing.
        Filter::Chain { .. } | Filter::Has { .. } => return false,
    };
    let entries = cache
        .entry(code)
        .or_insert_with(|| registry::extract_param(resource_type, code, resource));
    match (f, values) {
        (Filter::Missing { missing, .. }, _) => entries.is_empty() == *missing,
        (_, Some(values)) => {
            let refs: Vec<&IndexValue> = entries.iter().collect();
            matching::param_matches(values, negate, &refs)
        }
        _ => false,
    }
}

/// The `_typeFilter`s of an export: per type, several predicates ORed. Types without a filter
/// pass unfiltered.
#[derive(Debug, Clone, Default)]
pub struct PredicateSet {
    by_type: HashMap<String, Vec<Predicate>>,
}

impl PredicateSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one `_typeFilter` value `Type?query`.
    pub fn add_type_filter(&mut self, type_filter: &str) -> Result<(), SearchError> {
        let (ty, q) = type_filter
            .split_once('?')
            .ok_or_else(|| SearchError::InvalidValue {
                param: "_typeFilter".into(),
                reason: format!("'{type_filter}' is not of the form Type?query"),
            })?;
        let p = Predicate::compile(ty, q).map_err(|e| match e {
            SearchError::UnknownResourceType { .. } => SearchError::InvalidValue {
                param: "_typeFilter".into(),
                reason: e.to_string(),
            },
            other => other,
        })?;
        self.add(p);
        Ok(())
    }

    pub fn add(&mut self, p: Predicate) {
        self.by_type
            .entry(p.resource_type.clone())
            .or_default()
            .push(p);
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// Whether the type has at least one filter.
    pub fn filters_type(&self, resource_type: &str) -> bool {
        self.by_type.contains_key(resource_type)
    }

    /// The types that have filters.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.by_type.keys().map(String::as_str)
    }

    /// True when the resource's type has no filter, or any filter of its type matches.
    pub fn matches(&self, resource: &Json) -> bool {
        let Some(ty) = resource.get("resourceType").and_then(Json::as_str) else {
            return false;
        };
        match self.by_type.get(ty) {
            None => true,
            Some(ps) => ps.iter().any(|p| p.matches(resource)),
        }
    }
}

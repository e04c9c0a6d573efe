//! The indexable search parameters of each resource type, with their FHIRPath expressions
//! compiled once and cached, and extraction of index values from a resource.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use fhir_model::{SearchParamType, r4};
use serde_json::Value as Json;

use crate::evaluate::CompiledPath;
use crate::extract::{self, IndexValue};

/// One union branch of a parameter's expression. `X.where(resolve() is T)` is compiled as `X`
/// with `ref_type = T`: the evaluator does not resolve references, but a relative reference
/// names its target type, which is all the filter needs.
struct Branch {
    path: CompiledPath,
    ref_type: Option<String>,
}

/// An indexable parameter of one resource type.
pub struct IndexedParam {
    pub code: String,
    pub kind: SearchParamType,
    branches: Vec<Branch>,
}

/// The indexable parameters of one resource type.
pub struct TypeIndex {
    pub resource_type: String,
    pub params: Vec<IndexedParam>,
    by_code: HashMap<String, usize>,
}

impl TypeIndex {
    pub fn param(&self, code: &str) -> Option<&IndexedParam> {
        self.by_code.get(code).map(|&i| &self.params[i])
    }
}

static CACHE: OnceLock<RwLock<HashMap<String, Arc<TypeIndex>>>> = OnceLock::new();

/// The compiled parameters of a resource type (`None` for an unknown type). Built on first use.
pub fn type_index(resource_type: &str) -> Option<Arc<TypeIndex>> {
    let cache = CACHE.get_or_init(Default::default);
    if let Some(t) = cache
        .read()
        .ok()
        .and_then(|c| c.get(resource_type).cloned())
    {
        return Some(t);
    }
    let model = r4();
    if !model.resource_types().iter().any(|t| t == resource_type) {
        return None;
    }
    let mut params = Vec::new();
    for p in model.search_params(resource_type) {
        if matches!(
            p.kind,
            SearchParamType::Composite | SearchParamType::Special
        ) {
            continue;
        }
        let Some(expr) = p.expression.as_deref() else {
            continue;
        };
        let branches: Vec<Branch> = split_union(expr)
            .into_iter()
            .filter_map(|b| {
                let (path, ref_type) = strip_resolve(b);
                // An expression the evaluator cannot compile leaves the branch unindexed; the
                // model's expressions are all expected to compile (tested).
                CompiledPath::compile(path)
                    .ok()
                    .map(|path| Branch { path, ref_type })
            })
            .collect();
        if branches.is_empty() {
            continue;
        }
        params.push(IndexedParam {
            code: p.code.clone(),
            kind: p.kind,
            branches,
        });
    }
    let by_code = params
        .iter()
        .enumerate()
        .map(|(i, p)| (p.code.clone(), i))
        .collect();
    let ti = Arc::new(TypeIndex {
        resource_type: resource_type.to_string(),
        params,
        by_code,
    });
    if let Ok(mut c) = cache.write() {
        c.insert(resource_type.to_string(), ti.clone());
    }
    Some(ti)
}

/// Splits an expression on top-level `|`.
pub(crate) fn split_union(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, false, 0);
    for (i, c) in expr.char_indices() {
        match c {
            '\'' => quote = !quote,
            '(' if !quote => depth += 1,
            ')' if !quote => depth -= 1,
            '|' if !quote && depth == 0 => {
                out.push(expr[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(expr[start..].trim());
    out
}

/// `X.where(resolve() is T)` → (`X`, Some(T)); parentheses around a branch are kept balanced.
pub(crate) fn strip_resolve(branch: &str) -> (&str, Option<String>) {
    let b = branch.trim();
    let inner = if b.starts_with('(') && b.ends_with(')') {
        &b[1..b.len() - 1]
    } else {
        b
    };
    if let Some(i) = inner.find(".where(resolve() is ") {
        let t = inner[i + ".where(resolve() is ".len()..]
            .trim_end_matches(')')
            .trim();
        return (&inner[..i], Some(t.to_string()));
    }
    (b, None)
}

impl IndexedParam {
    /// The index values of this parameter in a resource.
    pub fn extract(&self, resource: &Json, out: &mut Vec<IndexValue>) {
        for b in &self.branches {
            let start = out.len();
            b.path.evaluate(resource, &mut |ty, v| {
                extract::convert(self.kind, ty, v, out)
            });
            if let Some(t) = &b.ref_type {
                // Keep only references to the named type (and identifiers, which have no type).
                let mut i = start;
                while i < out.len() {
                    let keep = match &out[i] {
                        IndexValue::Reference { target_type, .. } => target_type == t,
                        IndexValue::ReferenceUrl(u) => {
                            u.rsplit('/').nth(1).is_some_and(|seg| seg == t)
                        }
                        _ => true,
                    };
                    if keep {
                        i += 1;
                    } else {
                        out.remove(i);
                    }
                }
            }
        }
    }
}

/// The index values of one parameter (by code) of a resource.
pub fn extract_param(resource_type: &str, code: &str, resource: &Json) -> Vec<IndexValue> {
    let mut out = Vec::new();
    if let Some(ti) = type_index(resource_type) {
        if let Some(p) = ti.param(code) {
            p.extract(resource, &mut out);
        }
    }
    out
}

/// All index values of a resource, grouped by parameter code (only parameters with values).
pub fn extract_all(resource: &Json) -> Vec<(String, SearchParamType, Vec<IndexValue>)> {
    let Some(rt) = resource.get("resourceType").and_then(Json::as_str) else {
        return Vec::new();
    };
    let Some(ti) = type_index(rt) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in &ti.params {
        let mut vals = Vec::new();
        p.extract(resource, &mut vals);
        if !vals.is_empty() {
            dedup(&mut vals);
            out.push((p.code.clone(), p.kind, vals));
        }
    }
    out
}

fn dedup(v: &mut Vec<IndexValue>) {
    let mut i = 0;
    while i < v.len() {
        if v[..i].contains(&v[i]) {
            v.remove(i);
        } else {
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_unions_and_resolve() {
        assert_eq!(
            split_union("(A.b as X) | A.c.where(d = 'x|y')"),
            vec!["(A.b as X)", "A.c.where(d = 'x|y')"]
        );
        assert_eq!(
            strip_resolve("Observation.subject.where(resolve() is Patient)"),
            ("Observation.subject", Some("Patient".to_string()))
        );
        assert_eq!(strip_resolve("A.b"), ("A.b", None));
    }
}

//! The indexable search parameters of each resource type, with their FHIRPath expressions
//! compiled once and cached, and extraction of index values from a resource.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, OnceLock, RwLock};

use fhir_model::{SearchParamType, r4};
use serde_json::Value as Json;

use crate::evaluate::{BoundPath, CompiledPath, Scratch};
use crate::extract::{self, IndexValue};

/// One union branch of a parameter's expression. `X.where(resolve() is T)` is compiled as `X`
/// with `ref_type = T`: the evaluator does not resolve references, but a relative reference
/// names its target type, which is all the filter needs.
struct Branch {
    path: CompiledPath,
    /// `path` bound to the parameter's resource type.
    bound: BoundPath,
    ref_type: Option<String>,
    /// `/T/` for `ref_type` T: what an absolute reference URL must contain.
    ref_url_part: Option<String>,
}

/// How a parameter's values are found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// Its own index rows.
    Rows,
    /// No rows of its own: its expression is the union of other parameters' expressions
    /// (`combo-code` = `code | component-code`), possibly restricted to references of one type
    /// (`patient` = `subject.where(resolve() is Patient)`). Saves index rows at load time.
    Alias {
        codes: Vec<String>,
        ref_type: Option<String>,
    },
    /// `_id`: the resource id column.
    Id,
    /// `_lastUpdated`: the version's seq (seqs increase with lastUpdated).
    LastUpdated,
}

/// An indexable parameter of one resource type.
pub struct IndexedParam {
    pub code: String,
    pub kind: SearchParamType,
    pub storage: Storage,
    branches: Vec<Branch>,
    /// Branch texts, for alias detection.
    branch_keys: Vec<(String, Option<String>)>,
}

/// The indexable parameters of one resource type.
pub struct TypeIndex {
    pub resource_type: String,
    pub params: Vec<IndexedParam>,
    by_code: HashMap<String, usize>,
    /// The model's name of the type (what `resourceType` must equal for the bound paths).
    root: &'static str,
    /// Indexes into `params` of the parameters with [`Storage::Rows`].
    rows: Vec<usize>,
    /// The root members the stored parameters' first steps read, by JSON key: the slots of
    /// the table [`TypeIndex::root_members`] fills once per resource.
    root_slots: HashMap<String, usize, BuildHasherDefault<Fnv>>,
}

/// FNV-1a: a fast hash for the short JSON keys of [`TypeIndex::root_slots`].
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

impl TypeIndex {
    pub fn param(&self, code: &str) -> Option<&IndexedParam> {
        self.by_code.get(code).map(|&i| &self.params[i])
    }

    /// The parameters with index rows of their own ([`Storage::Rows`]), in code order.
    pub fn row_params(&self) -> impl Iterator<Item = &IndexedParam> {
        self.rows.iter().map(|&i| &self.params[i])
    }

    /// Whether `resource` has this type's `resourceType` (its parameters' paths are bound to it).
    pub(crate) fn is_root_of(&self, resource: &Json) -> bool {
        resource.get("resourceType").and_then(Json::as_str) == Some(self.root)
    }

    /// Fills `vals` with the resource's members that the stored parameters read first, by slot
    /// (one pass over the resource's keys instead of one lookup per parameter).
    pub(crate) fn root_members<'a>(&self, resource: &'a Json, vals: &mut Vec<Option<&'a Json>>) {
        vals.clear();
        vals.resize(self.root_slots.len(), None);
        if let Some(obj) = resource.as_object() {
            for (k, v) in obj {
                if let Some(&i) = self.root_slots.get(k.as_str()) {
                    vals[i] = Some(v);
                }
            }
        }
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
        let mut branches = Vec::new();
        let mut branch_keys = Vec::new();
        for b in split_union(expr) {
            let (path, ref_type) = strip_resolve(b);
            // An expression the evaluator cannot compile leaves the branch unindexed; the
            // model's expressions all compile (tested).
            if let Ok(compiled) = CompiledPath::compile(path) {
                branch_keys.push((strip_outer(path).to_string(), ref_type.clone()));
                branches.push(Branch {
                    bound: compiled.bind(resource_type),
                    path: compiled,
                    ref_url_part: ref_type.as_ref().map(|t| format!("/{t}/")),
                    ref_type,
                });
            }
        }
        if branches.is_empty() {
            continue;
        }
        let storage = match p.code.as_str() {
            "_id" => Storage::Id,
            "_lastUpdated" => Storage::LastUpdated,
            _ => Storage::Rows,
        };
        params.push(IndexedParam {
            code: p.code.clone(),
            kind: p.kind,
            storage,
            branches,
            branch_keys,
        });
    }
    detect_aliases(&mut params);
    let by_code = params
        .iter()
        .enumerate()
        .map(|(i, p)| (p.code.clone(), i))
        .collect();
    // Slots for the root members that the stored parameters' first steps read.
    let mut root_keys: Vec<String> = Vec::new();
    for p in params.iter_mut().filter(|p| p.storage == Storage::Rows) {
        for b in &mut p.branches {
            let slots: Option<Vec<usize>> = b.bound.first_keys().map(|keys| {
                keys.iter()
                    .map(|k| match root_keys.iter().position(|x| x == k) {
                        Some(i) => i,
                        None => {
                            root_keys.push(k.to_string());
                            root_keys.len() - 1
                        }
                    })
                    .collect()
            });
            if let Some(slots) = slots {
                b.bound.set_first_slots(slots);
            }
        }
    }
    let root_slots = root_keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| (k, i))
        .collect();
    let rows = params
        .iter()
        .enumerate()
        .filter(|(_, p)| p.storage == Storage::Rows)
        .map(|(i, _)| i)
        .collect();
    let root = model
        .type_def(resource_type)
        .map_or("", |t| t.name.as_str());
    let ti = Arc::new(TypeIndex {
        resource_type: resource_type.to_string(),
        params,
        by_code,
        root,
        rows,
        root_slots,
    });
    if let Ok(mut c) = cache.write() {
        c.insert(resource_type.to_string(), ti.clone());
    }
    Some(ti)
}

fn strip_outer(s: &str) -> &str {
    let s = s.trim();
    if s.starts_with('(') && s.ends_with(')') && !s[1..s.len() - 1].contains(')') {
        return &s[1..s.len() - 1];
    }
    s
}

/// Marks parameters whose branches are all whole expressions of other stored parameters of the
/// same kind (a single branch without a `resolve()` filter) as aliases of those parameters.
fn detect_aliases(params: &mut [IndexedParam]) {
    use std::collections::BTreeSet;
    let n = params.len();
    // Branch sets of the parameters that can be alias targets (stored, no resolve() filter).
    let sets: Vec<Option<BTreeSet<&str>>> = params
        .iter()
        .map(|p| {
            (p.storage == Storage::Rows && p.branch_keys.iter().all(|(_, r)| r.is_none()))
                .then(|| p.branch_keys.iter().map(|(k, _)| k.as_str()).collect())
        })
        .collect();
    // Unions first, so that their parts are fixed as stored targets before being considered.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(params[i].branch_keys.len()), i));
    let mut is_alias = vec![false; n];
    let mut is_target = vec![false; n];
    let mut decided: Vec<(usize, Storage)> = Vec::new();
    for &i in &order {
        let p = &params[i];
        if p.storage != Storage::Rows || is_target[i] {
            continue;
        }
        let ref_type = p.branch_keys[0].1.clone();
        if p.branch_keys.iter().any(|(_, r)| *r != ref_type) {
            continue;
        }
        let want: BTreeSet<&str> = p.branch_keys.iter().map(|(k, _)| k.as_str()).collect();
        let mut covered: BTreeSet<&str> = BTreeSet::new();
        let mut targets = Vec::new();
        for j in 0..n {
            if j == i || is_alias[j] || params[j].kind != p.kind {
                continue;
            }
            let Some(s) = &sets[j] else { continue };
            // Of two parameters with the same expression, the first in code order is stored.
            let usable = s.is_subset(&want) && (*s != want || ref_type.is_some() || j < i);
            if usable && !s.is_subset(&covered) {
                covered.extend(s.iter().copied());
                targets.push(j);
            }
        }
        if covered == want && !targets.is_empty() {
            is_alias[i] = true;
            for &j in &targets {
                is_target[j] = true;
            }
            let codes = targets.iter().map(|&j| params[j].code.clone()).collect();
            decided.push((i, Storage::Alias { codes, ref_type }));
        }
    }
    for (i, s) in decided {
        params[i].storage = s;
    }
}

/// The union branches of a parameter's expression as indexed: (path, `resolve() is T` type).
/// For cross-checking the evaluator against a full FHIRPath engine.
pub fn param_branches(resource_type: &str, code: &str) -> Vec<(String, Option<String>)> {
    type_index(resource_type)
        .and_then(|ti| ti.param(code).map(|p| p.branch_keys.clone()))
        .unwrap_or_default()
}

/// How a parameter of a type is stored (`None` for an unknown or unindexed parameter).
pub fn storage(resource_type: &str, code: &str) -> Option<Storage> {
    type_index(resource_type)?
        .param(code)
        .map(|p| p.storage.clone())
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
        let bound = self.branches.first().is_some_and(|b| {
            resource.get("resourceType").and_then(Json::as_str) == Some(b.bound.root())
        });
        self.extract_with(resource, bound, None, &mut Scratch::default(), out);
    }

    /// [`IndexedParam::extract`] with reusable buffers; `bound`: the caller has checked that
    /// the resource's `resourceType` is the one this parameter was compiled for; `root_vals`
    /// (only with `bound`): its [`TypeIndex::root_members`].
    pub(crate) fn extract_with<'a>(
        &self,
        resource: &'a Json,
        bound: bool,
        root_vals: Option<&[Option<&'a Json>]>,
        scratch: &mut Scratch<'a>,
        out: &mut Vec<IndexValue>,
    ) {
        for b in &self.branches {
            if bound && root_vals.is_some_and(|v| b.bound.absent_in(v)) {
                continue;
            }
            let start = out.len();
            let mut f = |ty: Option<&str>, v: &Json| extract::convert(self.kind, ty, v, out);
            if bound {
                b.bound.evaluate_root(resource, root_vals, scratch, &mut f);
            } else {
                b.path.evaluate(resource, &mut f);
            }
            if let Some(t) = &b.ref_type {
                let part = b.ref_url_part.as_deref().unwrap_or_default();
                // Keep only references to the named type (and identifiers, which have no type).
                let mut i = start;
                while i < out.len() {
                    let keep = match &out[i] {
                        IndexValue::Reference { target_type, .. } => target_type == t,
                        // The SQL side matches `url LIKE '%/T/%'`; keep the two identical.
                        IndexValue::ReferenceUrl(u) => u.contains(part),
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
    if let Some(ti) = type_index(resource_type)
        && let Some(p) = ti.param(code)
    {
        p.extract(resource, &mut out);
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
    fn aliases() {
        let obs = type_index("Observation").unwrap();
        assert_eq!(
            obs.param("patient").unwrap().storage,
            Storage::Alias {
                codes: vec!["subject".into()],
                ref_type: Some("Patient".into())
            }
        );
        assert_eq!(
            obs.param("combo-code").unwrap().storage,
            Storage::Alias {
                codes: vec!["code".into(), "component-code".into()],
                ref_type: None
            }
        );
        assert_eq!(
            obs.param("combo-value-quantity").unwrap().storage,
            Storage::Alias {
                codes: vec!["component-value-quantity".into(), "value-quantity".into()],
                ref_type: None
            }
        );
        assert_eq!(obs.param("code").unwrap().storage, Storage::Rows);
        assert_eq!(obs.param("subject").unwrap().storage, Storage::Rows);
        assert_eq!(obs.param("value-quantity").unwrap().storage, Storage::Rows);
        assert_eq!(obs.param("_id").unwrap().storage, Storage::Id);
    }

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

//! Evaluation of search-parameter expressions over resource JSON.
//!
//! The R4 SearchParameter expressions (after [`crate::registry`] splits unions and strips
//! `where(resolve() is T)`) use a small FHIRPath subset: member paths with choice elements,
//! `ofType(T)`, `where(field = 'literal')`, parentheses, and one `X.exists() and X != false`.
//! This module compiles that subset into steps walked with the R4 model, which reports the FHIR
//! type of every item (so `Observation.effective` yields a `dateTime` or a `Period`). It is the
//! hot path of indexing (every parameter of every resource written), so it allocates nothing
//! per step beyond the item list.

use fhir_model::r4;
use serde_json::Value as Json;

static TRUE: Json = Json::Bool(true);
static FALSE: Json = Json::Bool(false);

#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// A member, by element name (choice elements resolved through the model).
    Child(String),
    /// `[n]`: the n-th item.
    Index(usize),
    /// `ofType(T)`: keep items of type T (or a subtype).
    OfType(String),
    /// `where(field = 'literal')`.
    WhereEq { field: String, literal: String },
}

/// A compiled expression branch.
#[derive(Debug, Clone)]
pub struct CompiledPath {
    steps: Vec<Step>,
    /// `X.exists() and X != false`: one `true` when any item of X is not `false`.
    exists_not_false: bool,
}

/// Splits on `.` outside parentheses and quotes.
fn split_dots(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, false, 0);
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quote = !quote,
            '(' if !quote => depth += 1,
            ')' if !quote => depth -= 1,
            '.' if !quote && depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn strip_parens(s: &str) -> &str {
    let mut s = s.trim();
    while s.starts_with('(') && s.ends_with(')') {
        // Only when the outer pair encloses everything.
        let mut depth = 0;
        let enclosed = s.char_indices().all(|(i, c)| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            depth > 0 || i == s.len() - 1
        });
        if !enclosed {
            break;
        }
        s = s[1..s.len() - 1].trim();
    }
    s
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl CompiledPath {
    pub fn compile(expr: &str) -> Result<CompiledPath, String> {
        let e = strip_parens(expr);
        if let Some((left, right)) = e.split_once(" and ") {
            let x = left.trim().strip_suffix(".exists()").map(str::trim);
            let y = right.trim().strip_suffix("!= false").map(str::trim);
            return match (x, y) {
                (Some(x), Some(y)) if x == y => {
                    let mut p = Self::compile(x)?;
                    p.exists_not_false = true;
                    Ok(p)
                }
                _ => Err(format!("unsupported expression '{expr}'")),
            };
        }
        let parts = split_dots(e);
        let mut steps = Vec::new();
        // The first segment names the resource type (or Resource/DomainResource).
        let mut iter = parts.into_iter();
        match iter.next().map(strip_parens) {
            Some(first) if is_ident(first) => {}
            Some(first) if first.contains('.') => {
                // `(Observation.value).ofType(X)`: a parenthesized path head.
                let inner = Self::compile(first)?;
                steps.extend(inner.steps);
            }
            _ => return Err(format!("unsupported expression '{expr}'")),
        }
        for part in iter {
            let part = part.trim();
            if is_ident(part) {
                steps.push(Step::Child(part.to_string()));
            } else if let Some((name, idx)) = part.strip_suffix(']').and_then(|p| p.split_once('['))
                && is_ident(name)
                && let Ok(n) = idx.parse::<usize>()
            {
                steps.push(Step::Child(name.to_string()));
                steps.push(Step::Index(n));
            } else if let Some(t) = part
                .strip_prefix("ofType(")
                .and_then(|r| r.strip_suffix(')'))
            {
                steps.push(Step::OfType(
                    t.trim().trim_start_matches("FHIR.").to_string(),
                ));
            } else if let Some(cond) = part
                .strip_prefix("where(")
                .and_then(|r| r.strip_suffix(')'))
            {
                let (field, lit) = cond
                    .split_once('=')
                    .ok_or_else(|| format!("unsupported where in '{expr}'"))?;
                let field = field.trim();
                let lit = lit.trim();
                let quoted = lit.len() >= 2 && lit.starts_with('\'') && lit.ends_with('\'');
                if !(is_ident(field) && quoted) {
                    return Err(format!("unsupported where in '{expr}'"));
                }
                steps.push(Step::WhereEq {
                    field: field.to_string(),
                    literal: lit[1..lit.len() - 1].to_string(),
                });
            } else {
                return Err(format!("unsupported step '{part}' in '{expr}'"));
            }
        }
        Ok(CompiledPath {
            steps,
            exists_not_false: false,
        })
    }

    /// Calls `f(type, value)` for every selected item; the type is the FHIR type name.
    pub fn evaluate(&self, resource: &Json, f: &mut dyn FnMut(Option<&str>, &Json)) {
        let model = r4();
        let Some(rt) = resource.get("resourceType").and_then(Json::as_str) else {
            return;
        };
        let mut items: Vec<(&str, &Json)> =
            vec![(model.type_def(rt).map_or(rt, |t| t.name.as_str()), resource)];
        let mut next: Vec<(&str, &Json)> = Vec::new();
        for step in &self.steps {
            next.clear();
            match step {
                Step::Child(name) => {
                    for &(ty, v) in &items {
                        child_dynamic(ty, name, v, &mut next);
                    }
                }
                Step::Index(n) => next.extend(items.get(*n).copied()),
                Step::OfType(t) => of_type(model, &items, t, &mut next),
                Step::WhereEq { field, literal } => {
                    next.extend(
                        items
                            .iter()
                            .filter(|(_, v)| {
                                v.get(field.as_str()).and_then(Json::as_str)
                                    == Some(literal.as_str())
                            })
                            .copied(),
                    );
                }
            }
            std::mem::swap(&mut items, &mut next);
        }
        if self.exists_not_false {
            // FHIRPath: `X.exists()` is false without X, and `false and {}` is false, so the
            // expression yields a boolean for every resource (`deceased=false` finds the living).
            let any = items.iter().any(|(_, v)| **v != Json::Bool(false));
            f(Some("boolean"), if any { &TRUE } else { &FALSE });
            return;
        }
        for (t, v) in items {
            f(Some(t), v);
        }
    }

    /// This path with its member steps resolved against the model for resources of type
    /// `resource_type` (see [`BoundPath`]).
    pub fn bind(&self, resource_type: &str) -> BoundPath {
        let model = r4();
        let root = model
            .type_def(resource_type)
            .map_or("", |t| t.name.as_str());
        // The types items can have before each step, as far as the model tells (items below a
        // `Resource` element get their type from their JSON and take the dynamic path).
        let mut types: Vec<&'static str> = vec![root];
        let mut steps = Vec::with_capacity(self.steps.len());
        for step in &self.steps {
            match step {
                Step::Child(name) => {
                    let mut by_type = Vec::new();
                    let mut out_types: Vec<&'static str> = Vec::new();
                    for &ty in &types {
                        let r = resolve_child(ty, name);
                        for (_, t) in &r.keys {
                            if !out_types.contains(t) {
                                out_types.push(t);
                            }
                        }
                        by_type.push((ty, r));
                    }
                    types = out_types;
                    steps.push(BoundStep::Child {
                        name: name.clone(),
                        by_type,
                    });
                }
                Step::Index(n) => steps.push(BoundStep::Index(*n)),
                Step::OfType(t) => {
                    types.retain(|ty| model.is_subtype_of(ty, t));
                    steps.push(BoundStep::OfType(t.clone()));
                }
                Step::WhereEq { field, literal } => steps.push(BoundStep::WhereEq {
                    field: field.clone(),
                    literal: literal.clone(),
                }),
            }
        }
        BoundPath {
            root,
            steps,
            exists_not_false: self.exists_not_false,
            first_slots: Vec::new(),
        }
    }
}

/// How a member name resolves on one item type.
#[derive(Debug, Clone)]
struct Resolved {
    /// The element is a choice (`value[x]`): `keys` are its JSON keys in the model's type order.
    choice: bool,
    /// The element holds resources: items take their type from their `resourceType`.
    resource: bool,
    /// (JSON key, FHIR type) per type of the element; empty when the type has no such element.
    keys: Vec<(String, &'static str)>,
}

fn resolve_child(ty: &str, name: &str) -> Resolved {
    let model = r4();
    let Some(el) = model.element(ty, name) else {
        return Resolved {
            choice: false,
            resource: false,
            keys: Vec::new(),
        };
    };
    if el.choice {
        let keys = el
            .types
            .iter()
            .map(|t| (choice_key(name, t), intern(t)))
            .collect();
        return Resolved {
            choice: true,
            resource: false,
            keys,
        };
    }
    let t = el.types.first().map_or("", String::as_str);
    Resolved {
        choice: false,
        resource: t == "Resource",
        keys: vec![(
            name.to_string(),
            if t == "Resource" { "" } else { intern(t) },
        )],
    }
}

/// The JSON key of choice element `name[x]` holding type `t`: `value` + `Quantity`.
fn choice_key(name: &str, t: &str) -> String {
    let mut key = String::with_capacity(name.len() + t.len());
    key.push_str(name);
    let mut cs = t.chars();
    if let Some(c0) = cs.next() {
        key.push(c0.to_ascii_uppercase());
        key.push_str(cs.as_str());
    }
    key
}

/// The items whose type is `t` or a subtype of it (`ofType(t)`).
fn of_type<'t, 'a>(
    model: &fhir_model::Model,
    items: &[(&'t str, &'a Json)],
    t: &str,
    next: &mut Vec<(&'t str, &'a Json)>,
) {
    next.extend(
        items
            .iter()
            .filter(|(ty, _)| model.is_subtype_of(ty, t))
            .copied(),
    );
}

/// The children named `name` of one item of type `ty`, resolved through the model at each call.
fn child_dynamic<'a>(ty: &str, name: &str, v: &'a Json, next: &mut Vec<(&'a str, &'a Json)>) {
    let model = r4();
    let Some(obj) = v.as_object() else { return };
    let Some(el) = model.element(ty, name) else {
        return;
    };
    if el.choice {
        for t in &el.types {
            if let Some(c) = obj.get(&choice_key(name, t)) {
                push_items(next, intern(t), c);
            }
        }
    } else if let Some(c) = obj.get(name) {
        let t = el.types.first().map_or("", String::as_str);
        if t == "Resource" {
            push_resources(next, c);
        } else {
            push_items(next, intern(t), c);
        }
    }
}

/// Items of an element that holds resources, typed by their `resourceType`.
fn push_resources<'a>(next: &mut Vec<(&'a str, &'a Json)>, c: &'a Json) {
    let model = r4();
    let one = std::slice::from_ref(c);
    for r in c.as_array().map_or(one, Vec::as_slice) {
        let rt = r
            .get("resourceType")
            .and_then(Json::as_str)
            .unwrap_or("Resource");
        next.push((
            model.type_def(rt).map_or("Resource", |d| d.name.as_str()),
            r,
        ));
    }
}

/// A member of a JSON object. Small objects are scanned (cheaper than hashing the key).
pub(crate) fn member<'a>(obj: &'a serde_json::Map<String, Json>, key: &str) -> Option<&'a Json> {
    if obj.len() <= 16 {
        obj.iter().find(|(k, _)| key_eq(k, key)).map(|(_, v)| v)
    } else {
        obj.get(key)
    }
}

/// String equality without a `memcmp` call for the short keys of FHIR JSON.
#[inline]
fn key_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

#[derive(Debug, Clone)]
enum BoundStep {
    /// A member, resolved per item type known when binding; other types (items below a
    /// `Resource` element) are resolved at evaluation as [`CompiledPath`] does.
    Child {
        name: String,
        by_type: Vec<(&'static str, Resolved)>,
    },
    Index(usize),
    OfType(String),
    WhereEq {
        field: String,
        literal: String,
    },
}

/// A [`CompiledPath`] bound to one resource type: member lookups in the model are done once at
/// binding instead of for every item of every resource. Gives exactly what
/// [`CompiledPath::evaluate`] gives (resources of another type than the bound one are evaluated
/// by the unbound path).
#[derive(Debug, Clone)]
pub struct BoundPath {
    root: &'static str,
    steps: Vec<BoundStep>,
    exists_not_false: bool,
    /// Slots of the first step's JSON keys in a table of root members that the caller fills
    /// once per resource (see [`BoundPath::first_keys`]); empty when not used.
    first_slots: Vec<usize>,
}

/// Reusable item buffers for [`BoundPath::evaluate_root`].
#[derive(Default)]
pub struct Scratch<'a> {
    items: Vec<(&'static str, &'a Json)>,
    next: Vec<(&'static str, &'a Json)>,
}

impl BoundPath {
    /// The model's name of the resource type this path is bound to.
    pub fn root(&self) -> &'static str {
        self.root
    }

    /// The JSON keys the first step reads on the root resource, in the model's type order,
    /// when the path starts with a member step on the root (and is not an `exists()` test,
    /// which yields a value without any). A path with no such key in a resource yields nothing.
    pub fn first_keys(&self) -> Option<Vec<&str>> {
        if self.exists_not_false {
            return None;
        }
        let Some(BoundStep::Child { by_type, .. }) = self.steps.first() else {
            return None;
        };
        let [(ty, r)] = by_type.as_slice() else {
            return None;
        };
        if *ty != self.root || r.resource {
            return None;
        }
        Some(r.keys.iter().map(|(k, _)| k.as_str()).collect())
    }

    /// Sets the slots (one per [`BoundPath::first_keys`] key) where [`BoundPath::evaluate_root`]
    /// finds the root's members when given a table.
    pub fn set_first_slots(&mut self, slots: Vec<usize>) {
        self.first_slots = slots;
    }

    /// Whether the path yields nothing for a resource whose root members are `root_vals`.
    pub fn absent_in(&self, root_vals: &[Option<&Json>]) -> bool {
        !self.first_slots.is_empty()
            && self
                .first_slots
                .iter()
                .all(|&i| root_vals.get(i).is_some_and(Option::is_none))
    }

    /// Like [`CompiledPath::evaluate`] for a resource whose `resourceType` the caller has checked
    /// to be [`BoundPath::root`].
    ///
    /// `root_vals`: the root's members by slot (see [`BoundPath::set_first_slots`]).
    pub fn evaluate_root<'a>(
        &self,
        resource: &'a Json,
        root_vals: Option<&[Option<&'a Json>]>,
        scratch: &mut Scratch<'a>,
        f: &mut dyn FnMut(Option<&str>, &Json),
    ) {
        let model = r4();
        let Scratch { items, next } = scratch;
        items.clear();
        let mut steps = self.steps.iter();
        match (root_vals, self.steps.first()) {
            (Some(vals), Some(BoundStep::Child { by_type, .. }))
                if !self.first_slots.is_empty()
                    && self.first_slots.iter().all(|&i| i < vals.len()) =>
            {
                // The first member step, from the table: the keys in the model's type order,
                // as the step itself would take them.
                steps.next();
                if let Some((_, r)) = by_type.first() {
                    for (&slot, &(_, t)) in self.first_slots.iter().zip(&r.keys) {
                        if let Some(c) = vals[slot] {
                            push_items(items, t, c);
                        }
                    }
                }
            }
            _ => items.push((self.root, resource)),
        }
        for step in steps {
            next.clear();
            match step {
                BoundStep::Child { name, by_type } => {
                    for &(ty, v) in items.iter() {
                        let resolved = by_type
                            .iter()
                            .find(|(t, _)| std::ptr::eq(*t, ty) || *t == ty)
                            .map(|(_, r)| r);
                        let Some(r) = resolved else {
                            child_dynamic_static(ty, name, v, next);
                            continue;
                        };
                        let Some(obj) = v.as_object() else { continue };
                        if r.choice {
                            choice_children(obj, name, &r.keys, next);
                        } else if let Some(&(ref key, t)) = r.keys.first()
                            && let Some(c) = member(obj, key)
                        {
                            if r.resource {
                                push_resources_static(next, c);
                            } else {
                                push_items(next, t, c);
                            }
                        }
                    }
                }
                BoundStep::Index(n) => next.extend(items.get(*n).copied()),
                BoundStep::OfType(t) => of_type(model, items, t, next),
                BoundStep::WhereEq { field, literal } => {
                    next.extend(
                        items
                            .iter()
                            .filter(|(_, v)| {
                                v.as_object()
                                    .and_then(|o| member(o, field))
                                    .and_then(Json::as_str)
                                    == Some(literal.as_str())
                            })
                            .copied(),
                    );
                }
            }
            std::mem::swap(items, next);
        }
        if self.exists_not_false {
            let any = items.iter().any(|(_, v)| **v != Json::Bool(false));
            f(Some("boolean"), if any { &TRUE } else { &FALSE });
            return;
        }
        for &(t, v) in items.iter() {
            f(Some(t), v);
        }
    }
}

/// The items of a choice element, in the model's type order (as [`child_dynamic`] gives them).
/// Scans the object's keys once instead of looking up every possible key.
fn choice_children<'a>(
    obj: &'a serde_json::Map<String, Json>,
    name: &str,
    keys: &[(String, &'static str)],
    next: &mut Vec<(&'static str, &'a Json)>,
) {
    let mut found: Option<(usize, &'a Json)> = None;
    for (k, v) in obj {
        if k.len() <= name.len() || !k.starts_with(name) {
            continue;
        }
        let Some(i) = keys.iter().position(|(key, _)| key == k) else {
            continue;
        };
        if found.is_some() {
            // Two types of one choice element (invalid FHIR): the model's order decides.
            for &(ref key, t) in keys {
                if let Some(c) = obj.get(key) {
                    push_items(next, t, c);
                }
            }
            return;
        }
        found = Some((i, v));
    }
    if let Some((i, c)) = found {
        push_items(next, keys[i].1, c);
    }
}

/// [`child_dynamic`] with the model's `'static` type names.
fn child_dynamic_static<'a>(
    ty: &str,
    name: &str,
    v: &'a Json,
    next: &mut Vec<(&'static str, &'a Json)>,
) {
    let mut tmp: Vec<(&str, &'a Json)> = Vec::new();
    child_dynamic(ty, name, v, &mut tmp);
    next.extend(tmp.into_iter().map(|(t, v)| (intern_any(t), v)));
}

fn push_resources_static<'a>(next: &mut Vec<(&'static str, &'a Json)>, c: &'a Json) {
    let mut tmp: Vec<(&str, &'a Json)> = Vec::new();
    push_resources(&mut tmp, c);
    next.extend(tmp.into_iter().map(|(t, v)| (intern_any(t), v)));
}

/// A type name from the model (or `Resource` for an unknown resource type) as `'static`.
fn intern_any(t: &str) -> &'static str {
    match r4().type_def(t) {
        Some(d) => d.name.as_str(),
        None if t == "Resource" => "Resource",
        None => "",
    }
}

fn push_items<'t, 'a>(next: &mut Vec<(&'t str, &'a Json)>, t: &'t str, child: &'a Json) {
    match child {
        Json::Array(a) => a.iter().for_each(|c| next.push((t, c))),
        c => next.push((t, c)),
    }
}

/// Type names are the model's `&'static` strings; this returns them with a `'static` lifetime.
fn intern(t: &str) -> &'static str {
    let model = r4();
    model.type_def(t).map_or("", |d| d.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(expr: &str, r: &Json) -> Vec<(String, Json)> {
        let p = CompiledPath::compile(expr).unwrap();
        let mut out = Vec::new();
        p.evaluate(r, &mut |t, v| {
            out.push((t.unwrap_or_default().to_string(), v.clone()))
        });
        out
    }

    #[test]
    fn paths_choices_and_filters() {
        let obs = json!({"resourceType":"Observation","effectiveDateTime":"2020-01-01","valueQuantity":{"value":1},
            "code":{"coding":[{"code":"a"},{"code":"b"}]}});
        assert_eq!(
            eval("Observation.effective", &obs),
            vec![("dateTime".into(), json!("2020-01-01"))]
        );
        assert_eq!(eval("(Observation.value.ofType(Quantity))", &obs).len(), 1);
        assert_eq!(
            eval("Observation.value.ofType(CodeableConcept)", &obs).len(),
            0
        );
        assert_eq!(eval("Observation.code.coding.code", &obs).len(), 2);
        let p = json!({"resourceType":"Patient","telecom":[{"system":"phone","value":"1"},{"system":"email","value":"e"}],"deceasedBoolean":false});
        assert_eq!(
            eval("Patient.telecom.where(system='email')", &p)[0].1["value"],
            "e"
        );
        assert_eq!(
            eval(
                "Patient.deceased.exists() and Patient.deceased != false",
                &p
            ),
            vec![("boolean".into(), json!(false))]
        );
        assert_eq!(
            eval(
                "Patient.deceased.exists() and Patient.deceased != false",
                &json!({"resourceType":"Patient"})
            ),
            vec![("boolean".into(), json!(false))]
        );
        assert_eq!(
            eval(
                "Resource.meta.lastUpdated",
                &json!({"resourceType":"Patient","meta":{"lastUpdated":"2020"}})
            )[0]
            .0,
            "instant"
        );
    }

    #[test]
    fn bound_paths_give_what_unbound_paths_give() {
        let obs = json!({"resourceType":"Observation","valueString":"x","valueQuantity":{"value":1},
            "effectivePeriod":{"start":"2020"},"effectiveDateTime":"2021",
            "component":[{"code":{"text":"a"},"valueBoolean":true},{"valueInteger":3}],
            "contained":[{"resourceType":"Patient","name":[{"family":"D"}]}]});
        for expr in [
            "Observation.value",
            "Observation.effective",
            "(Observation.value.ofType(Quantity))",
            "Observation.component.value",
            "Observation.component.code.text",
            "Observation.contained.name.family",
            "Observation.component[1].value",
            "Observation.subject.exists() and Observation.subject != false",
        ] {
            let p = CompiledPath::compile(expr).unwrap();
            let mut old = Vec::new();
            p.evaluate(&obs, &mut |t, v| {
                old.push((t.map(str::to_string), v.clone()))
            });
            let b = p.bind("Observation");
            let mut new = Vec::new();
            b.evaluate_root(&obs, None, &mut Scratch::default(), &mut |t, v| {
                new.push((t.map(str::to_string), v.clone()))
            });
            assert_eq!(old, new, "{expr}");
        }
    }

    #[test]
    fn every_r4_search_expression_compiles() {
        let m = r4();
        let mut failed = Vec::new();
        for t in m.resource_types() {
            for p in m.search_params(t) {
                if matches!(
                    p.kind,
                    fhir_model::SearchParamType::Composite | fhir_model::SearchParamType::Special
                ) {
                    continue;
                }
                let Some(e) = &p.expression else { continue };
                for b in crate::registry::split_union(e) {
                    let (path, _) = crate::registry::strip_resolve(b);
                    if let Err(err) = CompiledPath::compile(path) {
                        failed.push(err);
                    }
                }
            }
        }
        assert!(failed.is_empty(), "{failed:#?}");
    }
}

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
                        let Some(obj) = v.as_object() else { continue };
                        let Some(el) = model.element(ty, name) else {
                            continue;
                        };
                        if el.choice {
                            for t in &el.types {
                                let mut key = String::with_capacity(name.len() + t.len());
                                key.push_str(name);
                                let mut cs = t.chars();
                                if let Some(c0) = cs.next() {
                                    key.push(c0.to_ascii_uppercase());
                                    key.push_str(cs.as_str());
                                }
                                if let Some(c) = obj.get(&key) {
                                    push_items(&mut next, intern(t), c);
                                }
                            }
                        } else if let Some(c) = obj.get(name.as_str()) {
                            let t = el.types.first().map_or("", String::as_str);
                            if t == "Resource" {
                                for r in
                                    c.as_array().map_or_else(|| vec![c], |a| a.iter().collect())
                                {
                                    let rt = r
                                        .get("resourceType")
                                        .and_then(Json::as_str)
                                        .unwrap_or("Resource");
                                    next.push((
                                        model.type_def(rt).map_or("Resource", |d| d.name.as_str()),
                                        r,
                                    ));
                                }
                            } else {
                                push_items(&mut next, intern(t), c);
                            }
                        }
                    }
                }
                Step::Index(n) => next.extend(items.get(*n).copied()),
                Step::OfType(t) => {
                    next.extend(
                        items
                            .iter()
                            .filter(|(ty, _)| model.is_subtype_of(ty, t))
                            .copied(),
                    );
                }
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
}

fn push_items<'a>(next: &mut Vec<(&'a str, &'a Json)>, t: &'a str, child: &'a Json) {
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

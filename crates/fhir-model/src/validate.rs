//! Structural validation of FHIR JSON against the R4 model.
//!
//! Checks: a known concrete `resourceType`; no unknown elements; primitive syntax; `_element` shadow
//! objects that hold only `id`/`extension`; arrays exactly where the maximum cardinality is `*`;
//! contained resources and `Bundle.entry.resource` validated as resources. Cardinality minimums and
//! invariants are not checked (profiles and invariants are not part of structural validation).

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::model::{Model, TypeDef, TypeKind};

/// One problem found by validation, with the FHIRPath-style location of the offending element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationIssue {
    /// For example `Patient.name[0].given[1]`.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ValidationIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Stop collecting after this many issues: a hostile document must not make the report huge.
const MAX_ISSUES: usize = 100;
/// Nesting limit, so that deeply nested input cannot exhaust the stack.
const MAX_DEPTH: usize = 64;

struct Validator<'m> {
    model: &'m Model,
    issues: Vec<ValidationIssue>,
}

// Validation depends on the model, not the reverse: the method is defined here.
impl Model {
    /// Structural validation of a resource: a known concrete `resourceType`, no unknown elements,
    /// primitive syntax, `_element` shadow objects, arrays exactly where the maximum cardinality is
    /// `*`, contained resources and `Bundle.entry.resource` validated as resources.
    pub fn validate(&self, resource: &Value) -> Result<(), Vec<ValidationIssue>> {
        let mut v = Validator {
            model: self,
            issues: Vec::new(),
        };
        let mut path = String::with_capacity(128);
        v.resource(resource, &mut path, 0);
        if v.issues.is_empty() {
            Ok(())
        } else {
            Err(v.issues)
        }
    }
}

/// Append `[i]` to a path (formatted in place: no allocation).
fn push_index(path: &mut String, i: usize) {
    // Writing to a String cannot fail.
    let _ = write!(path, "[{i}]");
}

/// Whether `obj` has the `_key` shadow of `key`.
fn has_shadow(obj: &Map<String, Value>, key: &str) -> bool {
    let mut name = String::with_capacity(key.len() + 1);
    name.push('_');
    name.push_str(key);
    obj.contains_key(&name)
}

impl<'m> Validator<'m> {
    fn issue(&mut self, path: &str, message: impl Into<String>) {
        if self.issues.len() < MAX_ISSUES {
            self.issues.push(ValidationIssue {
                path: if path.is_empty() {
                    "$".to_string()
                } else {
                    path.to_string()
                },
                message: message.into(),
            });
        }
    }

    /// Validates a resource; `path` is where it sits (empty for the root).
    fn resource(&mut self, value: &Value, path: &mut String, depth: usize) {
        let Some(obj) = value.as_object() else {
            self.issue(path, "a resource must be a JSON object");
            return;
        };
        let rt = match obj.get("resourceType") {
            Some(Value::String(rt)) => rt.as_str(),
            Some(_) => {
                self.issue(path, "resourceType must be a string");
                return;
            }
            None => {
                self.issue(path, "missing resourceType");
                return;
            }
        };
        let model = self.model;
        let def = model
            .type_def(rt)
            .filter(|t| t.kind == TypeKind::Resource && !t.is_abstract);
        let Some(def) = def else {
            self.issue(path, format!("unknown resource type '{rt}'"));
            return;
        };
        // Inside a parent the path already names the element; the root starts with the type.
        let saved = path.len();
        if path.is_empty() {
            path.push_str(rt);
        }
        self.object(rt, Some(def), obj, path, true, depth);
        path.truncate(saved);
    }

    /// An object of type `type_name`, whose definition is `def` (`None` if the model has none).
    fn object(
        &mut self,
        type_name: &str,
        def: Option<&'m TypeDef>,
        obj: &Map<String, Value>,
        path: &mut String,
        is_resource: bool,
        depth: usize,
    ) {
        if depth > MAX_DEPTH {
            self.issue(path, "nesting too deep");
            return;
        }
        let Some(def) = def else {
            self.issue(path, format!("unknown type '{type_name}'"));
            return;
        };
        let model = self.model;
        for (key, value) in obj {
            if is_resource && key == "resourceType" {
                continue;
            }
            let saved = path.len();
            path.push('.');
            path.push_str(key);
            if let Some(name) = key.strip_prefix('_') {
                match model.child_with_def(def, name) {
                    Some((child, Some(child_def))) if child_def.kind == TypeKind::Primitive => {
                        self.shadow(value, child.element.max_many, path, depth);
                        if value.is_null() && !obj.contains_key(name) {
                            self.issue(path, "empty primitive extension");
                        }
                    }
                    Some(_) => self.issue(
                        path,
                        format!("'{key}' is not a primitive element, it cannot have a '_' shadow"),
                    ),
                    None => self.issue(path, format!("unknown element '{name}' in {type_name}")),
                }
            } else {
                match model.child_with_def(def, key) {
                    Some((child, child_def)) => {
                        let many = child.element.max_many;
                        self.element(
                            child.type_name,
                            child_def,
                            value,
                            many,
                            obj,
                            key,
                            path,
                            depth,
                        );
                    }
                    None => self.issue(path, format!("unknown element '{key}' in {type_name}")),
                }
            }
            path.truncate(saved);
        }
    }

    /// The value of element `key` of `parent`, of type `ty` (defined by `def`).
    #[allow(clippy::too_many_arguments)]
    fn element(
        &mut self,
        ty: &str,
        def: Option<&'m TypeDef>,
        value: &Value,
        many: bool,
        parent: &Map<String, Value>,
        key: &str,
        path: &mut String,
        depth: usize,
    ) {
        match (many, value) {
            (true, Value::Array(items)) => {
                if items.is_empty() {
                    self.issue(path, "arrays must not be empty");
                }
                // Looked up on the first null only: most arrays have none.
                let mut shadowed: Option<bool> = None;
                for (i, item) in items.iter().enumerate() {
                    let saved = path.len();
                    push_index(path, i);
                    // In primitive arrays, null stands for "value only in the shadow array".
                    let skip =
                        item.is_null() && *shadowed.get_or_insert_with(|| has_shadow(parent, key));
                    if !skip {
                        self.single(ty, def, item, path, depth);
                    }
                    path.truncate(saved);
                }
            }
            (true, _) => self.issue(
                path,
                "this element repeats (max *): its value must be an array",
            ),
            (false, Value::Array(_)) => self.issue(
                path,
                "this element does not repeat (max 1): its value must not be an array",
            ),
            (false, v) => self.single(ty, def, v, path, depth),
        }
    }

    fn single(
        &mut self,
        ty: &str,
        def: Option<&'m TypeDef>,
        value: &Value,
        path: &mut String,
        depth: usize,
    ) {
        if ty == "Resource" {
            self.resource(value, path, depth + 1);
            return;
        }
        if let Some(prim) = def.and_then(|d| d.prim) {
            if value.is_null() {
                self.issue(path, "null is not a valid value");
            } else if !crate::primitives::value_ok(prim, value) {
                self.issue(
                    path,
                    format!("invalid {ty} value {}", truncate(&value.to_string())),
                );
            }
            return;
        }
        match value.as_object() {
            Some(obj) => {
                if obj.is_empty() {
                    self.issue(path, "objects must not be empty");
                }
                self.object(ty, def, obj, path, false, depth + 1)
            }
            None => self.issue(path, format!("a {ty} must be a JSON object")),
        }
    }

    /// A `_name` shadow: an object with `id` and/or `extension` (or an array of them, null allowed).
    fn shadow(&mut self, value: &Value, many: bool, path: &mut String, depth: usize) {
        match (many, value) {
            (true, Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if item.is_null() {
                        continue;
                    }
                    let saved = path.len();
                    push_index(path, i);
                    self.shadow_object(item, path, depth);
                    path.truncate(saved);
                }
            }
            (true, _) => self.issue(path, "the shadow of a repeating primitive must be an array"),
            (false, v) => self.shadow_object(v, path, depth),
        }
    }

    fn shadow_object(&mut self, value: &Value, path: &mut String, depth: usize) {
        match value.as_object() {
            Some(obj) => {
                let element = self.model.type_def("Element");
                self.object("Element", element, obj, path, false, depth + 1)
            }
            None => self.issue(path, "a primitive's '_' shadow must be a JSON object"),
        }
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= 80 {
        s.to_string()
    } else {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use crate::r4;
    use serde_json::json;

    fn issues(v: serde_json::Value) -> Vec<String> {
        match r4().validate(&v) {
            Ok(()) => vec![],
            Err(e) => e.into_iter().map(|i| i.to_string()).collect(),
        }
    }

    #[test]
    fn accepts_a_valid_patient() {
        let p = json!({
            "resourceType": "Patient", "id": "p1",
            "meta": {"versionId": "1", "lastUpdated": "2020-01-01T00:00:00Z"},
            "name": [{"family": "Doe", "given": ["J", null], "_given": [null, {"extension": [{"url": "http://x", "valueString": "y"}]}]}],
            "birthDate": "1970-01-01", "_birthDate": {"id": "b"},
            "deceasedBoolean": false,
            "contained": [{"resourceType": "Organization", "id": "o"}],
            "contact": [{"name": {"family": "X"}}]
        });
        assert_eq!(issues(p), Vec::<String>::new());
    }

    #[test]
    fn names_the_path_of_each_problem() {
        let p = json!({
            "resourceType": "Patient",
            "name": {"family": "Doe"},
            "birthDate": "2020-13-45",
            "foo": 1,
            "gender": ["male"],
            "contained": [{"resourceType": "Nope"}],
            "id": "bad id"
        });
        let got = issues(p);
        assert!(
            got.iter().any(|i| i.starts_with("Patient.name:")),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|i| i.starts_with("Patient.birthDate: invalid date")),
            "{got:?}"
        );
        assert!(
            got.iter().any(|i| i.contains("unknown element 'foo'")),
            "{got:?}"
        );
        assert!(
            got.iter().any(|i| i.starts_with("Patient.gender:")),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|i| i.starts_with("Patient.contained[0]: unknown resource type 'Nope'")),
            "{got:?}"
        );
        assert!(
            got.iter().any(|i| i.starts_with("Patient.id: invalid id")),
            "{got:?}"
        );
    }

    #[test]
    fn nulls_in_arrays_need_a_shadow_and_indices_are_exact() {
        let mut given: Vec<serde_json::Value> = (0..11).map(|i| json!(format!("g{i}"))).collect();
        given.push(serde_json::Value::Null);
        let p = json!({"resourceType": "Patient", "name": [{"given": given.clone()}]});
        assert_eq!(
            issues(p),
            vec!["Patient.name[0].given[11]: null is not a valid value".to_string()]
        );
        let mut shadows = vec![serde_json::Value::Null; 11];
        shadows.push(json!({"id": "x"}));
        let p = json!({"resourceType": "Patient", "name": [{"given": given, "_given": shadows}]});
        assert_eq!(issues(p), Vec::<String>::new());
        let p = json!({"resourceType": "Patient", "name": [{"_given": [null, {"id": 1}]}]});
        assert_eq!(
            issues(p),
            vec!["Patient.name[0]._given[1].id: invalid string value 1".to_string()]
        );
    }

    #[test]
    fn rejects_non_resources() {
        assert!(!issues(json!([1])).is_empty());
        assert!(!issues(json!({"id": "x"})).is_empty());
        assert!(!issues(json!({"resourceType": "DomainResource"})).is_empty());
        assert!(!issues(json!({"resourceType": "HumanName"})).is_empty());
    }

    #[test]
    fn validates_bundle_entries() {
        let b = json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": "urn:uuid:6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": 1.50}}},
            {"resource": {"resourceType": "Observation", "valueFoo": 1}}
        ]});
        let got = issues(b);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("Bundle.entry[1].resource.valueFoo"),
            "{got:?}"
        );
    }

    #[test]
    fn deep_nesting_is_reported() {
        // serde_json refuses documents nested deeper than 128; stay below that, above our limit.
        let mut text = String::from(r#"{"text": "x"}"#);
        for _ in 0..40 {
            text = format!(r#"{{"extension": [{{"url": "u", "valueCodeableConcept": {text}}}]}}"#);
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let p = json!({"resourceType": "Patient", "maritalStatus": v});
        let got = issues(p);
        assert!(
            got.iter().any(|i| i.contains("nesting too deep")),
            "{got:?}"
        );
    }
}

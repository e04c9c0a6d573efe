//! Structural validation of FHIR JSON against the R4 model.
//!
//! Checks: a known concrete `resourceType`; no unknown elements; primitive syntax; `_element` shadow
//! objects that hold only `id`/`extension`; arrays exactly where the maximum cardinality is `*`;
//! contained resources and `Bundle.entry.resource` validated as resources. Cardinality minimums and
//! invariants are not checked (profiles and invariants are not part of structural validation).

use serde_json::{Map, Value};

use crate::model::{Model, TypeKind};

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

pub(crate) fn validate_resource(
    model: &Model,
    resource: &Value,
) -> Result<(), Vec<ValidationIssue>> {
    let mut v = Validator {
        model,
        issues: Vec::new(),
    };
    let mut path = String::new();
    v.resource(resource, &mut path, 0);
    if v.issues.is_empty() {
        Ok(())
    } else {
        Err(v.issues)
    }
}

impl Validator<'_> {
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
        let concrete = self
            .model
            .type_def(rt)
            .is_some_and(|t| t.kind == TypeKind::Resource && !t.is_abstract);
        if !concrete {
            self.issue(path, format!("unknown resource type '{rt}'"));
            return;
        }
        // Inside a parent the path already names the element; the root starts with the type.
        let saved = path.len();
        if path.is_empty() {
            path.push_str(rt);
        }
        self.object(rt, obj, path, true, depth);
        path.truncate(saved);
    }

    fn object(
        &mut self,
        type_name: &str,
        obj: &Map<String, Value>,
        path: &mut String,
        is_resource: bool,
        depth: usize,
    ) {
        if depth > MAX_DEPTH {
            self.issue(path, "nesting too deep");
            return;
        }
        let Some(def) = self.model.type_def(type_name) else {
            self.issue(path, format!("unknown type '{type_name}'"));
            return;
        };
        for (key, value) in obj {
            if is_resource && key == "resourceType" {
                continue;
            }
            let saved = path.len();
            path.push('.');
            path.push_str(key);
            if let Some(name) = key.strip_prefix('_') {
                match def.child(name) {
                    Some(child) if self.model.is_primitive(child.type_name) => {
                        self.shadow(value, child.element.max_many, path, depth);
                        if !obj.contains_key(name) && value.is_null() {
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
                match def.child(key) {
                    Some(child) => {
                        let ty = child.type_name;
                        let many = child.element.max_many;
                        let has_shadow = obj.contains_key(&format!("_{key}"));
                        self.element(ty, value, many, has_shadow, path, depth);
                    }
                    None => self.issue(path, format!("unknown element '{key}' in {type_name}")),
                }
            }
            path.truncate(saved);
        }
    }

    fn element(
        &mut self,
        ty: &str,
        value: &Value,
        many: bool,
        has_shadow: bool,
        path: &mut String,
        depth: usize,
    ) {
        match (many, value) {
            (true, Value::Array(items)) => {
                if items.is_empty() {
                    self.issue(path, "arrays must not be empty");
                }
                for (i, item) in items.iter().enumerate() {
                    let saved = path.len();
                    path.push('[');
                    path.push_str(&i.to_string());
                    path.push(']');
                    // In primitive arrays, null stands for "value only in the shadow array".
                    if !(item.is_null() && has_shadow) {
                        self.single(ty, item, path, depth);
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
            (false, v) => self.single(ty, v, path, depth),
        }
    }

    fn single(&mut self, ty: &str, value: &Value, path: &mut String, depth: usize) {
        if ty == "Resource" {
            self.resource(value, path, depth + 1);
            return;
        }
        if self.model.is_primitive(ty) {
            if value.is_null() {
                self.issue(path, "null is not a valid value");
            } else if !crate::primitives::primitive_value_ok(ty, value) {
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
                self.object(ty, obj, path, false, depth + 1)
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
                    path.push_str(&format!("[{i}]"));
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
            Some(obj) => self.object("Element", obj, path, false, depth + 1),
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

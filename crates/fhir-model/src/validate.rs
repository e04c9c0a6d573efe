//! Structural validation of FHIR JSON against the R4 model.
//!
//! Checks: a known concrete `resourceType`; no unknown elements; primitive syntax; choice elements
//! (`value[x]`) present with one type only; `_element` shadow objects that are not empty and hold
//! only `id`/`extension`, shadow arrays as long as their value arrays and never `null` where the
//! value is `null` too; arrays exactly where the maximum cardinality is `*`; contained resources
//! and `Bundle.entry.resource` validated as resources. Cardinality minimums and
//! invariants are not checked (profiles and invariants are not part of structural validation).

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::model::{ElementDef, Model, TypeDef, TypeKind};

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
    /// primitive syntax, one type per choice element, `_element` shadow objects and arrays, arrays
    /// exactly where the maximum cardinality is `*`, contained resources and
    /// `Bundle.entry.resource` validated as resources.
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
        let mut choices = ChoicesSeen::default();
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
                        if child.element.choice {
                            self.choice(&mut choices, child.element, name, path);
                        }
                        self.shadow(value, child.element.max_many, obj, name, path, depth);
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
                        if child.element.choice {
                            self.choice(&mut choices, child.element, key, path);
                        }
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

    /// Records that the choice element `element` (`value[x]`) appears as `key` (`valueQuantity`,
    /// or the name of a `_valueString` shadow): a choice element takes one type only.
    fn choice<'k>(
        &mut self,
        seen: &mut ChoicesSeen<'m, 'k>,
        element: &'m ElementDef,
        key: &'k str,
        path: &str,
    ) {
        for (el, first) in seen.seen.iter().flatten() {
            if std::ptr::eq(*el, element) {
                if *first != key {
                    self.issue(
                        path,
                        format!(
                            "'{}[x]' is a choice element with one type only, but both '{first}' and '{key}' are present",
                            element.name
                        ),
                    );
                }
                return;
            }
        }
        if let Some(slot) = seen.seen.iter_mut().find(|s| s.is_none()) {
            *slot = Some((element, key));
        }
    }

    /// A `_name` shadow of the primitive element `name` of `parent`: an object with `id` and/or
    /// `extension`, or for a repeating element an array of them, aligned with the `name` array
    /// (same length, `null` where one side has no entry, never `null` on both sides).
    fn shadow(
        &mut self,
        value: &Value,
        many: bool,
        parent: &Map<String, Value>,
        name: &str,
        path: &mut String,
        depth: usize,
    ) {
        match (many, value) {
            (true, Value::Array(items)) => {
                if items.is_empty() {
                    self.issue(path, "arrays must not be empty");
                }
                // The values the shadows align with (a non-array `name` is reported on `name`).
                let named = parent.get(name);
                if let Some(Value::Array(values)) = named
                    && values.len() != items.len()
                {
                    self.issue(
                        path,
                        format!(
                            "'_{name}' has {} entries but '{name}' has {}: the arrays must have the same length, with null where one side has no entry",
                            items.len(),
                            values.len()
                        ),
                    );
                }
                for (i, item) in items.iter().enumerate() {
                    let saved = path.len();
                    push_index(path, i);
                    if item.is_null() {
                        match named {
                            None => self.issue(
                                path,
                                format!(
                                    "null in '_{name}' and no '{name}' array: each entry needs a value or an extension"
                                ),
                            ),
                            // Past the end of `name`: reported as a length mismatch above.
                            Some(Value::Array(values))
                                if values.get(i).is_some_and(Value::is_null) =>
                            {
                                self.issue(
                                    path,
                                    format!(
                                        "null in both '{name}' and '_{name}' at this index: each entry needs a value or an extension"
                                    ),
                                )
                            }
                            _ => {}
                        }
                    } else {
                        self.shadow_object(item, path, depth);
                    }
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
                if obj.is_empty() {
                    self.issue(
                        path,
                        "objects must not be empty: a primitive's '_' shadow holds an 'id' and/or 'extension'",
                    );
                }
                let element = self.model.type_def("Element");
                self.object("Element", element, obj, path, false, depth + 1)
            }
            None => self.issue(path, "a primitive's '_' shadow must be a JSON object"),
        }
    }
}

/// The choice elements (`value[x]`) met so far in one object, each with the first key that named
/// it. A fixed array, so that validation allocates nothing per object: R4 types have at most 5
/// choice elements (`ElementDefinition`); were a type to have more, the extra ones would go
/// unchecked.
#[derive(Default)]
struct ChoicesSeen<'m, 'k> {
    seen: [Option<(&'m ElementDef, &'k str)>; 8],
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
        let p = json!({"resourceType": "Patient", "name": [{"_given": [{"id": "a"}, {"id": 1}]}]});
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

    #[test]
    fn a_choice_element_takes_one_type() {
        // The reviewed cases: two and three types of one `[x]` element.
        let p = json!({"resourceType": "Patient", "id": "e18", "deceasedBoolean": true, "deceasedDateTime": "2020"});
        assert_eq!(
            issues(p),
            vec!["Patient.deceasedDateTime: 'deceased[x]' is a choice element with one type only, but both 'deceasedBoolean' and 'deceasedDateTime' are present".to_string()]
        );
        let o = json!({"resourceType": "Observation", "id": "c1", "status": "final", "code": {"text": "x"},
            "valueQuantity": {"value": 5}, "valueString": "hello", "valueBoolean": true});
        assert_eq!(
            issues(o),
            vec![
                "Observation.valueString: 'value[x]' is a choice element with one type only, but both 'valueQuantity' and 'valueString' are present".to_string(),
                "Observation.valueBoolean: 'value[x]' is a choice element with one type only, but both 'valueQuantity' and 'valueBoolean' are present".to_string(),
            ]
        );
        // A shadow of another type counts as that type.
        let p = json!({"resourceType": "Patient", "deceasedBoolean": true, "_deceasedDateTime": {"id": "x"}});
        assert_eq!(
            issues(p),
            vec!["Patient._deceasedDateTime: 'deceased[x]' is a choice element with one type only, but both 'deceasedBoolean' and 'deceasedDateTime' are present".to_string()]
        );
        // Nested objects (extensions, backbone elements) are checked too.
        let p = json!({"resourceType": "Patient", "extension": [{"url": "http://x", "valueString": "a", "valueCode": "b"}]});
        let got = issues(p);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("Patient.extension[0].valueCode: 'value[x]'"),
            "{got:?}"
        );
    }

    #[test]
    fn distinct_choice_elements_and_a_choice_with_its_own_shadow_are_valid() {
        // One type with its shadow, or the shadow alone.
        let p = json!({"resourceType": "Patient", "deceasedDateTime": "2020", "_deceasedDateTime": {"id": "d"},
            "multipleBirthInteger": 2});
        assert_eq!(issues(p), Vec::<String>::new());
        let p = json!({"resourceType": "Patient", "_deceasedBoolean": {"extension": [{"url": "http://x", "valueString": "y"}]}});
        assert_eq!(issues(p), Vec::<String>::new());
        // Several different choice elements in one object: effective[x], value[x] (and none twice).
        let o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "effectiveDateTime": "2020-01-01", "valueQuantity": {"value": 5},
            "component": [{"code": {"text": "a"}, "valueString": "s"}, {"code": {"text": "b"}, "valueBoolean": true}]});
        assert_eq!(issues(o), Vec::<String>::new());
    }

    #[test]
    fn the_choice_table_is_large_enough_for_every_type() {
        // `ChoicesSeen` holds 8 choice elements per object; the R4 model needs at most 5.
        let raw: serde_json::Value =
            serde_json::from_str(include_str!("../data/r4-model.json")).unwrap();
        let most = raw["types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                t["e"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e[1].as_u64() != Some(0))
                    .count()
            })
            .max()
            .unwrap();
        assert!(most > 0 && most <= 8, "{most}");
    }

    #[test]
    fn shadow_arrays_align_with_their_values() {
        // Longer shadow than values (the reviewed e8).
        let p = json!({"resourceType": "Patient", "id": "e8", "name": [{"given": ["a"], "_given": [null, {"id": "x"}]}]});
        assert_eq!(
            issues(p),
            vec!["Patient.name[0]._given: '_given' has 2 entries but 'given' has 1: the arrays must have the same length, with null where one side has no entry".to_string()]
        );
        // Shorter shadow than values.
        let p = json!({"resourceType": "Patient", "name": [{"given": ["a", "b"], "_given": [{"id": "x"}]}]});
        let got = issues(p);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("Patient.name[0]._given: '_given' has 1 entries but 'given' has 2"),
            "{got:?}"
        );
        // Null on both sides (the reviewed e21).
        let p = json!({"resourceType": "Patient", "id": "e21", "name": [{"given": [null], "_given": [null]}]});
        assert_eq!(
            issues(p),
            vec!["Patient.name[0]._given[0]: null in both 'given' and '_given' at this index: each entry needs a value or an extension".to_string()]
        );
        let p = json!({"resourceType": "Patient", "name": [{"given": ["a", null], "_given": [{"id": "x"}, null]}]});
        assert_eq!(
            issues(p),
            vec!["Patient.name[0]._given[1]: null in both 'given' and '_given' at this index: each entry needs a value or an extension".to_string()]
        );
        // A shadow array without values: every entry must be an object.
        let p = json!({"resourceType": "Patient", "name": [{"_given": [{"id": "x"}, null]}]});
        assert_eq!(
            issues(p),
            vec!["Patient.name[0]._given[1]: null in '_given' and no 'given' array: each entry needs a value or an extension".to_string()]
        );
        let p = json!({"resourceType": "Patient", "name": [{"given": ["a"], "_given": []}]});
        assert_eq!(
            issues(p),
            vec![
                "Patient.name[0]._given: arrays must not be empty".to_string(),
                "Patient.name[0]._given: '_given' has 0 entries but 'given' has 1: the arrays must have the same length, with null where one side has no entry".to_string(),
            ]
        );
    }

    #[test]
    fn aligned_shadow_arrays_are_valid() {
        let p = json!({"resourceType": "Patient", "name": [
            {"given": ["a", "b"], "_given": [null, {"id": "x"}]},
            {"given": ["a", null], "_given": [{"id": "x"}, {"extension": [{"url": "http://x", "valueString": "y"}]}]},
            {"given": [null], "_given": [{"id": "only-extension"}]},
            {"given": ["a", "b"], "_given": [{"id": "x"}, {"id": "y"}]},
            {"_given": [{"id": "x"}, {"id": "y"}]}
        ]});
        assert_eq!(issues(p), Vec::<String>::new());
    }

    #[test]
    fn shadow_objects_must_not_be_empty() {
        // The reviewed e12.
        let p = json!({"resourceType": "Patient", "id": "e12", "gender": "male", "_gender": {}});
        assert_eq!(
            issues(p),
            vec!["Patient._gender: objects must not be empty: a primitive's '_' shadow holds an 'id' and/or 'extension'".to_string()]
        );
        // Without the value too, and in shadow arrays.
        let p = json!({"resourceType": "Patient", "_gender": {}});
        assert_eq!(
            issues(p),
            vec!["Patient._gender: objects must not be empty: a primitive's '_' shadow holds an 'id' and/or 'extension'".to_string()]
        );
        let p = json!({"resourceType": "Patient", "name": [{"given": ["a"], "_given": [{}]}]});
        assert_eq!(
            issues(p),
            vec!["Patient.name[0]._given[0]: objects must not be empty: a primitive's '_' shadow holds an 'id' and/or 'extension'".to_string()]
        );
        // A shadow without its value is valid when it has content (extension only).
        let p = json!({"resourceType": "Patient", "_gender": {"extension": [{"url": "http://x", "valueCode": "y"}]}});
        assert_eq!(issues(p), Vec::<String>::new());
    }
}

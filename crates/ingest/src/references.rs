//! Resolution of `urn:uuid:` (and other `fullUrl`) references to `Type/id`.

use std::collections::HashMap;

use serde_json::Value;

/// Maps a `fullUrl` (`urn:uuid:X`, `urn:oid:X`, or an absolute URL) to the relative reference
/// `Type/id` of the resource stored for it.
#[derive(Debug, Default, Clone)]
pub struct ReferenceMap {
    map: HashMap<String, String>,
}

impl ReferenceMap {
    pub fn new() -> ReferenceMap {
        ReferenceMap::default()
    }

    pub fn insert(&mut self, full_url: impl Into<String>, resource_type: &str, id: &str) {
        self.map
            .insert(full_url.into(), format!("{resource_type}/{id}"));
    }

    pub fn get(&self, full_url: &str) -> Option<&str> {
        self.map.get(full_url).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Rewrite every `reference` string anywhere in `value` (contained resources, extensions,
    /// nested backbone elements) that names a known fullUrl. A `urn:` reference that is not known
    /// is left as is and reported to `unresolved` with its FHIRPath-like location (relative to
    /// `root`). Returns the number of references rewritten.
    pub fn rewrite(
        &self,
        value: &mut Value,
        root: &str,
        unresolved: &mut dyn FnMut(&str, String),
    ) -> usize {
        self.rewrite_tracking(value, root, unresolved, &mut |_, _| {})
    }

    /// [`ReferenceMap::rewrite`], and each reference rewritten is reported to `resolved` with the
    /// fullUrl it named and its location (built on demand, relative to `root`).
    pub fn rewrite_tracking(
        &self,
        value: &mut Value,
        root: &str,
        unresolved: &mut dyn FnMut(&str, String),
        resolved: &mut dyn FnMut(&str, &dyn Fn() -> String),
    ) -> usize {
        self.walk(value, &Step::Root(root), unresolved, resolved)
    }

    fn walk(
        &self,
        value: &mut Value,
        at: &Step<'_>,
        unresolved: &mut dyn FnMut(&str, String),
        resolved: &mut dyn FnMut(&str, &dyn Fn() -> String),
    ) -> usize {
        let mut n = 0;
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    match v {
                        Value::String(s) if k == "reference" => {
                            if let Some((full_url, target)) = self.map.get_key_value(s.as_str()) {
                                resolved(full_url, &|| Step::Member(at, k).path());
                                *s = target.clone();
                                n += 1;
                            } else if s.starts_with("urn:") {
                                unresolved(s, Step::Member(at, k).path());
                            }
                        }
                        Value::Object(_) | Value::Array(_) => {
                            n += self.walk(v, &Step::Member(at, k), unresolved, resolved);
                        }
                        _ => {}
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter_mut().enumerate() {
                    if matches!(v, Value::Object(_) | Value::Array(_)) {
                        n += self.walk(v, &Step::Index(at, i), unresolved, resolved);
                    }
                }
            }
            _ => {}
        }
        n
    }
}

/// Where the walk is, as a chain of steps on the stack: the path string is only built for the
/// (rare) unresolved reference.
enum Step<'a> {
    Root(&'a str),
    Member(&'a Step<'a>, &'a str),
    Index(&'a Step<'a>, usize),
}

impl Step<'_> {
    fn path(&self) -> String {
        match self {
            Step::Root(r) => r.to_string(),
            Step::Member(up, k) => format!("{}.{k}", up.path()),
            Step::Index(up, i) => format!("{}[{i}]", up.path()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rewrites_nested_references_and_reports_unknown_urns() {
        let mut map = ReferenceMap::new();
        map.insert("urn:uuid:1", "Patient", "1");
        let mut v = json!({
            "resourceType": "Observation",
            "subject": {"reference": "urn:uuid:1"},
            "contained": [{"resourceType": "Provenance", "target": [{"reference": "urn:uuid:1"}]}],
            "extension": [{"url": "x", "valueReference": {"reference": "urn:uuid:2"}}],
            "performer": [{"reference": "Practitioner/7"}, {"reference": "#c1"}]
        });
        let mut missing = Vec::new();
        let n = map.rewrite(&mut v, "Observation", &mut |r, p| {
            missing.push((r.to_string(), p))
        });
        assert_eq!(n, 2);
        assert_eq!(v["subject"]["reference"], "Patient/1");
        assert_eq!(v["contained"][0]["target"][0]["reference"], "Patient/1");
        assert_eq!(v["performer"][0]["reference"], "Practitioner/7");
        assert_eq!(
            missing,
            vec![(
                "urn:uuid:2".to_string(),
                "Observation.extension[0].valueReference.reference".to_string()
            )]
        );
    }
}

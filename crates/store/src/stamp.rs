//! Ids, instants and the stamping of `id`/`meta` into a resource before it is stored.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde_json::{Map, Value};

/// A FHIR id: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A plausible resource type name: an ASCII letter-initial upper camel identifier. (Whether the
/// type exists in FHIR is the model's business, not the store's.)
pub fn is_valid_type_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'A'..=b'Z'))
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_alphanumeric())
}

/// Milliseconds since the epoch as a FHIR instant in UTC with millisecond precision:
/// `2026-11-22T11:03:10.123Z`.
pub fn format_instant_ms(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

/// Parse a FHIR instant or dateTime (`2026-11-22T11:03:10.123Z`, with offset, or a partial date
/// `2026`, `2026-11`, `2026-11-22`, taken as the start of that period in UTC) into ms since the
/// epoch. `None` if it is not one.
pub fn parse_instant_ms(text: &str) -> Option<i64> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    let date = match text.len() {
        4 => NaiveDate::parse_from_str(&format!("{text}-01-01"), "%Y-%m-%d").ok()?,
        7 => NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d").ok()?,
        10 => NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?,
        _ => return None,
    };
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

/// A resource ready to be stored: validated, serialized apart from the members the store stamps
/// (`id`, `meta.versionId`, `meta.lastUpdated`), and turned into search index entries.
///
/// Every create and update goes through one: [`crate::Store::write`] builds it inside the write
/// for [`crate::WriteOp::Create`] and [`crate::WriteOp::Update`], and a bulk loader builds it ahead
/// of time with [`crate::Store::prepare_put`] on worker threads and passes
/// [`crate::WriteOp::Put`], so that the single writer only splices bytes and inserts rows. The
/// stored JSON is `{"resourceType","id","meta":{"versionId","lastUpdated",…rest of meta},…}`:
/// `resourceType`, `id` and `meta` first, as FHIR JSON conventionally orders them, every other
/// member (and the rest of `meta`) in its original order.
#[derive(Debug, Clone)]
pub struct PreparedResource {
    pub(crate) resource_type: String,
    pub(crate) id: String,
    /// `,"k":v` for each member of `meta` except `versionId` and `lastUpdated`.
    meta_rest: Vec<u8>,
    /// `,"k":v` for each member except `resourceType`, `id` and `meta`.
    rest: Vec<u8>,
    /// The search index entries, when the store that prepared it indexes.
    pub(crate) index: Option<Vec<crate::IndexEntry>>,
    /// `(versionId, lastUpdated)` to store it as instead of the next version at the write's
    /// instant ([`PreparedResource::keeping_version`]).
    pub(crate) kept: Option<(i64, String)>,
}

impl PreparedResource {
    /// Serialize `resource` (already checked: an object of `resource_type` whose `id`, if any,
    /// equals `id`) and compute its index entries with `indexer`, on the resource with `id` set.
    pub(crate) fn build(
        resource_type: &str,
        id: &str,
        mut resource: Map<String, Value>,
        indexer: Option<&dyn crate::Indexer>,
    ) -> Result<PreparedResource, crate::StoreError> {
        let index = match indexer {
            Some(indexer) => {
                if resource.get("id").and_then(Value::as_str) != Some(id) {
                    resource.insert("id".to_string(), Value::String(id.to_string()));
                }
                let value = Value::Object(resource);
                let entries = crate::index::bounded_entries(indexer, resource_type, &value);
                let Value::Object(m) = value else {
                    unreachable!("built as an object above")
                };
                resource = m;
                Some(entries)
            }
            None => None,
        };
        let mut meta_rest = Vec::new();
        let mut rest = Vec::with_capacity(1024);
        let json = |e: serde_json::Error| crate::StoreError::InvalidResource(e.to_string());
        for (k, v) in &resource {
            match k.as_str() {
                "resourceType" | "id" => {}
                "meta" => {
                    if let Value::Object(meta) = v {
                        for (mk, mv) in meta {
                            if mk != "versionId" && mk != "lastUpdated" {
                                member(&mut meta_rest, mk, mv).map_err(json)?;
                            }
                        }
                    }
                }
                _ => member(&mut rest, k, v).map_err(json)?,
            }
        }
        Ok(PreparedResource {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            meta_rest,
            rest,
            index,
            kept: None,
        })
    }

    /// Stores it as version `version` last updated at `last_updated_ms` (formatted like every
    /// stored instant) instead of the next version at the write's instant: `$import`'s
    /// `InitialLoad`, which keeps the input's `meta.versionId` and `meta.lastUpdated`. Such a
    /// [`crate::WriteOp::Put`] only creates: if the resource exists (even deleted) the write
    /// fails with [`crate::StoreError::AlreadyExists`]. The transaction's own instant (what
    /// `_since` compares) stays the write's.
    pub fn keeping_version(mut self, version: i64, last_updated_ms: i64) -> PreparedResource {
        self.kept = Some((version.max(1), format_instant_ms(last_updated_ms)));
        self
    }

    /// The `(versionId, lastUpdated)` [`PreparedResource::keeping_version`] set.
    pub fn kept_version(&self) -> Option<(i64, &str)> {
        self.kept.as_ref().map(|(v, lu)| (*v, lu.as_str()))
    }

    /// The JSON bytes the store writes for it as version `version` last updated `last_updated`
    /// (a stored instant's text): what a read of that version returns. Lets a caller tell
    /// whether a stored version already holds exactly this content.
    pub fn stored_json(&self, version: i64, last_updated: &str) -> Vec<u8> {
        self.stamped(version, last_updated)
    }

    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The stored JSON bytes of this resource as version `version`, last updated `last_updated`.
    pub(crate) fn stamped(&self, version: i64, last_updated: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.rest.len() + self.meta_rest.len() + self.resource_type.len() + self.id.len() + 96,
        );
        // Type names and ids are checked (`is_valid_type_name`, `is_valid_id`) and instants are
        // formatted by the store: none of them needs escaping.
        out.extend_from_slice(b"{\"resourceType\":\"");
        out.extend_from_slice(self.resource_type.as_bytes());
        out.extend_from_slice(b"\",\"id\":\"");
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(b"\",\"meta\":{\"versionId\":\"");
        out.extend_from_slice(version.to_string().as_bytes());
        out.extend_from_slice(b"\",\"lastUpdated\":\"");
        out.extend_from_slice(last_updated.as_bytes());
        out.push(b'"');
        out.extend_from_slice(&self.meta_rest);
        out.push(b'}');
        out.extend_from_slice(&self.rest);
        out.push(b'}');
        out
    }
}

/// Append `,"key":value` (compact JSON) to `out`.
fn member(out: &mut Vec<u8>, key: &str, value: &Value) -> Result<(), serde_json::Error> {
    out.push(b',');
    serde_json::to_writer(&mut *out, key)?;
    out.push(b':');
    serde_json::to_writer(&mut *out, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("abc-1.2"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(is_valid_type_name("Patient"));
        assert!(!is_valid_type_name("patient"));
        assert!(!is_valid_type_name("Pat ient"));
    }

    #[test]
    fn instants_round_trip() {
        let ms = parse_instant_ms("2026-11-22T11:03:10.123Z").unwrap();
        assert_eq!(format_instant_ms(ms), "2026-11-22T11:03:10.123Z");
        assert_eq!(parse_instant_ms("2026-11-22T12:03:10.123+01:00"), Some(ms));
        assert_eq!(
            parse_instant_ms("2026-11-22"),
            parse_instant_ms("2026-11-22T00:00:00Z")
        );
        assert_eq!(
            parse_instant_ms("2026"),
            parse_instant_ms("2026-01-01T00:00:00Z")
        );
        assert_eq!(parse_instant_ms("yesterday"), None);
    }

    #[test]
    fn stamped_json_puts_meta_first_and_keeps_other_meta() {
        let v: Value = serde_json::from_str(
            r#"{"resourceType":"Patient","active":true,"meta":{"versionId":"9","profile":["x"],"lastUpdated":"2000"},"id":"old","name":[{"family":"Ünï \"q\""}],"n":1.50}"#,
        )
        .unwrap();
        let Value::Object(m) = v else { unreachable!() };
        let p = PreparedResource::build("Patient", "p1", m, None).unwrap();
        let out = String::from_utf8(p.stamped(2, "2026-01-01T00:00:00.000Z")).unwrap();
        assert_eq!(
            out,
            r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"2","lastUpdated":"2026-01-01T00:00:00.000Z","profile":["x"]},"active":true,"name":[{"family":"Ünï \"q\""}],"n":1.50}"#
        );
        // The same bytes serde_json writes for the stamped object.
        let reparsed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(serde_json::to_string(&reparsed).unwrap(), out);
    }

    #[test]
    fn meta_that_is_not_an_object_is_replaced() {
        let v: Value = serde_json::from_str(r#"{"resourceType":"Basic","meta":"x"}"#).unwrap();
        let Value::Object(m) = v else { unreachable!() };
        let p = PreparedResource::build("Basic", "b", m, None).unwrap();
        assert_eq!(
            String::from_utf8(p.stamped(1, "2026-01-01T00:00:00.000Z")).unwrap(),
            r#"{"resourceType":"Basic","id":"b","meta":{"versionId":"1","lastUpdated":"2026-01-01T00:00:00.000Z"}}"#
        );
    }

    struct IdIndexer;
    impl crate::Indexer for IdIndexer {
        fn entries(&self, _: &str, resource: &Value) -> Vec<crate::IndexEntry> {
            vec![crate::IndexEntry {
                param: "seen-id".into(),
                value: crate::IndexValue::Uri(resource["id"].as_str().unwrap_or("").into()),
            }]
        }
    }

    #[test]
    fn the_indexer_sees_the_id_the_resource_is_stored_under() {
        let v: Value = serde_json::from_str(r#"{"resourceType":"Basic"}"#).unwrap();
        let Value::Object(m) = v else { unreachable!() };
        let p = PreparedResource::build("Basic", "b7", m, Some(&IdIndexer)).unwrap();
        assert_eq!(
            p.index.unwrap()[0].value,
            crate::IndexValue::Uri("b7".into())
        );
    }
}

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

/// Return the resource object with `id`, `meta.versionId` and `meta.lastUpdated` set, keeping
/// every other element (and the rest of `meta`) in place. `resourceType`, `id` and `meta` come
/// first, as FHIR JSON conventionally orders them.
pub(crate) fn stamp(
    resource: Map<String, Value>,
    resource_type: &str,
    id: &str,
    version: i64,
    last_updated: &str,
) -> Map<String, Value> {
    let mut out = Map::with_capacity(resource.len() + 3);
    out.insert(
        "resourceType".to_string(),
        Value::String(resource_type.to_string()),
    );
    out.insert("id".to_string(), Value::String(id.to_string()));
    let mut meta = Map::new();
    meta.insert("versionId".to_string(), Value::String(version.to_string()));
    meta.insert(
        "lastUpdated".to_string(),
        Value::String(last_updated.to_string()),
    );
    let mut rest = Vec::with_capacity(resource.len());
    for (k, v) in resource {
        match k.as_str() {
            "resourceType" | "id" => {}
            "meta" => {
                if let Value::Object(old) = v {
                    for (mk, mv) in old {
                        if mk != "versionId" && mk != "lastUpdated" {
                            meta.insert(mk, mv);
                        }
                    }
                }
            }
            _ => rest.push((k, v)),
        }
    }
    out.insert("meta".to_string(), Value::Object(meta));
    out.extend(rest);
    out
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
    fn stamp_puts_meta_first_and_keeps_other_meta() {
        let v: Value = serde_json::from_str(
            r#"{"resourceType":"Patient","active":true,"meta":{"versionId":"9","profile":["x"]},"id":"old"}"#,
        )
        .unwrap();
        let Value::Object(m) = v else { unreachable!() };
        let out = Value::Object(stamp(m, "Patient", "p1", 2, "2026-01-01T00:00:00.000Z"));
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"2","lastUpdated":"2026-01-01T00:00:00.000Z","profile":["x"]},"active":true}"#
        );
    }
}

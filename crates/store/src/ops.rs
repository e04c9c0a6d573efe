//! What both backends do with a write op before touching their database: the checks of
//! [`WriteOp`]'s rules, the history method codes stored with each version, and the version key
//! `k = (type_no << 40) | seq` (seq order within a type is key order).

use serde_json::Value;

use crate::{
    HistoryMethod, PreparedResource, StoreError, WriteOp, is_valid_id, is_valid_type_name,
};

/// `k = (type_no << TYPE_SHIFT) | seq`.
pub(crate) const TYPE_SHIFT: u32 = 40;
/// The largest seq a key holds.
pub(crate) const MAX_SEQ: i64 = (1 << TYPE_SHIFT) - 1;
/// History page size when `_count` is absent.
pub(crate) const DEFAULT_HISTORY_COUNT: usize = 50;

/// The bytes of stored JSON one history page holds at most (the search default,
/// [`crate::plan::DEFAULT_MAX_PAGE_BYTES`]): the page ends before the version that would go
/// over it, never before its first.
pub(crate) const MAX_HISTORY_PAGE_BYTES: usize = crate::plan::DEFAULT_MAX_PAGE_BYTES;

/// A page query's column of the stored JSON `$col` (a string literal): NULL when longer than
/// 64 KiB (or a tombstone's NULL). The queries select its length beside it, and a longer JSON is
/// read apart, by its key or seq, once the page's byte budget is known to take it, so that a
/// page of large resources is never read whole first. One spelling for the search pages
/// (`sql_plan`) and the history pages of both backends.
macro_rules! small_json {
    ($col:literal) => {
        concat!("CASE WHEN length(", $col, ") <= 65536 THEN ", $col, " END")
    };
}
pub(crate) use small_json;

/// How many of a page's rows, whose stored JSON lengths `lens` gives in page order, a page of at
/// most `max` bytes takes: all, or those before the first that would go over it (at least one).
/// Also the bytes they hold together.
pub(crate) fn page_cut(lens: impl Iterator<Item = usize>, max: usize) -> (usize, usize) {
    let mut used = 0usize;
    let mut n = 0;
    for len in lens {
        if n > 0 && used.saturating_add(len) > max {
            break;
        }
        used = used.saturating_add(len);
        n += 1;
    }
    (n, used)
}

pub(crate) fn key(type_no: i64, seq: i64) -> i64 {
    (type_no << TYPE_SHIFT) | seq.clamp(0, MAX_SEQ)
}

pub(crate) fn method_code(m: HistoryMethod) -> i64 {
    match m {
        HistoryMethod::Post => 0,
        HistoryMethod::Put => 1,
        HistoryMethod::Delete => 2,
    }
}

pub(crate) fn method_of(code: i64) -> Result<HistoryMethod, StoreError> {
    match code {
        0 => Ok(HistoryMethod::Post),
        1 => Ok(HistoryMethod::Put),
        2 => Ok(HistoryMethod::Delete),
        other => Err(StoreError::Corrupt(format!("unknown method code {other}"))),
    }
}

pub(crate) fn resource_type_of(resource: &Value) -> Result<&str, StoreError> {
    let Value::Object(m) = resource else {
        return Err(StoreError::InvalidResource(
            "a resource must be a JSON object".into(),
        ));
    };
    match m.get("resourceType") {
        Some(Value::String(t)) if is_valid_type_name(t) => Ok(t),
        Some(Value::String(t)) => Err(StoreError::InvalidType(t.clone())),
        _ => Err(StoreError::InvalidResource(
            "resourceType is missing or not a string".into(),
        )),
    }
}

/// A write op after validation.
pub(crate) struct Prepared {
    pub(crate) resource_type: String,
    pub(crate) id: Option<String>,
    pub(crate) resource: Option<Body>,
    pub(crate) if_match: Option<i64>,
    pub(crate) method: HistoryMethod,
    /// A [`WriteOp::Replace`]: the resource must exist (and not be deleted).
    pub(crate) must_exist: bool,
}

pub(crate) enum Body {
    Json(serde_json::Map<String, Value>),
    Ready(PreparedResource),
}

/// Check an update's target and body (the rules of [`WriteOp::Update`]).
pub(crate) fn check_update(
    resource_type: &str,
    id: &str,
    resource: Value,
) -> Result<serde_json::Map<String, Value>, StoreError> {
    if !is_valid_type_name(resource_type) {
        return Err(StoreError::InvalidType(resource_type.to_string()));
    }
    if !is_valid_id(id) {
        return Err(StoreError::InvalidId(id.to_string()));
    }
    let body_type = resource_type_of(&resource)?;
    if body_type != resource_type {
        return Err(StoreError::InvalidResource(format!(
            "resourceType '{body_type}' does not match '{resource_type}'"
        )));
    }
    let Value::Object(m) = resource else {
        return Err(StoreError::InvalidResource(
            "a resource must be a JSON object".into(),
        ));
    };
    match m.get("id") {
        None => {}
        Some(Value::String(body_id)) if body_id == id => {}
        Some(other) => {
            return Err(StoreError::InvalidResource(format!(
                "id {other} in the resource does not match '{id}'"
            )));
        }
    }
    Ok(m)
}

pub(crate) fn prepare(op: WriteOp) -> Result<Prepared, StoreError> {
    let must_exist = matches!(op, WriteOp::Replace { .. });
    match op {
        WriteOp::Create { resource } => {
            let resource_type = resource_type_of(&resource)?.to_string();
            let Value::Object(m) = resource else {
                return Err(StoreError::InvalidResource(
                    "a resource must be a JSON object".into(),
                ));
            };
            let id = match m.get("id") {
                None => None,
                Some(Value::String(id)) if is_valid_id(id) => Some(id.clone()),
                Some(Value::String(id)) => return Err(StoreError::InvalidId(id.clone())),
                Some(_) => return Err(StoreError::InvalidResource("id must be a string".into())),
            };
            Ok(Prepared {
                resource_type,
                id,
                resource: Some(Body::Json(m)),
                if_match: None,
                method: HistoryMethod::Post,
                must_exist: false,
            })
        }
        WriteOp::Update {
            resource_type,
            id,
            resource,
            if_match,
        }
        | WriteOp::Replace {
            resource_type,
            id,
            resource,
            if_match,
        } => {
            let m = check_update(&resource_type, &id, resource)?;
            Ok(Prepared {
                resource_type,
                id: Some(id),
                resource: Some(Body::Json(m)),
                if_match,
                method: HistoryMethod::Put,
                must_exist,
            })
        }
        WriteOp::Put(ready) => Ok(Prepared {
            resource_type: ready.resource_type.clone(),
            id: Some(ready.id.clone()),
            resource: Some(Body::Ready(ready)),
            if_match: None,
            method: HistoryMethod::Put,
            must_exist: false,
        }),
        WriteOp::Delete {
            resource_type,
            id,
            if_match,
        } => {
            if !is_valid_type_name(&resource_type) {
                return Err(StoreError::InvalidType(resource_type));
            }
            if !is_valid_id(&id) {
                return Err(StoreError::InvalidId(id));
            }
            Ok(Prepared {
                resource_type,
                id: Some(id),
                resource: None,
                if_match,
                method: HistoryMethod::Delete,
                must_exist: false,
            })
        }
    }
}

#[cfg(test)]
mod page_tests {
    use super::*;

    #[test]
    fn a_page_takes_what_fits_and_at_least_one() {
        assert_eq!(page_cut([10, 10, 10].into_iter(), 25), (2, 20));
        assert_eq!(page_cut([10, 10, 10].into_iter(), 30), (3, 30));
        assert_eq!(page_cut([100, 1].into_iter(), 10), (1, 100));
        assert_eq!(page_cut(std::iter::empty(), 10), (0, 0));
        assert_eq!(
            (64 * 1024).to_string(),
            small_json!("json").split(' ').nth(4).unwrap()
        );
    }
}

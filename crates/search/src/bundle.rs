//! The `searchset` Bundle of a search page: self and next links (keyset cursor), matches,
//! included resources, the total, and an OperationOutcome entry naming ignored parameters.

use serde_json::{Value as Json, json};

use crate::elements::apply_elements;
use crate::query::{Ignored, SearchQuery};

/// One page of search results.
#[derive(Debug, Clone, Default)]
pub struct SearchPage {
    /// The matching resources of this page, in sort order.
    pub matches: Vec<Json>,
    /// Resources added by `_include` / `_revinclude`.
    pub included: Vec<Json>,
    /// `_total=accurate` (or `_summary=count`): the number of matches over all pages.
    pub total: Option<u64>,
    /// Cursor of the next page, when there is one.
    pub next_cursor: Option<String>,
    /// Why the page is incomplete (included resources left out at a limit), for the
    /// OperationOutcome entry.
    pub warnings: Vec<String>,
}

fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b'/' | b'|' | b',')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Re-encodes the request's parameters (without `_cursor`) for links.
pub fn link_query(params: &[(String, String)], cursor: Option<&str>) -> String {
    let mut parts: Vec<String> = params
        .iter()
        .filter(|(k, _)| k != "_cursor")
        .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
        .collect();
    if let Some(c) = cursor {
        parts.push(format!("_cursor={}", encode_component(c)));
    }
    parts.join("&")
}

/// Builds the searchset Bundle. `base` is the server base URL without a trailing slash;
/// `params` are the request's parameters as received (used for the links). Copies the page's
/// resources; [`into_searchset_bundle`] moves them instead.
pub fn searchset_bundle(
    base: &str,
    q: &SearchQuery,
    params: &[(String, String)],
    page: &SearchPage,
) -> Json {
    into_searchset_bundle(base, q, params, page.clone())
}

/// [`searchset_bundle`] taking the page by value: each resource moves into its entry (no copy
/// of the resource trees, which under search load was a visible share of the server's time:
/// `json!` serialises an embedded value into a new tree, so the entries are built by hand).
pub fn into_searchset_bundle(
    base: &str,
    q: &SearchQuery,
    params: &[(String, String)],
    page: SearchPage,
) -> Json {
    let ty = &q.resource_type;
    let self_url = format!("{base}/{ty}?{}", link_query(params, q.cursor.as_deref()));
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(c) = &page.next_cursor {
        links.push(json!({"relation": "next", "url": format!("{base}/{ty}?{}", link_query(params, Some(c)))}));
    }
    let mut entries = Vec::with_capacity(page.matches.len() + page.included.len() + 1);
    let mut entry = |r: Json, mode: &str| {
        let full_url = {
            let t = r
                .get("resourceType")
                .and_then(Json::as_str)
                .unwrap_or_default();
            let id = r.get("id").and_then(Json::as_str).unwrap_or_default();
            format!("{base}/{t}/{id}")
        };
        let resource = match &q.elements {
            Some(els) if mode == "match" => apply_elements(&r, els),
            _ => r,
        };
        // Built by hand: `json!` would serialise `resource` into a new tree (a deep copy).
        let mut e = serde_json::Map::with_capacity(3);
        e.insert("fullUrl".into(), Json::String(full_url));
        e.insert("resource".into(), resource);
        e.insert("search".into(), json!({"mode": mode}));
        entries.push(Json::Object(e));
    };
    if !q.summary_count {
        for r in page.matches {
            entry(r, "match");
        }
        for r in page.included {
            entry(r, "include");
        }
    }
    if !q.ignored.is_empty() || !page.warnings.is_empty() {
        let mut outcome = ignored_outcome(&q.ignored);
        if let Some(issues) = outcome["issue"].as_array_mut() {
            issues.extend(
                page.warnings.iter().map(
                    |w| json!({"severity": "warning", "code": "too-costly", "diagnostics": w}),
                ),
            );
        }
        entries.push(json!({
            "resource": outcome,
            "search": {"mode": "outcome"},
        }));
    }
    let mut b = json!({
        "resourceType": "Bundle",
        "type": "searchset",
    });
    if let Some(t) = page.total {
        b["total"] = json!(t);
    }
    b["link"] = Json::Array(links);
    b["entry"] = Json::Array(entries);
    b
}

/// An OperationOutcome listing the parameters ignored under `handling=lenient`.
pub fn ignored_outcome(ignored: &[Ignored]) -> Json {
    let issues: Vec<Json> = ignored
        .iter()
        .map(|i| {
            json!({
                "severity": "warning",
                "code": "not-supported",
                "diagnostics": format!("parameter '{}' ignored: {}", i.param, i.reason),
                "expression": [i.param],
            })
        })
        .collect();
    json!({"resourceType": "OperationOutcome", "issue": issues})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{ParseOptions, parse_query, parse_query_string};

    #[test]
    fn links_and_outcome() {
        let params = parse_query_string("name=J%C3%B6rg&foo=1&_cursor=abc");
        let q = parse_query(
            "Patient",
            &params,
            ParseOptions {
                lenient: true,
                ..Default::default()
            },
        )
        .unwrap();
        let page = SearchPage {
            matches: vec![json!({"resourceType":"Patient","id":"1"})],
            next_cursor: Some("n1".into()),
            total: Some(3),
            ..Default::default()
        };
        let b = searchset_bundle("http://h/fhir", &q, &params, &page);
        assert_eq!(b["total"], 3);
        assert_eq!(
            b["link"][1]["url"],
            "http://h/fhir/Patient?name=J%C3%B6rg&foo=1&_cursor=n1"
        );
        assert_eq!(b["entry"][0]["search"]["mode"], "match");
        assert_eq!(b["entry"][1]["search"]["mode"], "outcome");
        assert_eq!(
            b["entry"][1]["resource"]["issue"][0]["expression"][0],
            "foo"
        );
    }
}

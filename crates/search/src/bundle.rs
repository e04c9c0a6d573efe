//! The `searchset` Bundle of a search page: self and next links (keyset cursor), matches,
//! included resources, the total, and an OperationOutcome entry naming ignored parameters.
//!
//! The server writes the Bundle as bytes around the resources' stored JSON ([`BundleBytes`],
//! [`write_searchset`]): a resource is never parsed into a tree and written again (under
//! `_elements` and `_summary`, a subset is cut from the stored bytes, [`crate::subset`]), so a
//! page costs about its stored bytes in memory, not the three to four times a
//! `serde_json::Value` tree of it takes.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{Value as Json, json};

use crate::error::SearchError;
use crate::query::{Ignored, SearchQuery};
use crate::subset::{Subset, Summary};

/// One page of search results, each resource parsed.
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

/// One page of search results with each resource as the store keeps it: compact JSON bytes,
/// not parsed. [`write_searchset`] embeds them in the Bundle as they are.
#[derive(Debug, Clone, Default)]
pub struct PageRows {
    /// The stored JSON of the matching resources of this page, in sort order.
    pub matches: Vec<Vec<u8>>,
    /// The stored JSON of the resources added by `_include` / `_revinclude`.
    pub included: Vec<Vec<u8>>,
    /// As [`SearchPage::total`].
    pub total: Option<u64>,
    /// As [`SearchPage::next_cursor`].
    pub next_cursor: Option<String>,
    /// As [`SearchPage::warnings`].
    pub warnings: Vec<String>,
}

impl PageRows {
    /// Each resource parsed: the page as a [`SearchPage`].
    pub fn parse(self) -> Result<SearchPage, SearchError> {
        let parse = |rows: Vec<Vec<u8>>| -> Result<Vec<Json>, SearchError> {
            rows.iter().map(|b| parse_stored(b)).collect()
        };
        Ok(SearchPage {
            matches: parse(self.matches)?,
            included: parse(self.included)?,
            total: self.total,
            next_cursor: self.next_cursor,
            warnings: self.warnings,
        })
    }
}

fn parse_stored(bytes: &[u8]) -> Result<Json, SearchError> {
    serde_json::from_slice(bytes).map_err(not_json)
}

fn not_json(e: serde_json::Error) -> SearchError {
    SearchError::Store(format!("stored resource is not JSON: {e}"))
}

/// What a Bundle entry needs of a stored resource: its type and id (the `fullUrl`). Reading
/// it checks the whole text is one JSON object (the other members are skipped, not built), so
/// the Bundle never embeds bytes that are not JSON.
#[derive(Deserialize)]
pub struct ResourceHead<'a> {
    /// `resourceType`.
    #[serde(rename = "resourceType", default, borrow)]
    pub resource_type: Option<Cow<'a, str>>,
    /// `id`, when the resource has one.
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
}

impl<'a> ResourceHead<'a> {
    /// The type and id of the stored resource `json`; an error when it is not one JSON object
    /// (stored data the server cannot have written).
    pub fn read(json: &'a [u8]) -> Result<Self, SearchError> {
        if json.trim_ascii_start().first() != Some(&b'{') {
            return Err(SearchError::Store(
                "stored resource is not a JSON object".into(),
            ));
        }
        serde_json::from_slice(json).map_err(not_json)
    }
}

/// A Bundle being written as JSON text around resources embedded as stored. The result is a
/// list of chunks whose concatenation is the Bundle; each resource's bytes are one chunk of
/// their own, moved in (never copied), so a response body can hand them to the socket as they
/// are and free each once sent.
#[derive(Debug, Default)]
pub struct BundleBytes {
    chunks: Vec<Vec<u8>>,
    /// Text written since the last resource.
    open: Vec<u8>,
    len: usize,
}

impl BundleBytes {
    /// Appends JSON text as it is (the caller's text must be valid where it goes).
    pub fn raw(&mut self, text: &str) {
        self.open.extend_from_slice(text.as_bytes());
    }

    /// Appends `s` as a JSON string (quoted and escaped).
    pub fn string(&mut self, s: &str) {
        // Writing a `str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut self.open, s);
    }

    /// Appends a JSON value.
    pub fn value(&mut self, v: &Json) {
        // Writing a `Value` into a `Vec` cannot fail (its map keys are strings).
        let _ = serde_json::to_writer(&mut self.open, v);
    }

    /// Appends a resource's JSON bytes as one chunk of their own.
    pub fn resource(&mut self, json: Vec<u8>) {
        self.flush();
        self.len += json.len();
        self.chunks.push(json);
    }

    fn flush(&mut self) {
        if !self.open.is_empty() {
            self.len += self.open.len();
            self.chunks.push(std::mem::take(&mut self.open));
        }
    }

    /// The bytes written so far.
    pub fn len(&self) -> usize {
        self.len + self.open.len()
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunks, in order.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.flush();
        self.chunks
    }
}

/// Writes the searchset Bundle of `page` as bytes ([`BundleBytes`]), each resource's stored
/// JSON embedded as it is (under `_elements` a match, under `_summary=true|text|data` every
/// resource, is cut from its stored bytes and tagged `SUBSETTED`).
/// `base` is the server base URL without a trailing slash; `params` are the request's
/// parameters as received (used for the links). An included resource whose type
/// `include_allowed` refuses is left out (types the client may not read).
pub fn write_searchset(
    base: &str,
    q: &SearchQuery,
    params: &[(String, String)],
    page: PageRows,
    include_allowed: &dyn Fn(&str) -> bool,
) -> Result<Vec<Vec<u8>>, SearchError> {
    let ty = &q.resource_type;
    let self_url = format!("{base}/{ty}?{}", link_query(params, q.cursor.as_deref()));
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(c) = &page.next_cursor {
        links.push(json!({"relation": "next", "url": format!("{base}/{ty}?{}", link_query(params, Some(c)))}));
    }
    // `_elements` cuts the matches only; `_summary` the included resources too.
    let include_subset = q.summary.subset();
    let match_subset = match &q.elements {
        Some(names) => Some(Subset::Elements(names.clone())),
        None => include_subset.clone(),
    };
    let mut b = BundleBytes::default();
    b.raw(r#"{"resourceType":"Bundle","type":"searchset""#);
    if let Some(t) = page.total {
        b.raw(&format!(r#","total":{t}"#));
    }
    b.raw(r#","link":"#);
    b.value(&Json::Array(links));
    b.raw(r#","entry":["#);
    let mut first = true;
    let mut entry = |b: &mut BundleBytes, json: Vec<u8>, mode: &str| -> Result<(), SearchError> {
        let full_url = {
            let head = ResourceHead::read(&json)?;
            let t = head.resource_type.as_deref().unwrap_or_default();
            if mode == "include" && !include_allowed(t) {
                return Ok(());
            }
            format!("{base}/{t}/{}", head.id.as_deref().unwrap_or_default())
        };
        b.raw(if first {
            r#"{"fullUrl":"#
        } else {
            r#",{"fullUrl":"#
        });
        first = false;
        b.string(&full_url);
        b.raw(r#","resource":"#);
        let subset = if mode == "match" {
            &match_subset
        } else {
            &include_subset
        };
        match subset {
            Some(subset) => b.resource(subset.apply(&json)?),
            None => b.resource(json),
        }
        b.raw(&format!(r#","search":{{"mode":"{mode}"}}}}"#));
        Ok(())
    };
    if q.summary != Summary::Count {
        for json in page.matches {
            entry(&mut b, json, "match")?;
        }
        for json in page.included {
            entry(&mut b, json, "include")?;
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
        b.raw(if first { "" } else { "," });
        b.value(&json!({
            "resource": outcome,
            "search": {"mode": "outcome"},
        }));
    }
    b.raw("]}");
    Ok(b.finish())
}

/// Builds the searchset Bundle as a tree (tests, and callers that want a `Value`): the bytes
/// of [`write_searchset`] for the same page, parsed. `base` is the server base URL without a
/// trailing slash; `params` are the request's parameters as received (used for the links).
pub fn searchset_bundle(
    base: &str,
    q: &SearchQuery,
    params: &[(String, String)],
    page: &SearchPage,
) -> Json {
    into_searchset_bundle(base, q, params, page.clone())
}

/// [`searchset_bundle`] taking the page by value.
pub fn into_searchset_bundle(
    base: &str,
    q: &SearchQuery,
    params: &[(String, String)],
    page: SearchPage,
) -> Json {
    let bytes = |v: Vec<Json>| -> Vec<Vec<u8>> {
        v.iter()
            .map(|r| serde_json::to_vec(r).unwrap_or_default())
            .collect()
    };
    let rows = PageRows {
        matches: bytes(page.matches),
        included: bytes(page.included),
        total: page.total,
        next_cursor: page.next_cursor,
        warnings: page.warnings,
    };
    // Every resource was written from a `Value` just above, so each reads back (a resource that
    // is not an object, which no page holds, would leave the Bundle `null`).
    let chunks = write_searchset(base, q, params, rows, &|_| true).unwrap_or_default();
    serde_json::from_slice(&chunks.concat()).unwrap_or(Json::Null)
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

    fn query(text: &str) -> (SearchQuery, Vec<(String, String)>) {
        let params = parse_query_string(text);
        let q = parse_query(
            "Observation",
            &params,
            ParseOptions {
                lenient: true,
                ..Default::default()
            },
        )
        .unwrap();
        (q, params)
    }

    #[test]
    fn stored_bytes_are_embedded_as_they_are() {
        // Key order, number text and escapes as stored, which a tree might not keep.
        let obs = br#"{"resourceType":"Observation","id":"o-1","valueQuantity":{"value":1.50},"note":[{"text":"a \"b\" \u00e9"}]}"#.to_vec();
        let pat = br#"{"id":"p\u002d1","resourceType":"Patient"}"#.to_vec();
        let (q, params) = query("_include=Observation:subject&_total=accurate");
        let page = PageRows {
            matches: vec![obs.clone()],
            included: vec![pat.clone()],
            total: Some(1),
            next_cursor: Some("c".into()),
            warnings: vec!["cut".into()],
        };
        let chunks =
            write_searchset("http://h/fhir", &q, &params, page.clone(), &|_| true).unwrap();
        assert!(
            chunks.contains(&obs) && chunks.contains(&pat),
            "resources are chunks of their own"
        );
        let bytes = chunks.concat();
        let b: Json = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(b["resourceType"], "Bundle");
        assert_eq!(b["total"], 1);
        assert_eq!(b["entry"][0]["fullUrl"], "http://h/fhir/Observation/o-1");
        assert_eq!(b["entry"][0]["search"]["mode"], "match");
        assert_eq!(b["entry"][1]["fullUrl"], "http://h/fhir/Patient/p-1");
        assert_eq!(b["entry"][1]["search"]["mode"], "include");
        assert_eq!(b["entry"][2]["search"]["mode"], "outcome");
        assert_eq!(b["entry"][2]["resource"]["issue"][0]["diagnostics"], "cut");
        assert_eq!(
            b["link"][1]["url"],
            "http://h/fhir/Observation?_include=Observation:subject&_total=accurate&_cursor=c"
        );
        let keys: Vec<&String> = b.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["resourceType", "type", "total", "link", "entry"]);

        // An include of a type the client may not read is left out, with nothing in its place.
        let chunks =
            write_searchset("http://h/fhir", &q, &params, page, &|t| t != "Patient").unwrap();
        let b: Json = serde_json::from_slice(&chunks.concat()).unwrap();
        let modes: Vec<&Json> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["search"]["mode"])
            .collect();
        assert_eq!(modes, ["match", "outcome"]);
    }

    /// The Bundle `write_searchset` writes for `rows`, every include allowed, parsed.
    fn written(q: &SearchQuery, params: &[(String, String)], rows: PageRows) -> Json {
        let chunks = write_searchset("http://h", q, params, rows, &|_| true).unwrap();
        serde_json::from_slice(&chunks.concat()).unwrap()
    }

    #[test]
    fn elements_count_and_empty_pages() {
        let obs =
            br#"{"resourceType":"Observation","id":"1","status":"final","note":[{"text":"n"}]}"#
                .to_vec();
        let (q, params) = query("_elements=status");
        let rows = PageRows {
            matches: vec![obs.clone()],
            ..Default::default()
        };
        let b = written(&q, &params, rows);
        assert_eq!(b["entry"][0]["resource"]["status"], "final");
        assert!(b["entry"][0]["resource"].get("note").is_none());
        assert_eq!(
            b["entry"][0]["resource"]["meta"]["tag"][0]["code"],
            "SUBSETTED"
        );

        let (q, params) = query("_summary=count");
        let rows = PageRows {
            matches: vec![obs],
            total: Some(7),
            ..Default::default()
        };
        let b = written(&q, &params, rows);
        assert_eq!(b["total"], 7);
        assert_eq!(b["entry"], json!([]));

        let (q, params) = query("status=final");
        let b = written(&q, &params, PageRows::default());
        assert_eq!(b["entry"], json!([]));
        assert!(b.get("total").is_none());
    }

    #[test]
    fn summaries_cut_matches_and_includes_elements_only_matches() {
        let obs = br#"{"resourceType":"Observation","id":"o","text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">o</div>"},"status":"final","code":{"text":"c"},"subject":{"reference":"Patient/p"},"valueQuantity":{"value":1.50},"note":[{"text":"n"}]}"#.to_vec();
        let pat = br#"{"resourceType":"Patient","id":"p","text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">p</div>"},"gender":"male","contact":[{"name":{"family":"X"}}]}"#.to_vec();
        let rows = || PageRows {
            matches: vec![obs.clone()],
            included: vec![pat.clone()],
            ..Default::default()
        };
        let tagged = |r: &Json| {
            r["meta"]["tag"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["code"] == "SUBSETTED"))
        };
        let (q, params) = query("_include=Observation:subject&_summary=true");
        let chunks = write_searchset("http://h", &q, &params, rows(), &|_| true).unwrap();
        let text = String::from_utf8(chunks.concat()).unwrap();
        assert!(text.contains(r#""valueQuantity":{"value":1.50}"#), "{text}");
        let b: Json = serde_json::from_str(&text).unwrap();
        let (m, i) = (&b["entry"][0]["resource"], &b["entry"][1]["resource"]);
        assert!(m.get("note").is_none() && m.get("text").is_none(), "{m}");
        assert_eq!(m["subject"]["reference"], "Patient/p");
        assert!(i.get("contact").is_none() && i.get("text").is_none(), "{i}");
        assert_eq!(i["gender"], "male");
        assert!(tagged(m) && tagged(i));

        let (q, params) = query("_include=Observation:subject&_summary=text");
        let b = written(&q, &params, rows());
        let (m, i) = (&b["entry"][0]["resource"], &b["entry"][1]["resource"]);
        assert!(m.get("subject").is_none() && m["text"]["status"] == "generated");
        assert_eq!(m["status"], "final");
        assert!(i.get("gender").is_none() && i["text"]["status"] == "generated");

        let (q, params) = query("_include=Observation:subject&_summary=data");
        let b = written(&q, &params, rows());
        let (m, i) = (&b["entry"][0]["resource"], &b["entry"][1]["resource"]);
        assert!(m.get("text").is_none() && m["note"][0]["text"] == "n");
        assert!(i.get("text").is_none() && i["contact"][0]["name"]["family"] == "X");
        assert!(tagged(m) && tagged(i));

        // `_elements` cuts the matches only, as before; `_summary=false` nothing.
        let (q, params) = query("_include=Observation:subject&_elements=status");
        let b = written(&q, &params, rows());
        let (m, i) = (&b["entry"][0]["resource"], &b["entry"][1]["resource"]);
        assert!(m.get("note").is_none() && tagged(m));
        assert!(i.get("contact").is_some() && !tagged(i));
        let (q, params) = query("_include=Observation:subject&_summary=false");
        let chunks = write_searchset("http://h", &q, &params, rows(), &|_| true).unwrap();
        assert!(chunks.contains(&obs) && chunks.contains(&pat));
    }

    #[test]
    fn stored_bytes_that_are_not_one_json_object_are_a_server_error() {
        let (q, params) = query("status=final");
        for bad in [
            &b"{\"resourceType\":\"Observation\""[..],
            b"[\"Observation\",\"1\"]",
            b"{\"resourceType\":\"Observation\"} {}",
            b"",
            b"null",
        ] {
            let rows = PageRows {
                matches: vec![bad.to_vec()],
                ..Default::default()
            };
            let e = write_searchset("http://h", &q, &params, rows, &|_| true).unwrap_err();
            assert!(matches!(e, SearchError::Store(_)), "{e:?}");
        }
    }
}

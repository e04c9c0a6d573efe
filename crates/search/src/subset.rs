//! `_summary` and `_elements`: a subset of a resource, cut from its stored JSON bytes.
//!
//! The subset is written in one pass over the bytes as stored, without building a tree: a kept
//! member is copied as it is stored (key order, number text, escapes), a dropped one skipped.
//! `_summary=true` walks into the elements it keeps along the R4 model and keeps, there too,
//! only the children marked `isSummary` in their datatype or backbone definition. Every subset
//! carries the `SUBSETTED` tag in `meta.tag` (added once, `meta` made when missing).
//!
//! What each kind keeps of a resource (FHIR R4 `search.html#summary`, `search.html#elements`):
//!
//! | kind | kept |
//! |---|---|
//! | `_summary=true` | `resourceType`, `id`, `meta`, and the elements marked `isSummary` in the base definition, recursively (a kept element of a datatype or backbone type keeps its children marked summary there); `modifierExtension` whole, other extensions not (they are not summary elements); mandatory elements that are not summary are left out, as the specification's "solely" says |
//! | `_summary=text` | `resourceType`, `id`, `meta`, `text` and the top-level mandatory elements |
//! | `_summary=data` | everything but `text` (of the resource and of its contained resources) |
//! | `_elements=a,b` | `resourceType`, `id`, `meta`, the top-level mandatory elements and the named top-level elements (`value` keeps `valueQuantity`) |
//!
//! Bytes that are not one JSON object are an error ([`SearchError::Store`]: stored data the
//! server cannot have written), never a panic.

use std::borrow::Cow;
use std::ops::Range;

use fhir_model::{ChildRef, Model, TypeDef, TypeKind};

use crate::error::SearchError;

/// The system of the `SUBSETTED` tag.
pub const SUBSETTED_SYSTEM: &str = fhir_model::SUBSETTED_SYSTEM;

/// The `SUBSETTED` tag as JSON text.
const SUBSETTED_TAG: &str =
    r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}"#;

/// Elements nested deeper than this (in the model: `Questionnaire.item.item…`) are kept whole
/// by `_summary=true` rather than walked, which bounds the walk's recursion whatever the
/// stored JSON; no R4 resource of real data nests its elements that deep.
const MAX_DEPTH: usize = 32;

/// A `_summary` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Summary {
    /// `false` (or no `_summary`): the whole resource.
    #[default]
    False,
    /// `true`: the elements marked `isSummary`.
    True,
    /// `text`: `text`, `id`, `meta` and the top-level mandatory elements.
    Text,
    /// `data`: everything but `text`.
    Data,
    /// `count` (search only): the total alone.
    Count,
}

impl Summary {
    /// The value of a `_summary` parameter; `None` when it is none of the five.
    pub fn parse(value: &str) -> Option<Summary> {
        Some(match value {
            "false" => Summary::False,
            "true" => Summary::True,
            "text" => Summary::Text,
            "data" => Summary::Data,
            "count" => Summary::Count,
            _ => return None,
        })
    }

    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Summary::False => "false",
            Summary::True => "true",
            Summary::Text => "text",
            Summary::Data => "data",
            Summary::Count => "count",
        }
    }

    /// What it cuts of each resource it returns: `None` for `false` and `count` (whole
    /// resources, or none).
    pub fn subset(self) -> Option<Subset> {
        match self {
            Summary::True => Some(Subset::Summary),
            Summary::Text => Some(Subset::Text),
            Summary::Data => Some(Subset::Data),
            Summary::False | Summary::Count => None,
        }
    }
}

/// What is kept of a resource: see the module's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subset {
    /// `_elements`: these top-level element names (`Patient.name` already cut to `name`).
    Elements(Vec<String>),
    /// `_summary=true`.
    Summary,
    /// `_summary=text`.
    Text,
    /// `_summary=data`.
    Data,
}

impl Subset {
    /// The subset of the resource whose JSON is `json` (a stored resource: one JSON object),
    /// tagged `SUBSETTED`: each kept member's bytes as they are in `json`.
    pub fn apply(&self, json: &[u8]) -> Result<Vec<u8>, SearchError> {
        // The walk below trusts the text to be JSON: checked first, without building anything.
        serde_json::from_slice::<serde::de::IgnoredAny>(json).map_err(|e| not_json(&e))?;
        let mut cut = Cut {
            scan: Scan { src: json, pos: 0 },
            out: Vec::with_capacity(json.len().min(1 << 16)),
            model: fhir_model::r4(),
            subset: self,
            dropped: false,
        };
        cut.scan.ws();
        if cut.scan.peek() != Some(b'{') {
            return Err(SearchError::Store(
                "stored resource is not a JSON object".into(),
            ));
        }
        cut.resource(true, 0)?;
        // `_summary=data` of a resource without text, `_elements` naming all it has: the
        // resource is complete, and a `SUBSETTED` tag would say otherwise (and keep a client
        // from writing back what it read).
        if !cut.dropped {
            return Ok(json.to_vec());
        }
        Ok(cut.out)
    }
}

fn not_json(e: &dyn std::fmt::Display) -> SearchError {
    SearchError::Store(format!("stored resource is not JSON: {e}"))
}

fn malformed() -> SearchError {
    SearchError::Store("stored resource is not JSON".into())
}

/// A position in JSON text known to be valid (checked by [`Subset::apply`]); every step still
/// checks what it reads, so text that is not JSON ends in an error, not a panic.
#[derive(Debug, Clone, Copy)]
struct Scan<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while matches!(self.src.get(self.pos), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn expect(&mut self, byte: u8) -> Result<(), SearchError> {
        self.ws();
        if self.peek() != Some(byte) {
            return Err(malformed());
        }
        self.pos += 1;
        Ok(())
    }

    /// Past a string (at its opening quote).
    fn skip_string(&mut self) -> Result<(), SearchError> {
        self.pos += 1;
        loop {
            match self.peek() {
                None => return Err(malformed()),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => self.pos += 2,
                Some(_) => self.pos += 1,
            }
        }
    }

    /// Past one value (after white space), nested ones included, without recursion; its span.
    fn skip_value(&mut self) -> Result<Range<usize>, SearchError> {
        self.ws();
        let start = self.pos;
        let mut depth = 0usize;
        loop {
            match self.peek().ok_or_else(malformed)? {
                b'"' => self.skip_string()?,
                b'{' | b'[' => {
                    depth += 1;
                    self.pos += 1;
                }
                b'}' | b']' => {
                    depth = depth.checked_sub(1).ok_or_else(malformed)?;
                    self.pos += 1;
                }
                b',' | b':' | b' ' | b'\n' | b'\r' | b'\t' if depth > 0 => self.pos += 1,
                b'-' | b'+' | b'.' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' => {
                    while matches!(
                        self.peek(),
                        Some(b'-' | b'+' | b'.' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
                    ) {
                        self.pos += 1;
                    }
                }
                _ => return Err(malformed()),
            }
            if depth == 0 {
                return Ok(start..self.pos);
            }
        }
    }

    /// The next member of an object whose `{` was read: its key and the key's span (quotes
    /// included), the position left at its value; `None` after the closing `}`.
    fn next_member(&mut self, first: &mut bool) -> Result<Option<Member<'a>>, SearchError> {
        self.ws();
        match self.peek() {
            Some(b'}') => {
                self.pos += 1;
                return Ok(None);
            }
            Some(b',') if !*first => {
                self.pos += 1;
                self.ws();
            }
            Some(b'"') if *first => {}
            _ => return Err(malformed()),
        }
        *first = false;
        let start = self.pos;
        if self.peek() != Some(b'"') {
            return Err(malformed());
        }
        self.skip_string()?;
        let span = start..self.pos;
        let src: &'a [u8] = self.src;
        let raw = src.get(start + 1..self.pos - 1).ok_or_else(malformed)?;
        let key = if raw.contains(&b'\\') {
            let text = src.get(span.clone()).ok_or_else(malformed)?;
            Cow::Owned(serde_json::from_slice::<String>(text).map_err(|e| not_json(&e))?)
        } else {
            Cow::Borrowed(std::str::from_utf8(raw).map_err(|e| not_json(&e))?)
        };
        self.expect(b':')?;
        self.ws();
        Ok(Some(Member { key, span }))
    }

    /// Whether there is another item in an array whose `[` was read (the position left at it).
    fn next_item(&mut self, first: &mut bool) -> Result<bool, SearchError> {
        self.ws();
        match self.peek() {
            Some(b']') => {
                self.pos += 1;
                return Ok(false);
            }
            Some(b',') if !*first => {
                self.pos += 1;
                self.ws();
            }
            Some(_) if *first => {}
            _ => return Err(malformed()),
        }
        *first = false;
        Ok(true)
    }

    /// The `resourceType` of the object at the position (read ahead, the position kept).
    fn resource_type(mut self) -> Option<Cow<'a, str>> {
        self.expect(b'{').ok()?;
        let mut first = true;
        while let Some(m) = self.next_member(&mut first).ok()? {
            if m.key == "resourceType" {
                let span = self.skip_value().ok()?;
                return serde_json::from_slice::<String>(self.src.get(span)?)
                    .ok()
                    .map(Cow::Owned);
            }
            self.skip_value().ok()?;
        }
        None
    }
}

struct Member<'a> {
    key: Cow<'a, str>,
    /// The key as stored, quotes included.
    span: Range<usize>,
}

/// How `_summary=true` treats a summary element's value.
enum Walk<'m> {
    /// Kept as stored.
    Whole,
    /// A resource (`contained`, `Bundle.entry.resource`): its own summary.
    Resource,
    /// An object (or array of objects) of this type: its summary children.
    Into(&'m TypeDef),
}

/// A subset being written.
struct Cut<'a, 's> {
    scan: Scan<'a>,
    out: Vec<u8>,
    model: &'static Model,
    subset: &'s Subset,
    /// Whether anything of the stored resource was left out (else it is answered whole,
    /// untagged: nothing is missing from it).
    dropped: bool,
}

impl Cut<'_, '_> {
    /// Copies the value at the position as stored.
    fn copy_value(&mut self) -> Result<(), SearchError> {
        let span = self.scan.skip_value()?;
        let bytes = self.scan.src.get(span).ok_or_else(malformed)?;
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    /// Writes a member's separator and key (as stored).
    fn key(&mut self, any: bool, span: &Range<usize>) -> Result<(), SearchError> {
        if any {
            self.out.push(b',');
        }
        let key = self.scan.src.get(span.clone()).ok_or_else(malformed)?;
        self.out.extend_from_slice(key);
        self.out.push(b':');
        Ok(())
    }

    /// The resource at the position (an object). `top`: the resource asked for, whose `meta`
    /// gets the tag; a contained or nested one is cut the same way, untagged.
    fn resource(&mut self, top: bool, depth: usize) -> Result<(), SearchError> {
        let rtype = self.scan.resource_type();
        let def = rtype
            .as_deref()
            .and_then(|t| self.model.type_def(t))
            .filter(|d| d.kind == TypeKind::Resource);
        self.scan.expect(b'{')?;
        self.out.push(b'{');
        let mut first = true;
        let mut any = false;
        let mut tagged = false;
        while let Some(m) = self.scan.next_member(&mut first)? {
            let name = m.key.strip_prefix('_').unwrap_or(&m.key);
            if matches!(name, "resourceType" | "id") {
                self.key(any, &m.span)?;
                self.copy_value()?;
                any = true;
                continue;
            }
            if name == "meta" && top && !tagged && m.key == "meta" {
                self.key(any, &m.span)?;
                tagged = self.meta()?;
                any = true;
                continue;
            }
            let child = def.and_then(|d| d.child(name));
            let keep = match (self.subset, child) {
                _ if name == "meta" => Keep::Whole,
                (Subset::Data, _) if name == "text" => Keep::Drop,
                (Subset::Data, _) if name == "contained" && m.key == "contained" => Keep::Contained,
                (Subset::Data, _) => Keep::Whole,
                (Subset::Text, Some(c)) if name == "text" || c.element.min > 0 => Keep::Whole,
                (Subset::Text, _) => Keep::Drop,
                (Subset::Elements(names), c) => {
                    let named = |n: &str| names.iter().any(|e| e == n);
                    let kept = named(name)
                        || c.is_some_and(|c| c.element.min > 0 || named(&c.element.name));
                    if kept { Keep::Whole } else { Keep::Drop }
                }
                (Subset::Summary, Some(c)) if in_summary(c) => Keep::Summary(c),
                (Subset::Summary, _) => Keep::Drop,
            };
            match keep {
                Keep::Drop => {
                    self.scan.skip_value()?;
                    self.dropped = true;
                }
                Keep::Whole => {
                    self.key(any, &m.span)?;
                    self.copy_value()?;
                    any = true;
                }
                Keep::Contained => {
                    let mark = self.out.len();
                    self.key(any, &m.span)?;
                    if self.resources(depth + 1)? {
                        any = true;
                    } else {
                        self.out.truncate(mark);
                        self.dropped = true;
                    }
                }
                Keep::Summary(c) => {
                    let mark = self.out.len();
                    self.key(any, &m.span)?;
                    let shadow = m.key.starts_with('_');
                    if self.summary_value(c, shadow, depth + 1)? {
                        any = true;
                    } else {
                        self.out.truncate(mark);
                        self.dropped = true;
                    }
                }
            }
        }
        if top && !tagged {
            if any {
                self.out.push(b',');
            }
            self.out.extend_from_slice(br#""meta":{"tag":["#);
            self.out.extend_from_slice(SUBSETTED_TAG.as_bytes());
            self.out.extend_from_slice(b"]}");
        }
        self.out.push(b'}');
        Ok(())
    }

    /// A resource, or an array of them (`contained`), each cut as a nested resource; other
    /// values as stored. False when nothing is left (an empty array).
    fn resources(&mut self, depth: usize) -> Result<bool, SearchError> {
        self.scan.ws();
        if depth > MAX_DEPTH {
            self.copy_value()?;
            return Ok(true);
        }
        match self.scan.peek() {
            Some(b'{') => {
                self.resource(false, depth)?;
                Ok(true)
            }
            Some(b'[') => {
                self.scan.pos += 1;
                self.out.push(b'[');
                let mut first = true;
                let mut any = false;
                while self.scan.next_item(&mut first)? {
                    if any {
                        self.out.push(b',');
                    }
                    any = true;
                    self.scan.ws();
                    if self.scan.peek() == Some(b'{') {
                        self.resource(false, depth + 1)?;
                    } else {
                        self.copy_value()?;
                    }
                }
                self.out.push(b']');
                Ok(any)
            }
            _ => {
                self.copy_value()?;
                Ok(true)
            }
        }
    }

    /// The `meta` of the resource asked for, with the `SUBSETTED` tag added to `tag` (unless
    /// it is there already). True when the tag is in what was written (a `meta` that is not an
    /// object is copied as it is, untagged).
    fn meta(&mut self) -> Result<bool, SearchError> {
        self.scan.ws();
        if self.scan.peek() != Some(b'{') {
            self.copy_value()?;
            return Ok(false);
        }
        self.scan.pos += 1;
        self.out.push(b'{');
        let mut first = true;
        let mut any = false;
        let mut tagged = false;
        while let Some(m) = self.scan.next_member(&mut first)? {
            self.key(any, &m.span)?;
            any = true;
            self.scan.ws();
            if m.key != "tag" || tagged || self.scan.peek() != Some(b'[') {
                self.copy_value()?;
                continue;
            }
            self.scan.pos += 1;
            self.out.push(b'[');
            let mut first_tag = true;
            let mut tags = 0usize;
            while self.scan.next_item(&mut first_tag)? {
                if tags > 0 {
                    self.out.push(b',');
                }
                tags += 1;
                let span = self.scan.skip_value()?;
                let bytes = self.scan.src.get(span).ok_or_else(malformed)?;
                tagged |= is_subsetted(bytes);
                self.out.extend_from_slice(bytes);
            }
            if !tagged {
                if tags > 0 {
                    self.out.push(b',');
                }
                self.out.extend_from_slice(SUBSETTED_TAG.as_bytes());
            }
            self.out.push(b']');
            tagged = true;
        }
        if !tagged {
            if any {
                self.out.push(b',');
            }
            self.out.extend_from_slice(br#""tag":["#);
            self.out.extend_from_slice(SUBSETTED_TAG.as_bytes());
            self.out.push(b']');
        }
        self.out.push(b'}');
        Ok(true)
    }

    /// How `_summary=true` walks into a summary element.
    fn walk(&self, c: ChildRef<'_>, shadow: bool) -> Walk<'static> {
        let model = self.model;
        if c.type_name == "Extension" {
            return Walk::Whole;
        }
        let Some(def) = model.type_def(c.type_name) else {
            return Walk::Whole;
        };
        match def.kind {
            TypeKind::Resource => Walk::Resource,
            TypeKind::Primitive if !shadow => Walk::Whole,
            _ => Walk::Into(def),
        }
    }

    /// The value of summary element `c` (`shadow`: its `_name` member), cut for
    /// `_summary=true`. False when nothing is left of it.
    fn summary_value(
        &mut self,
        c: ChildRef<'_>,
        shadow: bool,
        depth: usize,
    ) -> Result<bool, SearchError> {
        self.scan.ws();
        if depth > MAX_DEPTH {
            self.copy_value()?;
            return Ok(true);
        }
        let walk = self.walk(c, shadow);
        if let Walk::Whole = walk {
            self.copy_value()?;
            return Ok(true);
        }
        match self.scan.peek() {
            Some(b'[') => {
                self.scan.pos += 1;
                let start = self.out.len();
                self.out.push(b'[');
                let mut first = true;
                let mut items = 0usize;
                let mut kept = 0usize;
                while self.scan.next_item(&mut first)? {
                    let mark = self.out.len();
                    if items > 0 {
                        self.out.push(b',');
                    }
                    self.scan.ws();
                    if self.summary_item(&walk, depth)? {
                        kept += 1;
                        items += 1;
                    } else if shadow {
                        // A primitive array's shadow keeps its positions: `null` for an
                        // item with nothing left.
                        self.out.truncate(mark);
                        if items > 0 {
                            self.out.push(b',');
                        }
                        self.out.extend_from_slice(b"null");
                        items += 1;
                    } else {
                        self.out.truncate(mark);
                        self.dropped = true;
                    }
                }
                self.out.push(b']');
                if kept == 0 {
                    self.out.truncate(start);
                    self.dropped = true;
                    return Ok(false);
                }
                Ok(true)
            }
            _ => self.summary_item(&walk, depth),
        }
    }

    /// One value (not an array) of a summary element; false when nothing is left of it.
    fn summary_item(&mut self, walk: &Walk<'_>, depth: usize) -> Result<bool, SearchError> {
        if self.scan.peek() != Some(b'{') {
            // `null` in a shadow array, or a value the model does not expect: as stored, but
            // a `null` alone is nothing.
            let span = self.scan.skip_value()?;
            let bytes = self.scan.src.get(span).ok_or_else(malformed)?;
            if bytes == b"null" {
                return Ok(false);
            }
            self.out.extend_from_slice(bytes);
            return Ok(true);
        }
        match walk {
            Walk::Whole => {
                self.copy_value()?;
                Ok(true)
            }
            Walk::Resource => {
                self.resource(false, depth)?;
                Ok(true)
            }
            Walk::Into(def) => self.summary_object(def, depth),
        }
    }

    /// An object of type `def` cut to its summary children; false when none is left.
    fn summary_object(&mut self, def: &TypeDef, depth: usize) -> Result<bool, SearchError> {
        let start = self.out.len();
        self.scan.expect(b'{')?;
        self.out.push(b'{');
        let mut first = true;
        let mut any = false;
        while let Some(m) = self.scan.next_member(&mut first)? {
            let shadow = m.key.starts_with('_');
            let name = if shadow { &m.key[1..] } else { &m.key[..] };
            match def.child(name).filter(|c| in_summary(*c)) {
                Some(c) => {
                    let mark = self.out.len();
                    self.key(any, &m.span)?;
                    if self.summary_value(c, shadow, depth + 1)? {
                        any = true;
                    } else {
                        self.out.truncate(mark);
                        self.dropped = true;
                    }
                }
                None => {
                    self.scan.skip_value()?;
                    self.dropped = true;
                }
            }
        }
        if !any {
            self.out.truncate(start);
            self.dropped = true;
            return Ok(false);
        }
        self.out.push(b'}');
        Ok(true)
    }
}

/// Whether `_summary=true` keeps an element: marked `isSummary`, or a `modifierExtension`
/// (which R4 marks summary in backbone elements and datatypes but not in resources: a
/// modifier must not be left out of what a client reads).
fn in_summary(c: ChildRef<'_>) -> bool {
    c.element.summary || c.element.name == "modifierExtension"
}

/// What is done with a member of a resource.
enum Keep<'m> {
    Drop,
    Whole,
    /// `contained` under `_summary=data`: each resource without its `text`.
    Contained,
    /// A summary element under `_summary=true`.
    Summary(ChildRef<'m>),
}

/// Whether a tag (its JSON) is the `SUBSETTED` tag.
fn is_subsetted(tag: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Coding<'a> {
        #[serde(borrow)]
        system: Option<Cow<'a, str>>,
        #[serde(borrow)]
        code: Option<Cow<'a, str>>,
    }
    serde_json::from_slice::<Coding<'_>>(tag).is_ok_and(|c| {
        c.system.as_deref() == Some(SUBSETTED_SYSTEM) && c.code.as_deref() == Some("SUBSETTED")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value as Json, json};

    /// The subset as text (to check bytes) and as a tree.
    fn cut(subset: &Subset, json: &str) -> (String, Json) {
        let out = subset.apply(json.as_bytes()).unwrap();
        let text = String::from_utf8(out).unwrap();
        let tree = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (text, tree)
    }

    fn keys(v: &Json) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    const TAG: &str = SUBSETTED_TAG;

    const PATIENT: &str = r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"2","lastUpdated":"2024-01-01T00:00:00Z"},"text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">Jo</div>"},"extension":[{"url":"http://e/race","valueString":"x"}],"modifierExtension":[{"url":"http://e/mod","valueBoolean":true}],"identifier":[{"id":"i1","extension":[{"url":"http://e/i","valueString":"y"}],"system":"http://mrn","value":"12\u00e9"}],"active":true,"name":[{"family":"Doe","given":["Jo","Ann"],"_given":[null,{"extension":[{"url":"http://e/g","valueString":"z"}]}]}],"gender":"female","birthDate":"1970-01-01","_birthDate":{"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/patient-birthTime","valueDateTime":"1970-01-01T10:00:00Z"}]},"deceasedBoolean":false,"maritalStatus":{"text":"M"},"multipleBirthInteger":2,"contact":[{"relationship":[{"text":"mother"}],"name":{"family":"Doe"},"modifierExtension":[{"url":"http://e/cm","valueBoolean":true}]},{"name":{"family":"Roe"}}],"communication":[{"language":{"text":"en"}}],"link":[{"id":"l1","other":{"reference":"Patient/p2"},"type":"seealso"}]}"#;

    /// Review: a subset that leaves nothing out (`_summary=data` of a resource without text,
    /// `_elements` naming all it has, `_summary=true` of a resource of summary elements only)
    /// was tagged `SUBSETTED` all the same. It is the stored resource, byte for byte.
    #[test]
    fn a_subset_that_leaves_nothing_out_is_the_resource_untagged() {
        let plain = r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1"},"gender":"male","birthDate":"1970-01-01"}"#;
        for subset in [
            Subset::Data,
            Subset::Summary,
            Subset::Elements(vec!["gender".into(), "birthDate".into()]),
        ] {
            let out = subset.apply(plain.as_bytes()).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), plain, "{subset:?}");
        }
        // One element fewer: tagged.
        let (text, _) = cut(&Subset::Elements(vec!["gender".into()]), plain);
        assert!(text.contains(TAG), "{text}");
        let (text, _) = cut(&Subset::Text, plain);
        assert!(text.contains(TAG), "{text}");
    }

    #[test]
    fn summary_of_a_patient() {
        let (text, p) = cut(&Subset::Summary, PATIENT);
        assert_eq!(
            keys(&p),
            [
                "resourceType",
                "id",
                "meta",
                "modifierExtension",
                "identifier",
                "active",
                "name",
                "gender",
                "birthDate",
                "deceasedBoolean",
                "link"
            ]
        );
        // Not summary: text, extension, maritalStatus, multipleBirth[x], contact, communication
        // (and Observation.category, in R4).
        // Inside a summary element, its own non-summary children go too (Identifier.id and
        // .extension, the extensions of `given`, Patient.link.id).
        assert_eq!(
            p["identifier"],
            json!([{"system": "http://mrn", "value": "12é"}])
        );
        assert_eq!(
            p["name"],
            json!([{"family": "Doe", "given": ["Jo", "Ann"]}])
        );
        assert_eq!(
            p["link"],
            json!([{"other": {"reference": "Patient/p2"}, "type": "seealso"}])
        );
        // Modifier extensions stay whole; the primitive's own extensions go.
        assert_eq!(
            p["modifierExtension"],
            json!([{"url": "http://e/mod", "valueBoolean": true}])
        );
        assert!(p.get("_birthDate").is_none());
        assert_eq!(
            p["meta"],
            json!({"versionId": "2", "lastUpdated": "2024-01-01T00:00:00Z", "tag": [
                {"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]})
        );
        // Kept members are the stored bytes (the escape is still there).
        assert!(text.contains(r#""value":"12\u00e9""#), "{text}");
    }

    #[test]
    fn summary_keeps_a_backbone_elements_summary_children() {
        // Patient.contact is not summary, but its modifierExtension is: a summary element
        // inside a non-summary one is not reached. Patient.link is summary, and keeps `other`
        // and `type` (summary in the backbone) without `id` or `extension`.
        let p = r#"{"resourceType":"Patient","id":"b","link":[{"id":"x","extension":[{"url":"http://e","valueString":"s"}],"modifierExtension":[{"url":"http://m","valueCode":"c"}],"other":{"reference":"Patient/q","display":"Q"},"type":"refer"}],"contact":[{"modifierExtension":[{"url":"http://m","valueCode":"c"}]}]}"#;
        let (_, v) = cut(&Subset::Summary, p);
        assert_eq!(keys(&v), ["resourceType", "id", "link", "meta"]);
        assert_eq!(
            v["link"],
            json!([{"modifierExtension": [{"url": "http://m", "valueCode": "c"}],
                "other": {"reference": "Patient/q", "display": "Q"}, "type": "refer"}])
        );
        // Elements whose summary children are all absent are left out, not written empty.
        let p = r#"{"resourceType":"Patient","id":"e","name":[{"extension":[{"url":"http://e","valueString":"s"}]},{"family":"F"}],"identifier":[{"id":"only"}]}"#;
        let (_, v) = cut(&Subset::Summary, p);
        assert_eq!(v["name"], json!([{"family": "F"}]));
        assert!(v.get("identifier").is_none());
    }

    const OBSERVATION: &str = r#"{"resourceType":"Observation","id":"o1","meta":{"tag":[{"system":"http://t","code":"a"}]},"text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},"contained":[{"resourceType":"Patient","id":"c","text":{"status":"empty","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\"/>"},"gender":"male"}],"status":"final","category":[{"coding":[{"system":"http://c","code":"vital-signs"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"8302-2","display":"Body height"}],"text":"height"},"subject":{"reference":"Patient/p1"},"effectiveDateTime":"2024-01-01","valueQuantity":{"id":"q","extension":[{"url":"http://e","valueString":"s"}],"value":1.50,"comparator":"<","unit":"m","system":"http://unitsofmeasure.org","code":"m"},"interpretation":[{"text":"N"}],"note":[{"text":"n"}],"referenceRange":[{"low":{"value":1}}],"component":[{"code":{"text":"c"},"valueQuantity":{"value":2.0},"interpretation":[{"text":"H"}]}]}"#;

    #[test]
    fn summary_of_an_observation_with_a_quantity_choice() {
        let (text, o) = cut(&Subset::Summary, OBSERVATION);
        assert_eq!(
            keys(&o),
            [
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "subject",
                "effectiveDateTime",
                "valueQuantity",
                "component"
            ]
        );
        // value[x] is summary, resolved to Quantity: its summary children, the number text kept.
        assert!(
            text.contains(r#""valueQuantity":{"value":1.50,"comparator":"<","unit":"m","system":"http://unitsofmeasure.org","code":"m"}"#),
            "{text}"
        );
        // Observation.component is summary; its code and value[x] are, its interpretation not.
        assert!(
            text.contains(r#""component":[{"code":{"text":"c"},"valueQuantity":{"value":2.0}}]"#),
            "{text}"
        );
        // The tag is added to the tags there are.
        assert_eq!(
            o["meta"]["tag"],
            json!([{"system": "http://t", "code": "a"}, {"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}])
        );
    }

    #[test]
    fn a_choice_of_another_type_is_judged_by_its_element() {
        // Patient.deceased[x] is summary whatever its type; multipleBirth[x] never.
        let p = r#"{"resourceType":"Patient","id":"d","deceasedDateTime":"2020-02-02","_deceasedDateTime":{"extension":[{"url":"http://e","valueString":"s"}]},"multipleBirthBoolean":true}"#;
        let (_, v) = cut(&Subset::Summary, p);
        assert_eq!(keys(&v), ["resourceType", "id", "deceasedDateTime", "meta"]);
        let (_, v) = cut(&Subset::Elements(vec!["deceased".into()]), p);
        assert_eq!(
            keys(&v),
            [
                "resourceType",
                "id",
                "deceasedDateTime",
                "_deceasedDateTime",
                "meta"
            ]
        );
        let (_, v) = cut(&Subset::Elements(vec!["multipleBirthBoolean".into()]), p);
        assert_eq!(
            keys(&v),
            ["resourceType", "id", "multipleBirthBoolean", "meta"]
        );
    }

    #[test]
    fn text_and_data() {
        // text: text, id, meta and the top-level mandatory elements (Observation.status, code).
        let (_, o) = cut(&Subset::Text, OBSERVATION);
        assert_eq!(
            keys(&o),
            ["resourceType", "id", "meta", "text", "status", "code"]
        );
        assert_eq!(o["code"]["coding"][0]["display"], "Body height");
        // data: all but text, of contained resources too.
        let (text, o) = cut(&Subset::Data, OBSERVATION);
        let mut expected: Json = serde_json::from_str(OBSERVATION).unwrap();
        expected.as_object_mut().unwrap().remove("text");
        expected["contained"][0]
            .as_object_mut()
            .unwrap()
            .remove("text");
        expected["meta"]["tag"]
            .as_array_mut()
            .unwrap()
            .push(json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}));
        assert_eq!(o, expected);
        assert!(text.contains(r#""value":1.50"#));
    }

    #[test]
    fn meta_is_made_or_tagged_once() {
        // (Each input has an element the subset leaves out: a subset that leaves nothing out
        // is the resource untagged.)
        let (text, _) = cut(
            &Subset::Summary,
            r#"{"resourceType":"Patient","id":"x","maritalStatus":{"text":"M"}}"#,
        );
        assert_eq!(
            text,
            format!(r#"{{"resourceType":"Patient","id":"x","meta":{{"tag":[{TAG}]}}}}"#)
        );
        let (text, _) = cut(
            &Subset::Text,
            r#"{"meta":{"versionId":"1"},"resourceType":"Patient","gender":"male"}"#,
        );
        assert_eq!(
            text,
            format!(r#"{{"meta":{{"versionId":"1","tag":[{TAG}]}},"resourceType":"Patient"}}"#)
        );
        let tagged = format!(r#"{{"resourceType":"Patient","meta":{{"tag":[{TAG}]}}}}"#);
        let (text, _) = cut(&Subset::Data, &tagged);
        assert_eq!(text, tagged, "already SUBSETTED: not tagged twice");
        let (text, _) = cut(
            &Subset::Data,
            r#"{"resourceType":"Patient","meta":{"tag":[]},"text":{"status":"empty"}}"#,
        );
        assert_eq!(
            text,
            format!(r#"{{"resourceType":"Patient","meta":{{"tag":[{TAG}]}}}}"#)
        );
        // White space between tokens is not carried over, the values are.
        let (text, _) = cut(
            &Subset::Summary,
            " { \"resourceType\" : \"Patient\" , \"gender\" : \"male\" , \"text\" : { } } ",
        );
        assert_eq!(
            text,
            format!(r#"{{"resourceType":"Patient","gender":"male","meta":{{"tag":[{TAG}]}}}}"#)
        );
    }

    #[test]
    fn nested_resources_are_cut_untagged() {
        let b = r#"{"resourceType":"Bundle","id":"b","type":"collection","entry":[{"fullUrl":"urn:x","resource":{"resourceType":"Patient","id":"p","gender":"male","contact":[{"name":{"family":"X"}}]}}]}"#;
        let (_, v) = cut(&Subset::Summary, b);
        assert_eq!(
            v["entry"],
            json!([{"fullUrl": "urn:x", "resource": {"resourceType": "Patient", "id": "p", "gender": "male"}}])
        );
    }

    #[test]
    fn unknown_types_and_keys_never_fail() {
        for subset in [
            Subset::Summary,
            Subset::Text,
            Subset::Data,
            Subset::Elements(vec!["foo".into()]),
        ] {
            for json in [
                r#"{}"#,
                r#"{"resourceType":"NoSuchType","id":"1","foo":[1,{"a":[]}]}"#,
                r#"{"resourceType":7,"id":"1"}"#,
                r#"{"resourceType":"Patient","meta":"oops","name":"not an array","link":[1,null,"x",{"type":{"a":1}}],"_gender":[null],"identifier":{"system":"s"}}"#,
                r#"{"resourceType":"Patient","a\"b":1,"gend\u0065r":"male","contained":[1,{"resourceType":"Patient","text":{}}]}"#,
            ] {
                let out = subset.apply(json.as_bytes()).unwrap();
                serde_json::from_slice::<Json>(&out)
                    .unwrap_or_else(|e| panic!("{subset:?} {json}: {e}"));
            }
        }
        // An escaped key is read as what it means.
        let (_, v) = cut(
            &Subset::Summary,
            r#"{"resourceType":"Patient","gend\u0065r":"male"}"#,
        );
        assert_eq!(v["gender"], "male");
    }

    #[test]
    fn bytes_that_are_not_one_object_are_an_error() {
        for bad in [
            &b""[..],
            b"null",
            b"[]",
            b"\"Patient\"",
            b"{\"resourceType\":\"Patient\"",
            b"{\"resourceType\":\"Patient\"} {}",
            b"{\"a\":\xff}",
            b"{\"a\":[1,]}",
        ] {
            for subset in [Subset::Summary, Subset::Data] {
                let e = subset.apply(bad).unwrap_err();
                assert!(matches!(e, SearchError::Store(_)), "{e:?}");
            }
        }
    }

    #[test]
    fn deep_nesting_is_copied_not_walked() {
        // Questionnaire.item nests itself: deeper than the walk goes, kept as stored.
        let mut item = String::from(r#"{"linkId":"x","type":"group"}"#);
        for _ in 0..50 {
            item = format!(r#"{{"linkId":"x","type":"group","item":[{item}]}}"#);
        }
        let q = format!(r#"{{"resourceType":"Questionnaire","status":"draft","item":[{item}]}}"#);
        let (_, v) = cut(&Subset::Data, &q);
        assert_eq!(v["item"][0]["item"][0]["linkId"], "x");
        // Questionnaire.item is not summary: nothing of it is kept.
        let (_, v) = cut(&Subset::Summary, &q);
        assert!(v.get("item").is_none());
        // A summary element of a recursive type: Parameters.parameter.part.
        let mut part = String::from(r#"{"name":"leaf","valueString":"v"}"#);
        for _ in 0..50 {
            part = format!(r#"{{"name":"n","extension":[{{"url":"http://e"}}],"part":[{part}]}}"#);
        }
        let p = format!(r#"{{"resourceType":"Parameters","parameter":[{part}]}}"#);
        let (text, v) = cut(&Subset::Summary, &p);
        // Walked down to the depth limit (extensions left out), kept whole below it.
        assert!(v["parameter"][0].get("extension").is_none(), "{text}");
        assert!(text.contains(r#""valueString":"v""#), "{text}");
        assert!(text.contains(r#""extension""#), "{text}");
    }

    /// JSON trees over FHIR-like keys (and others), as a resource of a few types.
    fn resource_json() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let key = prop::sample::select(vec![
            "resourceType",
            "id",
            "_id",
            "meta",
            "tag",
            "text",
            "contained",
            "extension",
            "modifierExtension",
            "url",
            "name",
            "given",
            "_given",
            "family",
            "link",
            "other",
            "contact",
            "valueQuantity",
            "value",
            "_value",
            "code",
            "coding",
            "status",
            "entry",
            "resource",
            "parameter",
            "part",
            "x\"y",
            "",
        ])
        .prop_map(str::to_string);
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            "[a-zA-Z\\u{e9}\"]{0,4}".prop_map(Json::String),
            prop::sample::select(vec![
                "Patient",
                "Observation",
                "Bundle",
                "Parameters",
                "Nope"
            ])
            .prop_map(|t| Json::String(t.into())),
            (-5i64..5).prop_map(Json::from),
        ];
        let tree = leaf.prop_recursive(5, 48, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                prop::collection::vec((key.clone(), inner), 0..5)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        });
        (
            prop::sample::select(vec![
                "Patient",
                "Observation",
                "Bundle",
                "Parameters",
                "Nope",
            ]),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "meta",
                        "text",
                        "name",
                        "link",
                        "contact",
                        "valueQuantity",
                        "entry",
                        "parameter",
                        "contained",
                        "_given",
                        "status",
                        "code",
                    ]),
                    tree,
                ),
                0..6,
            ),
        )
            .prop_map(|(ty, members)| {
                let mut obj = serde_json::Map::new();
                obj.insert("resourceType".into(), Json::String(ty.into()));
                for (k, v) in members {
                    obj.insert(k.into(), v);
                }
                Json::Object(obj).to_string()
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any JSON object: a subset that is one JSON object, tagged once, and cut again to
        /// itself.
        #[test]
        fn any_object_gives_json_and_cutting_again_changes_nothing(json in resource_json()) {
            for subset in [
                Subset::Summary,
                Subset::Text,
                Subset::Data,
                Subset::Elements(vec!["name".into(), "value".into()]),
            ] {
                let once = subset.apply(json.as_bytes()).unwrap();
                let v: Json = serde_json::from_slice(&once).unwrap();
                proptest::prop_assert!(v.is_object());
                let twice = subset.apply(&once).unwrap();
                proptest::prop_assert_eq!(
                    String::from_utf8(twice).unwrap(),
                    String::from_utf8(once).unwrap(),
                    "{:?}",
                    subset
                );
            }
        }
    }

    #[test]
    fn summary_values() {
        for s in [
            Summary::False,
            Summary::True,
            Summary::Text,
            Summary::Data,
            Summary::Count,
        ] {
            assert_eq!(Summary::parse(s.as_str()), Some(s));
        }
        assert_eq!(Summary::parse("True"), None);
        assert_eq!(Summary::True.subset(), Some(Subset::Summary));
        assert_eq!(Summary::Count.subset(), None);
        assert_eq!(Summary::False.subset(), None);
    }
}

//! Input files of the loader: discovery, decompression and streaming of their resources.
//!
//! Formats, recognised by name (a trailing `.gz` means gzip):
//! - `*.ndjson`, `*.jsonl`: one resource per line, read line by line;
//! - `*.json`: a Bundle of type transaction, batch, collection or searchset (its entries), or any
//!   single resource. A `.json` file is parsed whole, one file at a time.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;
use serde::Deserialize;
use serde_json::Value;

use crate::error::LoadError;

/// How a file's content is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Ndjson,
    Json,
}

/// The format of a file from its name, `None` if the loader does not read it.
pub fn format_of(path: &Path) -> Option<InputFormat> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    if name.ends_with(".ndjson") || name.ends_with(".jsonl") {
        Some(InputFormat::Ndjson)
    } else if name.ends_with(".json") {
        Some(InputFormat::Json)
    } else {
        None
    }
}

/// Expand files and folders (recursively) into the input files, sorted by path within each
/// folder. Files given explicitly must have a known format.
pub fn collect_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| LoadError::Io {
            path: p.clone(),
            source,
        })?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else if format_of(p).is_some() {
            out.push(p.clone());
        } else {
            return Err(LoadError::NoInput { path: p.clone() });
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if format_of(&p).is_some() {
            out.push(p);
        }
    }
    Ok(())
}

/// Whether a file is read through gzip (its name ends in `.gz`).
pub fn is_gzip(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// Open a file, transparently decompressing `.gz`.
pub fn open(path: &Path) -> Result<Box<dyn BufRead + Send>, LoadError> {
    let file = File::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(if is_gzip(path) {
        Box::new(BufReader::with_capacity(
            256 * 1024,
            MultiGzDecoder::new(BufReader::new(file)),
        ))
    } else {
        Box::new(BufReader::with_capacity(256 * 1024, file))
    })
}

/// Where a resource came from, for reports: `file:line` or `file entry N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<Path>,
    /// 1-based line of an NDJSON file.
    pub line: Option<usize>,
    /// 0-based index in `Bundle.entry`.
    pub entry: Option<usize>,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(e) = self.entry {
            write!(f, " entry {e}")?;
        }
        Ok(())
    }
}

/// One resource (or delete) read from an input.
#[derive(Debug)]
pub struct Item {
    pub location: Location,
    pub full_url: Option<String>,
    pub content: ItemContent,
}

#[derive(Debug)]
pub enum ItemContent {
    Resource(Value),
    /// A Bundle entry with `request.method` DELETE.
    Delete {
        resource_type: String,
        id: String,
    },
}

/// A piece of one input file as read from disk, before parsing: the unit of work of the loader's
/// parsing threads. NDJSON files come as batches of lines, `.json` files whole.
#[derive(Debug)]
pub enum Unit {
    /// Consecutive lines of an NDJSON file; `first_line` is the 1-based number of the first.
    /// Bytes as read: a line that is not UTF-8 is one malformed line, not a failed file.
    Lines {
        first_line: usize,
        lines: Vec<Vec<u8>>,
    },
    /// The whole (decompressed) content of a `.json` file.
    Document(Vec<u8>),
}

/// Lines per [`Unit::Lines`] batch, unless [`UNIT_BYTES`] is reached first.
pub const UNIT_LINES: usize = 1024;
/// Bytes after which a [`Unit::Lines`] batch is closed.
pub const UNIT_BYTES: usize = 4 << 20;

/// Read one file into units, in order, without parsing (IO and decompression only). `f`
/// returning `Err` stops reading.
pub fn read_units(
    path: &Path,
    f: &mut dyn FnMut(Unit) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let format = format_of(path).unwrap_or(InputFormat::Json);
    let mut reader = open(path)?;
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    match format {
        InputFormat::Ndjson => {
            let mut first_line = 1;
            let mut lines = Vec::with_capacity(UNIT_LINES);
            let mut bytes = 0;
            loop {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line).map_err(io)? == 0 {
                    break;
                }
                bytes += line.len();
                lines.push(line);
                if lines.len() >= UNIT_LINES || bytes >= UNIT_BYTES {
                    let n = lines.len();
                    f(Unit::Lines {
                        first_line,
                        lines: std::mem::replace(&mut lines, Vec::with_capacity(UNIT_LINES)),
                    })?;
                    first_line += n;
                    bytes = 0;
                }
            }
            if !lines.is_empty() {
                f(Unit::Lines { first_line, lines })?;
            }
        }
        InputFormat::Json => {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).map_err(io)?;
            f(Unit::Document(bytes))?;
        }
    }
    Ok(())
}

/// Parse one unit of `file` into its items, in order. Items that cannot be read (malformed JSON
/// line, entry without resource) are passed as `Err((location, message))`; `f` returning `Err`
/// stops.
pub fn unit_items(
    file: &Arc<Path>,
    unit: Unit,
    f: &mut dyn FnMut(Result<Item, (Location, String)>) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let mut scratch = json::Scratch::default();
    match unit {
        Unit::Lines { first_line, lines } => {
            for (i, line) in lines.iter().enumerate() {
                // Text that is not UTF-8 takes the slice reader, for its exact error.
                let parsed = match std::str::from_utf8(line) {
                    Ok(text) => {
                        let text = text.trim();
                        if text.is_empty() {
                            continue;
                        }
                        json::from_str(text, &mut scratch)
                    }
                    Err(_) => json::from_slice(line.trim_ascii(), &mut scratch),
                };
                let location = Location {
                    file: file.clone(),
                    line: Some(first_line + i),
                    entry: None,
                };
                f(match parsed {
                    Ok(v) => Ok(Item {
                        location,
                        full_url: None,
                        content: ItemContent::Resource(v),
                    }),
                    Err(e) => Err((location, format!("malformed JSON: {e}"))),
                })?;
            }
        }
        Unit::Document(bytes) => {
            let whole = Location {
                file: file.clone(),
                line: None,
                entry: None,
            };
            let value: Value = match json::from_slice(&bytes, &mut scratch) {
                Ok(v) => v,
                Err(e) => return f(Err((whole, format!("malformed JSON: {e}")))),
            };
            drop(bytes);
            document_items(file, value, f)?;
        }
    }
    Ok(())
}

/// The items of a parsed `.json` document: its entries if it is a Bundle whose entries are
/// loaded, else the document itself.
fn document_items(
    file: &Arc<Path>,
    value: Value,
    f: &mut dyn FnMut(Result<Item, (Location, String)>) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    if !is_entry_bundle(&value) {
        return f(Ok(Item {
            location: document_location(file),
            full_url: None,
            content: ItemContent::Resource(value),
        }));
    }
    let Value::Object(mut bundle) = value else {
        return Ok(());
    };
    let entries = match bundle.remove("entry") {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    for (i, entry) in entries.into_iter().enumerate() {
        f(entry_item(entry, entry_location(file, i)))?;
    }
    Ok(())
}

fn document_location(file: &Arc<Path>) -> Location {
    Location {
        file: file.clone(),
        line: None,
        entry: None,
    }
}

fn entry_location(file: &Arc<Path>, i: usize) -> Location {
    Location {
        file: file.clone(),
        line: None,
        entry: Some(i),
    }
}

/// What [`stream_unit_items`] passes on.
#[derive(Debug)]
pub enum UnitEvent {
    /// The next item, as [`unit_items`] would pass it.
    Item(Result<Item, (Location, String)>),
    /// Forget every item this unit passed so far: the document turned out to be malformed, or
    /// (through repeated keys) not a Bundle whose entries are loaded. What the document really
    /// holds follows, as [`unit_items`] would pass it.
    Restart,
}

/// [`unit_items`], but the entries of a Bundle are passed on while the document is being parsed
/// (when its `resourceType` and `type` precede `entry`, as they do in the files of Synthea and
/// most other writers), so that each is handled while it is still in the CPU caches and the
/// Bundle is never whole in memory. The price: a document that proves malformed after some
/// entries were passed on sends [`UnitEvent::Restart`] before its error, and the receiver drops
/// what it got from this unit. Once the restarts are applied, the items are exactly those of
/// [`unit_items`]. `f` returning `Err` stops.
pub fn stream_unit_items(
    file: &Arc<Path>,
    unit: Unit,
    f: &mut dyn FnMut(UnitEvent) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let bytes = match unit {
        Unit::Document(bytes) => bytes,
        lines @ Unit::Lines { .. } => {
            return unit_items(file, lines, &mut |item| f(UnitEvent::Item(item)));
        }
    };
    let mut scratch = json::Scratch::default();
    let mut passed = 0usize;
    let mut stopped = None;
    let parsed = json::stream_document(
        &bytes,
        &mut scratch,
        &mut |entry| {
            let item = entry_item(entry, entry_location(file, passed));
            passed += 1;
            f(UnitEvent::Item(item))
        },
        &mut stopped,
    );
    if let Some(e) = stopped {
        return Err(e);
    }
    let whole = |f: &mut dyn FnMut(UnitEvent) -> Result<(), LoadError>, value| {
        document_items(file, value, &mut |item| f(UnitEvent::Item(item)))
    };
    match parsed {
        Ok(json::Doc::Streamed) => Ok(()),
        Ok(json::Doc::Whole(value)) => whole(f, value),
        Ok(json::Doc::Redo) => {
            f(UnitEvent::Restart)?;
            // It parsed once, it parses again.
            match json::from_slice(&bytes, &mut scratch) {
                Ok(value) => whole(f, value),
                Err(e) => f(UnitEvent::Item(Err((
                    document_location(file),
                    format!("malformed JSON: {e}"),
                )))),
            }
        }
        Err(e) => {
            if passed > 0 {
                f(UnitEvent::Restart)?;
            }
            let location = document_location(file);
            f(UnitEvent::Item(Err((
                location,
                format!("malformed JSON: {e}"),
            ))))
        }
    }
}

/// Read every item of one file, in order, on the calling thread ([`read_units`] then
/// [`unit_items`]). Items that cannot be read are passed as `Err((location, message))`; `f`
/// returning `Err` stops reading.
pub fn read_items(
    path: &Path,
    f: &mut dyn FnMut(Result<Item, (Location, String)>) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let file: Arc<Path> = Arc::from(path);
    read_units(path, &mut |unit| unit_items(&file, unit, f))
}

fn is_entry_bundle(v: &Value) -> bool {
    v.get("resourceType").and_then(Value::as_str) == Some("Bundle")
        && v.get("type")
            .and_then(Value::as_str)
            .is_some_and(json::is_entry_type)
}

fn entry_item(entry: Value, location: Location) -> Result<Item, (Location, String)> {
    let Value::Object(mut entry) = entry else {
        return Err((location, "entry is not an object".into()));
    };
    let full_url = entry
        .get("fullUrl")
        .and_then(Value::as_str)
        .map(str::to_string);
    let method = entry
        .get("request")
        .and_then(|r| r.get("method"))
        .and_then(Value::as_str);
    if method == Some("DELETE") {
        let url = entry
            .get("request")
            .and_then(|r| r.get("url"))
            .and_then(Value::as_str)
            .unwrap_or("");
        return match url.trim_start_matches('/').split_once('/') {
            Some((t, id)) if !id.contains('/') && !id.contains('?') => Ok(Item {
                location,
                full_url,
                content: ItemContent::Delete {
                    resource_type: t.to_string(),
                    id: id.to_string(),
                },
            }),
            _ => Err((location, format!("unsupported DELETE url '{url}'"))),
        };
    }
    match entry.remove("resource") {
        Some(resource) => Ok(Item {
            location,
            full_url,
            content: ItemContent::Resource(resource),
        }),
        None => Err((location, "entry without resource".into())),
    }
}

/// The id the loader stores a resource under: its own `id`, else the uuid of a `urn:uuid:`
/// fullUrl, else none (the store assigns one). Used by the fullUrl pre-pass and the load pass
/// alike, so that both agree.
pub fn loader_id(full_url: Option<&str>, resource_id: Option<&str>) -> Option<String> {
    if let Some(id) = resource_id.filter(|id| store::is_valid_id(id)) {
        return Some(id.to_string());
    }
    full_url
        .and_then(|u| u.strip_prefix("urn:uuid:"))
        .filter(|id| store::is_valid_id(id))
        .map(str::to_string)
}

/// JSON text to `serde_json::Value`, exactly as `serde_json::from_str`/`from_slice` build it
/// (same values, key order, number text, errors), but with every object's map and every array
/// allocated once at its final size: the members are gathered on a stack reused across the
/// whole unit, so maps are never grown and rehashed while they are filled.
mod json {
    use std::fmt;

    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};

    use crate::error::LoadError;

    /// serde_json's (private) names for the one-entry maps through which it hands over numbers
    /// (`arbitrary_precision`) and raw values; `serde_json::Value` recognises them the same way.
    const NUMBER_TOKEN: &str = "$serde_json::private::Number";
    const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

    /// Members of the objects and arrays being built, innermost last.
    #[derive(Default)]
    pub(super) struct Scratch {
        members: Vec<(String, Value)>,
        items: Vec<Value>,
    }

    pub(super) fn from_str(text: &str, scratch: &mut Scratch) -> serde_json::Result<Value> {
        let mut de = serde_json::Deserializer::from_str(text);
        let value = parse(&mut de, scratch)?;
        de.end()?;
        Ok(value)
    }

    pub(super) fn from_slice(bytes: &[u8], scratch: &mut Scratch) -> serde_json::Result<Value> {
        // Checking the whole text at once is cheaper than checking each string as it is read;
        // text that is not UTF-8 takes the slice reader, for its exact error.
        if let Ok(text) = std::str::from_utf8(bytes) {
            return from_str(text, scratch);
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let value = parse(&mut de, scratch)?;
        de.end()?;
        Ok(value)
    }

    fn parse<'de, D: Deserializer<'de>>(de: D, scratch: &mut Scratch) -> Result<Value, D::Error> {
        scratch.members.clear();
        scratch.items.clear();
        ValueSeed(scratch).deserialize(de)
    }

    struct ValueSeed<'s>(&'s mut Scratch);

    impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
        type Value = Value;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for ValueSeed<'_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any valid JSON value")
        }

        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }

        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }

        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }

        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
        }

        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }

        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }

        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
            self.deserialize(de)
        }

        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let scratch = self.0;
            let start = scratch.items.len();
            let result = loop {
                match seq.next_element_seed(ValueSeed(scratch)) {
                    Ok(Some(item)) => scratch.items.push(item),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            let items: Vec<Value> = scratch.items.drain(start..).collect();
            result.map(|()| Value::Array(items))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let Some(first) = map.next_key_seed(KeySeed)? else {
                return Ok(Value::Object(Map::new()));
            };
            if let Some(special) = token_value(&first, &mut map) {
                return special;
            }
            let scratch = self.0;
            let start = scratch.members.len();
            let result = (|| {
                let value = map.next_value_seed(ValueSeed(scratch))?;
                scratch.members.push((first, value));
                while let Some(key) = map.next_key_seed(KeySeed)? {
                    let value = map.next_value_seed(ValueSeed(scratch))?;
                    scratch.members.push((key, value));
                }
                Ok(())
            })();
            // Inserted in order, so that a repeated key keeps its first position and its last
            // value, as `Map::insert` does.
            let members: Map<String, Value> = scratch.members.drain(start..).collect();
            result.map(|()| Value::Object(members))
        }
    }

    /// The value serde_json hands over as a one-entry map named by a token, read as
    /// `serde_json::Value` reads it; `None` for an ordinary first key.
    fn token_value<'de, A: MapAccess<'de>>(
        first: &str,
        map: &mut A,
    ) -> Option<Result<Value, A::Error>> {
        match first {
            NUMBER_TOKEN => Some(
                map.next_value_seed(TextSeed("string containing a number"))
                    .and_then(|text| {
                        text.parse::<Number>()
                            .map(Value::Number)
                            .map_err(de::Error::custom)
                    }),
            ),
            RAW_VALUE_TOKEN => Some(
                map.next_value_seed(TextSeed("raw value"))
                    .and_then(|text| serde_json::from_str(&text).map_err(de::Error::custom)),
            ),
            _ => None,
        }
    }

    /// How [`stream_document`] ended.
    pub(super) enum Doc {
        /// Every entry went to `emit`, and the whole document confirms that it is a Bundle whose
        /// entries are loaded.
        Streamed,
        /// Nothing went to `emit`: the whole document.
        Whole(Value),
        /// Entries went to `emit`, but the rest of the document voids them (a repeated `entry`,
        /// or a repeated `resourceType`/`type` that changes what the document is).
        Redo,
    }

    /// Receives each `Bundle.entry` element as soon as it is parsed.
    pub(super) type Emit<'a> = dyn FnMut(Value) -> Result<(), LoadError> + 'a;

    /// Parse a whole document as [`from_slice`] does, but pass the elements of `entry` to `emit`
    /// one by one while parsing, when `resourceType` (`Bundle`) and `type` (transaction, batch,
    /// collection, searchset) come before `entry`: each entry is then handled while it is still
    /// in the CPU caches, and the Bundle is never whole in memory. An `Err` from `emit` stops the
    /// parse and is put in `stopped`.
    pub(super) fn stream_document(
        bytes: &[u8],
        scratch: &mut Scratch,
        emit: &mut Emit<'_>,
        stopped: &mut Option<LoadError>,
    ) -> serde_json::Result<Doc> {
        scratch.members.clear();
        scratch.items.clear();
        let seed = DocSeed {
            scratch,
            emit,
            stopped,
        };
        // As in `from_slice`: UTF-8 checked once for the whole text when it is valid.
        match std::str::from_utf8(bytes) {
            Ok(text) => end(seed, serde_json::Deserializer::from_str(text)),
            Err(_) => end(seed, serde_json::Deserializer::from_slice(bytes)),
        }
    }

    fn end<'de, R: serde_json::de::Read<'de>>(
        seed: DocSeed<'_, '_>,
        mut de: serde_json::Deserializer<R>,
    ) -> serde_json::Result<Doc> {
        let doc = seed.deserialize(&mut de)?;
        de.end()?;
        Ok(doc)
    }

    /// Whether a Bundle `type` is one whose entries the loader loads.
    pub(super) fn is_entry_type(ty: &str) -> bool {
        matches!(ty, "transaction" | "batch" | "collection" | "searchset")
    }

    struct DocSeed<'s, 'e> {
        scratch: &'s mut Scratch,
        emit: &'s mut Emit<'e>,
        stopped: &'s mut Option<LoadError>,
    }

    impl<'de> DeserializeSeed<'de> for DocSeed<'_, '_> {
        type Value = Doc;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Doc, D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for DocSeed<'_, '_> {
        type Value = Doc;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any valid JSON value")
        }

        fn visit_bool<E>(self, v: bool) -> Result<Doc, E> {
            Ok(Doc::Whole(Value::Bool(v)))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Doc, E> {
            ValueSeed(self.scratch).visit_i64(v).map(Doc::Whole)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Doc, E> {
            ValueSeed(self.scratch).visit_u64(v).map(Doc::Whole)
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Doc, E> {
            ValueSeed(self.scratch).visit_f64(v).map(Doc::Whole)
        }

        fn visit_str<E>(self, v: &str) -> Result<Doc, E> {
            Ok(Doc::Whole(Value::String(v.to_owned())))
        }

        fn visit_string<E>(self, v: String) -> Result<Doc, E> {
            Ok(Doc::Whole(Value::String(v)))
        }

        fn visit_none<E>(self) -> Result<Doc, E> {
            Ok(Doc::Whole(Value::Null))
        }

        fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Doc, D::Error> {
            ValueSeed(self.scratch).visit_some(de).map(Doc::Whole)
        }

        fn visit_unit<E>(self) -> Result<Doc, E> {
            Ok(Doc::Whole(Value::Null))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Doc, A::Error> {
            ValueSeed(self.scratch).visit_seq(seq).map(Doc::Whole)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
            let Some(first) = map.next_key_seed(KeySeed)? else {
                return Ok(Doc::Whole(Value::Object(Map::new())));
            };
            if let Some(special) = token_value(&first, &mut map) {
                return special.map(Doc::Whole);
            }
            let DocSeed {
                scratch,
                emit,
                stopped,
            } = self;
            let start = scratch.members.len();
            // The last value of each wins, as in a map.
            let mut is_bundle = false;
            let mut entry_type = false;
            let mut entry_keys = 0u32;
            let mut streamed = false;
            let mut key = first;
            let result = loop {
                if key == "entry" {
                    entry_keys += 1;
                }
                if key == "entry" && entry_keys == 1 && is_bundle && entry_type {
                    let entries = EntriesSeed {
                        scratch: &mut *scratch,
                        emit: &mut *emit,
                        stopped: &mut *stopped,
                    };
                    match map.next_value_seed(entries) {
                        Ok(None) => streamed = true,
                        Ok(Some(value)) => scratch.members.push((key, value)),
                        Err(e) => break Err(e),
                    }
                } else {
                    let value = match map.next_value_seed(ValueSeed(scratch)) {
                        Ok(value) => value,
                        Err(e) => break Err(e),
                    };
                    match key.as_str() {
                        "resourceType" => is_bundle = value.as_str() == Some("Bundle"),
                        "type" => entry_type = value.as_str().is_some_and(is_entry_type),
                        _ => {}
                    }
                    scratch.members.push((key, value));
                }
                match map.next_key_seed(KeySeed) {
                    Ok(Some(next)) => key = next,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            let members: Map<String, Value> = scratch.members.drain(start..).collect();
            result?;
            Ok(if !streamed {
                Doc::Whole(Value::Object(members))
            } else if entry_keys == 1 && is_bundle && entry_type {
                Doc::Streamed
            } else {
                Doc::Redo
            })
        }
    }

    /// The value of `Bundle.entry`: an array is streamed to `emit` (`None`), anything else is
    /// returned.
    struct EntriesSeed<'s, 'e> {
        scratch: &'s mut Scratch,
        emit: &'s mut Emit<'e>,
        stopped: &'s mut Option<LoadError>,
    }

    impl<'de> DeserializeSeed<'de> for EntriesSeed<'_, '_> {
        type Value = Option<Value>;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Option<Value>, D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for EntriesSeed<'_, '_> {
        type Value = Option<Value>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any valid JSON value")
        }

        fn visit_bool<E>(self, v: bool) -> Result<Option<Value>, E> {
            Ok(Some(Value::Bool(v)))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<Value>, E> {
            ValueSeed(self.scratch).visit_i64(v).map(Some)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<Value>, E> {
            ValueSeed(self.scratch).visit_u64(v).map(Some)
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<Value>, E> {
            ValueSeed(self.scratch).visit_f64(v).map(Some)
        }

        fn visit_str<E>(self, v: &str) -> Result<Option<Value>, E> {
            Ok(Some(Value::String(v.to_owned())))
        }

        fn visit_string<E>(self, v: String) -> Result<Option<Value>, E> {
            Ok(Some(Value::String(v)))
        }

        fn visit_none<E>(self) -> Result<Option<Value>, E> {
            Ok(Some(Value::Null))
        }

        fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Option<Value>, D::Error> {
            ValueSeed(self.scratch).visit_some(de).map(Some)
        }

        fn visit_unit<E>(self) -> Result<Option<Value>, E> {
            Ok(Some(Value::Null))
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Option<Value>, A::Error> {
            ValueSeed(self.scratch).visit_map(map).map(Some)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Value>, A::Error> {
            while let Some(entry) = seq.next_element_seed(ValueSeed(&mut *self.scratch))? {
                if let Err(e) = (self.emit)(entry) {
                    *self.stopped = Some(e);
                    return Err(de::Error::custom("stopped by the caller"));
                }
            }
            Ok(None)
        }
    }

    /// An object key, owned.
    struct KeySeed;

    impl<'de> DeserializeSeed<'de> for KeySeed {
        type Value = String;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<String, D::Error> {
            de.deserialize_str(TextSeed("a string key"))
        }
    }

    /// A string, as serde_json's own helpers for numbers and raw values read it (their
    /// `expecting` text is given, so that errors read the same).
    struct TextSeed(&'static str);

    impl<'de> DeserializeSeed<'de> for TextSeed {
        type Value = String;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<String, D::Error> {
            de.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for TextSeed {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }

        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }

        fn visit_string<E>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
    }
}

#[derive(Deserialize)]
struct HeadBundle {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    entry: Option<Vec<HeadEntry>>,
}

#[derive(Deserialize)]
struct HeadEntry {
    #[serde(rename = "fullUrl")]
    full_url: Option<String>,
    resource: Option<HeadResource>,
}

#[derive(Deserialize)]
struct HeadResource {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    id: Option<String>,
}

/// The pre-pass over one file: `(fullUrl, type, id)` of every Bundle entry of a `.json` file that
/// the load pass will store under a known id, in entry order, reading only `fullUrl`,
/// `resourceType` and `id` (the rest is skipped by the parser). NDJSON files have no fullUrls and
/// are not read. Unreadable files are left to the load pass to report.
pub fn full_urls(path: &Path) -> Result<Vec<(String, String, String)>, LoadError> {
    let mut out = Vec::new();
    if format_of(path) != Some(InputFormat::Json) {
        return Ok(out);
    }
    let mut bytes = Vec::new();
    open(path)?
        .read_to_end(&mut bytes)
        .map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let Ok(head) = serde_json::from_slice::<HeadBundle>(&bytes) else {
        return Ok(out);
    };
    if head.resource_type.as_deref() != Some("Bundle") {
        return Ok(out);
    }
    for e in head.entry.unwrap_or_default() {
        let (Some(full_url), Some(r)) = (e.full_url, e.resource) else {
            continue;
        };
        let Some(ty) = r.resource_type else { continue };
        if let Some(id) = loader_id(Some(&full_url), r.id.as_deref()) {
            out.push((full_url, ty, id));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_name() {
        assert_eq!(
            format_of(Path::new("a/Patient.ndjson")),
            Some(InputFormat::Ndjson)
        );
        assert_eq!(
            format_of(Path::new("a/x.NDJSON.gz")),
            Some(InputFormat::Ndjson)
        );
        assert_eq!(format_of(Path::new("b.json.gz")), Some(InputFormat::Json));
        assert_eq!(format_of(Path::new("README.md")), None);
    }

    /// The faster parse gives what `serde_json` gives, value and bytes, and the same errors.
    #[test]
    fn json_parse_matches_serde_json() {
        let cases = [
            r#"{"a":1,"b":[1.50,-0,1e5,12345678901234567890123,0.1e-3],"c":{},"d":[],"e":null}"#,
            r#"{"k":1,"j":2,"k":3}"#,
            r#"[{"x":{"y":[[[]]]}},"s\u00e9\n",true,false,null]"#,
            r#"{"$serde_json::private::Number":"1.50"}"#,
            r#"{"$serde_json::private::Number":1}"#,
            r#"{"$serde_json::private::RawValue":"{\"a\":1}"}"#,
            r#"{"a":1,"$serde_json::private::Number":"2"}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":1,}"#,
            r#"{"a":1} x"#,
            r#"{"a":[1,2"#,
            r#"{"a":01}"#,
            r#"{1:2}"#,
            " ",
            "\"text\"",
        ];
        let deep = "[".repeat(200) + &"]".repeat(200);
        let mut scratch = json::Scratch::default();
        for text in cases.iter().copied().chain([deep.as_str()]) {
            let want = serde_json::from_str::<Value>(text).map_err(|e| e.to_string());
            let got = json::from_str(text, &mut scratch).map_err(|e| e.to_string());
            assert_eq!(got, want, "{text}");
            let want = serde_json::from_slice::<Value>(text.as_bytes()).map_err(|e| e.to_string());
            let got = json::from_slice(text.as_bytes(), &mut scratch).map_err(|e| e.to_string());
            assert_eq!(got, want, "{text}");
            if let (Ok(a), Ok(b)) = (got, want) {
                assert_eq!(
                    serde_json::to_string(&a).ok(),
                    serde_json::to_string(&b).ok()
                );
            }
        }
        let text = "{\"a\":\"Jos\u{e9} \u{1F600}\",\"b\":[\"\\u00e9\"]}";
        assert_eq!(
            json::from_slice(text.as_bytes(), &mut scratch).map_err(|e| e.to_string()),
            serde_json::from_slice::<Value>(text.as_bytes()).map_err(|e| e.to_string())
        );
        let bad_utf8 = b"{\"a\":\"\xff\"}";
        assert_eq!(
            json::from_slice(bad_utf8, &mut scratch).map_err(|e| e.to_string()),
            serde_json::from_slice::<Value>(bad_utf8).map_err(|e| e.to_string())
        );
    }

    /// The same on every file of the Synthea set: equal values, byte-identical when serialized.
    #[test]
    fn json_parse_matches_serde_json_on_synthea() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100");
        let files = collect_inputs(&[dir]).unwrap();
        assert!(files.len() > 100);
        let mut scratch = json::Scratch::default();
        for f in files {
            read_units(&f, &mut |unit| {
                let Unit::Document(bytes) = unit else {
                    panic!("{} is not a .json file", f.display())
                };
                let want: Value = serde_json::from_slice(&bytes).unwrap();
                let got = json::from_slice(&bytes, &mut scratch).unwrap();
                assert_eq!(
                    serde_json::to_vec(&got).unwrap(),
                    serde_json::to_vec(&want).unwrap()
                );
                assert!(got == want, "{}", f.display());
                Ok(())
            })
            .unwrap();
        }
    }

    /// What a receiver of [`stream_unit_items`] ends up with (restarts applied), as text.
    fn streamed(file: &Arc<Path>, unit: Unit) -> Vec<String> {
        let mut got = Vec::new();
        stream_unit_items(file, unit, &mut |event| {
            match event {
                UnitEvent::Item(item) => got.push(format!("{item:?}")),
                UnitEvent::Restart => got.clear(),
            }
            Ok(())
        })
        .unwrap();
        got
    }

    fn buffered(file: &Arc<Path>, unit: Unit) -> Vec<String> {
        let mut got = Vec::new();
        unit_items(file, unit, &mut |item| {
            got.push(format!("{item:?}"));
            Ok(())
        })
        .unwrap();
        got
    }

    #[test]
    fn streamed_items_are_the_buffered_ones() {
        let file: Arc<Path> = Arc::from(Path::new("x.json"));
        let e1 = r#"{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient","id":"a"}}"#;
        let e2 = r#"{"resource":{"resourceType":"Observation","valueQuantity":{"value":1.50}}}"#;
        let del = r#"{"request":{"method":"DELETE","url":"Patient/z"}}"#;
        let docs = [
            format!(
                r#"{{"resourceType":"Bundle","type":"batch","entry":[{e1},{e2},{del},1,{{}}]}}"#
            ),
            format!(r#"{{"resourceType":"Bundle","entry":[{e1},{e2}],"type":"transaction"}}"#),
            format!(
                r#"{{"resourceType":"Bundle","type":"collection","entry":[{e1}],"entry":[{e2}]}}"#
            ),
            format!(
                r#"{{"resourceType":"Bundle","type":"searchset","entry":[{e1}],"type":"document"}}"#
            ),
            format!(
                r#"{{"resourceType":"Bundle","type":"batch","entry":[{e1}],"resourceType":"X"}}"#
            ),
            format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{e1},{e2}]"#),
            format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{e1},{e2}]}} x"#),
            format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{e1},{{"a":01}}]}}"#),
            format!(r#"{{"resourceType":"Bundle","type":"document","entry":[{e1}]}}"#),
            format!(r#"{{"resourceType":"Bundle","type":"batch","entry":{e1}}}"#),
            r#"{"resourceType":"Bundle","type":"batch","entry":[]}"#.to_string(),
            r#"{"resourceType":"Bundle","type":"batch","entry":null,"id":"b"}"#.to_string(),
            format!(
                r#"{{"resourceType":"Bundle","type":"batch","id":"b","entry":[{e2}],"meta":{{}}}}"#
            ),
            r#"{"resourceType":"Patient","id":"p","name":[{"family":"F"}]}"#.to_string(),
            r#"{"$serde_json::private::Number":"1.5"}"#.to_string(),
            "[1,2]".to_string(),
            "{}".to_string(),
            String::new(),
            "\"Bundle\"".to_string(),
        ];
        for doc in docs {
            let unit = || Unit::Document(doc.clone().into_bytes());
            let want = buffered(&file, unit());
            assert_eq!(streamed(&file, unit()), want, "{doc}");
        }
        // Not UTF-8, in the second entry.
        let mut bytes =
            format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{e1},"#).into_bytes();
        bytes.extend_from_slice(b"{\"resource\":{\"resourceType\":\"P\xffx\"}}]}");
        let want = buffered(&file, Unit::Document(bytes.clone()));
        assert!(want[0].contains("malformed JSON"), "{want:?}");
        assert_eq!(streamed(&file, Unit::Document(bytes)), want);
        let lines = || Unit::Lines {
            first_line: 3,
            lines: vec![
                e1.into(),
                "\n".into(),
                "{".into(),
                "[]".into(),
                b"[\xff]".to_vec(),
            ],
        };
        assert_eq!(streamed(&file, lines()), buffered(&file, lines()));
    }

    #[test]
    fn streaming_stops_when_the_receiver_does() {
        let file: Arc<Path> = Arc::from(Path::new("x.json"));
        let e = r#"{"resource":{"resourceType":"Patient"}}"#;
        let doc = format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{e},{e},{e}]}}"#);
        let mut n = 0;
        let r = stream_unit_items(&file, Unit::Document(doc.into_bytes()), &mut |_| {
            n += 1;
            if n == 2 {
                return Err(LoadError::Http("enough".into()));
            }
            Ok(())
        });
        assert!(matches!(r, Err(LoadError::Http(m)) if m == "enough"));
        assert_eq!(n, 2);
    }

    /// On every Synthea file, streaming gives exactly the items of the buffered parse.
    #[test]
    fn streamed_items_match_on_synthea() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100");
        let mut items = 0;
        for f in collect_inputs(&[dir]).unwrap() {
            let file: Arc<Path> = Arc::from(f.as_path());
            let mut units = Vec::new();
            read_units(&f, &mut |u| {
                units.push(u);
                Ok(())
            })
            .unwrap();
            for u in units {
                let Unit::Document(bytes) = u else {
                    panic!("{} is not a .json file", f.display())
                };
                let want = buffered(&file, Unit::Document(bytes.clone()));
                items += want.len();
                assert!(
                    streamed(&file, Unit::Document(bytes)) == want,
                    "{}",
                    f.display()
                );
            }
        }
        assert_eq!(items, 38_971);
    }

    #[test]
    fn loader_ids() {
        assert_eq!(
            loader_id(Some("urn:uuid:abc"), Some("own")),
            Some("own".into())
        );
        assert_eq!(loader_id(Some("urn:uuid:abc"), None), Some("abc".into()));
        assert_eq!(loader_id(Some("http://x/Patient/1"), None), None);
        assert_eq!(loader_id(None, Some("bad id")), None);
    }
}

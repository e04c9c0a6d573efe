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
use serde_json::Value;

use crate::error::LoadError;

mod json;
mod prepass;

pub use prepass::full_urls;

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
                        json::from_str(text)
                    }
                    Err(_) => json::from_slice(line.trim_ascii()),
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
            let value: Value = match json::from_slice(&bytes) {
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
    /// Forget every item this unit passed so far: the document turned out to be malformed (a
    /// repeated key included). What the document really holds follows, as [`unit_items`] would
    /// pass it: its error.
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
    let mut passed = 0usize;
    let mut stopped = None;
    let parsed = json::stream_document(
        &bytes,
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

    /// The parse (through `str` when the text is UTF-8) gives what `serde_json::from_slice` gives,
    /// value and bytes, and the same errors, but for a repeated key (see
    /// `duplicate_keys_are_malformed_json`).
    #[test]
    fn json_parse_matches_serde_json() {
        let cases = [
            r#"{"a":1,"b":[1.50,-0,1e5,12345678901234567890123,0.1e-3],"c":{},"d":[],"e":null}"#,
            r#"[{"x":{"y":[[[]]]}},"s\u00e9\n",true,false,null]"#,
            r#"{"$serde_json::private::Number":"1.50"}"#,
            r#"{"$serde_json::private::Number":1}"#,
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
        for text in cases.iter().copied().chain([deep.as_str()]) {
            let want = serde_json::from_str::<Value>(text).map_err(|e| e.to_string());
            let got = json::from_str(text).map_err(|e| e.to_string());
            assert_eq!(got, want, "{text}");
            let want = serde_json::from_slice::<Value>(text.as_bytes()).map_err(|e| e.to_string());
            let got = json::from_slice(text.as_bytes()).map_err(|e| e.to_string());
            assert_eq!(got, want, "{text}");
            if let (Ok(a), Ok(b)) = (got, want) {
                assert_eq!(
                    serde_json::to_string(&a).ok(),
                    serde_json::to_string(&b).ok()
                );
            }
        }
        // serde_json's `Value` reads this member as the JSON in its text; it is an ordinary
        // member here, as in REST bodies.
        assert_eq!(
            json::from_str(r#"{"$serde_json::private::RawValue":"{\"a\":1}"}"#).unwrap(),
            serde_json::json!({"$serde_json::private::RawValue": "{\"a\":1}"})
        );
        let text = "{\"a\":\"Jos\u{e9} \u{1F600}\",\"b\":[\"\\u00e9\"]}";
        assert_eq!(
            json::from_slice(text.as_bytes()).map_err(|e| e.to_string()),
            serde_json::from_slice::<Value>(text.as_bytes()).map_err(|e| e.to_string())
        );
        let bad_utf8 = b"{\"a\":\"\xff\"}";
        assert_eq!(
            json::from_slice(bad_utf8).map_err(|e| e.to_string()),
            serde_json::from_slice::<Value>(bad_utf8).map_err(|e| e.to_string())
        );
    }

    /// A repeated key, where serde_json keeps the last value, is malformed JSON for the loader
    /// as for REST: an NDJSON line is reported with its file and line, a `.json` document with its
    /// file, whether its entries were streamed or not.
    #[test]
    fn duplicate_keys_are_malformed_json() {
        let file: Arc<Path> = Arc::from(Path::new("x.ndjson"));
        let lines = Unit::Lines {
            first_line: 7,
            lines: vec![
                br#"{"resourceType":"Patient","id":"a"}"#.to_vec(),
                br#"{"resourceType":"Patient","id":"x","gender":"male","gender":"female"}"#
                    .to_vec(),
                br#"{"resourceType":"Patient","id":"b","name":[{"given":["A"],"given":["B"]}]}"#
                    .to_vec(),
            ],
        };
        let items = buffered(&file, lines);
        assert_eq!(items.len(), 3);
        assert!(items[0].starts_with("Ok("), "{}", items[0]);
        for (item, line, key) in [(&items[1], 8, "gender"), (&items[2], 9, "given")] {
            assert!(item.starts_with("Err("), "{item}");
            assert!(item.contains(&format!("line: Some({line})")), "{item}");
            assert!(
                item.contains(&format!(r#"malformed JSON: duplicate key \"{key}\""#)),
                "{item}"
            );
        }
        let file: Arc<Path> = Arc::from(Path::new("x.json"));
        let e = r#"{"resource":{"resourceType":"Patient","id":"a"}}"#;
        for doc in [
            format!(
                r#"{{"resourceType":"Bundle","type":"batch","entry":[{e},{{"resource":{{"resourceType":"Patient","id":"b","id":"c"}}}}]}}"#
            ),
            format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{e}],"entry":[{e}]}}"#),
            format!(r#"{{"resourceType":"Bundle","entry":[{e}],"type":"batch","entry":[{e}]}}"#),
            format!(
                r#"{{"resourceType":"Bundle","type":"batch","entry":[{e}],"type":"collection"}}"#
            ),
            format!(
                r#"{{"resourceType":"Bundle","type":"batch","id":"1","entry":[{e}],"id":"2"}}"#
            ),
            r#"{"resourceType":"Patient","id":"x","id":"y"}"#.to_string(),
        ] {
            let unit = || Unit::Document(doc.clone().into_bytes());
            let want = buffered(&file, unit());
            assert_eq!(want.len(), 1, "{doc}: {want:?}");
            assert!(
                want[0].starts_with("Err(") && want[0].contains("duplicate key"),
                "{doc}: {want:?}"
            );
            assert_eq!(streamed(&file, unit()), want, "{doc}");
        }
    }

    /// The same on every file of the Synthea set: equal values, byte-identical when serialized.
    #[test]
    fn json_parse_matches_serde_json_on_synthea() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100");
        let files = collect_inputs(&[dir]).unwrap();
        assert!(files.len() > 100);
        for f in files {
            read_units(&f, &mut |unit| {
                let Unit::Document(bytes) = unit else {
                    panic!("{} is not a .json file", f.display())
                };
                let want: Value = serde_json::from_slice(&bytes).unwrap();
                let got = json::from_slice(&bytes).unwrap();
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
            r#"{"resourceType":"Bundle","type":"batch","entry":1.50}"#.to_string(),
            format!(" \n\t{{\"resourceType\":\"Bundle\",\"type\":\"batch\",\"entry\":[{e1}]}}"),
            format!(r#"{{"$x":1,"resourceType":"Bundle","type":"batch","entry":[{e1}]}}"#),
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

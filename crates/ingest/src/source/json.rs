//! JSON text to `serde_json::Value` with the reader of every ingestion path
//! ([`crate::strict_json`]: serde_json's `Value`, numbers keep their text under
//! `arbitrary_precision` and errors read as serde_json's, but a duplicate object key is an
//! error), plus [`stream_document`], which hands over a Bundle's entries one by one while the
//! document is being parsed.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::LoadError;
use crate::strict_json::{self, Strict};

/// [`strict_json::from_str`].
pub(super) fn from_str(text: &str) -> serde_json::Result<Value> {
    strict_json::from_str(text)
}

/// [`strict_json::from_slice`]: text that is UTF-8 is checked once as a whole and read as a
/// `str`; other text takes the slice reader, for its exact error.
pub(super) fn from_slice(bytes: &[u8]) -> serde_json::Result<Value> {
    strict_json::from_slice(bytes)
}

/// How [`stream_document`] ended.
pub(super) enum Doc {
    /// Every entry went to `emit`, and the whole document confirms that it is a Bundle whose
    /// entries are loaded.
    Streamed,
    /// Nothing went to `emit`: the whole document.
    Whole(Value),
}

/// Receives each `Bundle.entry` element as soon as it is parsed.
pub(super) type Emit<'a> = dyn FnMut(Value) -> Result<(), LoadError> + 'a;

/// Why [`DocSeed`] stopped before the end of the document.
enum Stop {
    /// `emit` returned this error.
    Caller(LoadError),
    /// The first key is not an element name (see [`DocSeed::visit_map`]): parse the whole
    /// document with serde_json instead.
    Whole,
}

/// Parse a whole document as [`from_slice`] does (a duplicate key, at any depth, is an error), but pass the elements of `entry` to `emit`
/// one by one while parsing, when the document is an object whose `resourceType` (`Bundle`) and
/// `type` (transaction, batch, collection, searchset) come before `entry`: each entry is then
/// handled while it is still in the CPU caches, and the Bundle is never whole in memory. An
/// `Err` from `emit` stops the parse and is put in `stopped`.
pub(super) fn stream_document(
    bytes: &[u8],
    emit: &mut Emit<'_>,
    stopped: &mut Option<LoadError>,
) -> serde_json::Result<Doc> {
    // Only an object can be a Bundle; anything else is read whole.
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t'));
    if first != Some(&b'{') {
        return from_slice(bytes).map(Doc::Whole);
    }
    let mut stop = None;
    let seed = DocSeed {
        emit,
        stop: &mut stop,
    };
    // As in `from_slice`: UTF-8 checked once for the whole text when it is valid.
    let parsed = match std::str::from_utf8(bytes) {
        Ok(text) => end(seed, serde_json::Deserializer::from_str(text)),
        Err(_) => end(seed, serde_json::Deserializer::from_slice(bytes)),
    };
    match stop {
        Some(Stop::Caller(e)) => {
            *stopped = Some(e);
            parsed
        }
        Some(Stop::Whole) => from_slice(bytes).map(Doc::Whole),
        None => parsed,
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

/// The top-level object of a document.
struct DocSeed<'s, 'e> {
    emit: &'s mut Emit<'e>,
    stop: &'s mut Option<Stop>,
}

impl<'de> DeserializeSeed<'de> for DocSeed<'_, '_> {
    type Value = Doc;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Doc, D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocSeed<'_, '_> {
    type Value = Doc;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            return Ok(Doc::Whole(Value::Object(Map::new())));
        };
        // A FHIR element name never starts with `$`; serde_json's `Value` gives some such keys a
        // meaning of its own (a one-member object read as a number or raw value), which only
        // serde_json itself knows: such a document is parsed whole by serde_json.
        if first.starts_with('$') {
            *self.stop = Some(Stop::Whole);
            return Err(de::Error::custom("parsed whole"));
        }
        let DocSeed { emit, stop } = self;
        let mut members = Map::new();
        let mut is_bundle = false;
        let mut entry_type = false;
        // `entry` went to `emit`; it is then not among `members`.
        let mut streamed = false;
        let mut key = first;
        let result = loop {
            if key == "entry"
                && is_bundle
                && entry_type
                && !streamed
                && !members.contains_key("entry")
            {
                let entries = EntriesSeed {
                    emit: &mut *emit,
                    stop: &mut *stop,
                };
                match map.next_value_seed(entries) {
                    Ok(None) => streamed = true,
                    Ok(Some(value)) => {
                        members.insert(key, value);
                    }
                    Err(e) => break Err(e),
                }
            } else {
                let value: Value = match map.next_value_seed(Strict) {
                    Ok(value) => value,
                    Err(e) => break Err(e),
                };
                // As the whole-document parse, after the repeated member's value.
                if (streamed && key == "entry") || members.contains_key(&key) {
                    break Err(strict_json::duplicate_key(&key));
                }
                match key.as_str() {
                    "resourceType" => is_bundle = value.as_str() == Some("Bundle"),
                    "type" => entry_type = value.as_str().is_some_and(is_entry_type),
                    _ => {}
                }
                members.insert(key, value);
            }
            match map.next_key::<String>() {
                Ok(Some(next)) => key = next,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        result?;
        // No key repeats, so what made the entries stream (`resourceType` Bundle, a `type` whose
        // entries are loaded, one `entry`) still holds at the end.
        Ok(if streamed {
            Doc::Streamed
        } else {
            Doc::Whole(Value::Object(members))
        })
    }
}

/// The value of `Bundle.entry`: an array is streamed to `emit` (`None`), anything else is
/// returned.
struct EntriesSeed<'s, 'e> {
    emit: &'s mut Emit<'e>,
    stop: &'s mut Option<Stop>,
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

    fn visit_i64<E>(self, v: i64) -> Result<Option<Value>, E> {
        Ok(Some(Value::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Option<Value>, E> {
        Ok(Some(Value::Number(v.into())))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Option<Value>, E> {
        Ok(Some(Number::from_f64(v).map_or(Value::Null, Value::Number)))
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
        Strict.deserialize(de).map(Some)
    }

    fn visit_unit<E>(self) -> Result<Option<Value>, E> {
        Ok(Some(Value::Null))
    }

    /// An object (or what serde_json hands over as one, such as a number under
    /// `arbitrary_precision`): read as [`Strict`] reads it.
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Option<Value>, A::Error> {
        Strict.visit_map(map).map(Some)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Value>, A::Error> {
        while let Some(entry) = seq.next_element_seed(Strict)? {
            if let Err(e) = (self.emit)(entry) {
                *self.stop = Some(Stop::Caller(e));
                return Err(de::Error::custom("stopped by the caller"));
            }
        }
        Ok(None)
    }
}

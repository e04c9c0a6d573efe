//! The one JSON reader of every ingestion path: REST bodies (the server's `json_body`), the bulk
//! loader (`fhirhose load`) and `$import`. It builds a `serde_json::Value` as serde_json does
//! (numbers keep their text under `arbitrary_precision`, errors read as serde_json's, nesting is
//! bounded by serde_json's recursion limit of 128), except that a duplicate key in an object is
//! an error (`duplicate key "gender" in an object at line 1 column 60`): JSON leaves a repeated
//! name's meaning open, and serde_json's `Value` silently kept the last value.
//!
//! Two layouts of the same tree:
//! - [`parse_json`] (REST): stops as soon as the root object's `entry` array exceeds a bound (an
//!   oversized Bundle is refused before its tree is built) and allocates arrays and objects at
//!   their final size (a quarter less memory for FHIR resources, which a request may hold long).
//! - [`from_str`], [`from_slice`] and the [`Strict`] seed (loader, `$import`): grow arrays and
//!   objects as serde_json's own `Value` does, so the duplicate check costs no allocation: it is
//!   the answer of the map's insert.

use std::cell::Cell;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why [`parse_json`] refused a body.
#[derive(Debug)]
pub enum JsonError {
    /// The root object's `entry` array has more elements than allowed.
    TooManyEntries,
    /// Malformed JSON, a duplicate key or nesting deeper than 128.
    Syntax(serde_json::Error),
}

/// Parses JSON into a [`Value`] without duplicate keys, stopping as soon as the root object's
/// `entry` array exceeds `max_entries`, with arrays and objects allocated at their final size.
pub fn parse_json(bytes: &[u8], max_entries: usize) -> Result<Value, JsonError> {
    let limits = Limits {
        max_entries,
        too_many: Cell::new(false),
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Node {
        limits: Some(&limits),
        place: Place::Root,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if limits.too_many.get() => Err(JsonError::TooManyEntries),
        Err(e) => Err(JsonError::Syntax(e)),
    }
}

/// `serde_json::from_str::<Value>`, but a duplicate key is an error.
pub fn from_str(text: &str) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = Strict.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// `serde_json::from_slice::<Value>`, but a duplicate key is an error; text that is UTF-8 is
/// checked once as a whole and read as a `str` (cheaper than checking each string as it is
/// read), other text takes the slice reader, for its exact error.
pub fn from_slice(bytes: &[u8]) -> serde_json::Result<Value> {
    match std::str::from_utf8(bytes) {
        Ok(text) => from_str(text),
        Err(_) => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let v = Strict.deserialize(&mut de)?;
            de.end()?;
            Ok(v)
        }
    }
}

/// A JSON value of any kind, read as [`from_str`] reads it: for a `next_value_seed` or
/// `next_element_seed` inside a visitor of one's own.
#[derive(Clone, Copy, Debug, Default)]
pub struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Node::GROWN.deserialize(d)
    }
}

impl Strict {
    /// The object whose members `map` hands over (a visitor's `visit_map` that has read none of
    /// them yet), as [`from_str`] reads an object.
    pub fn visit_map<'de, A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        Visitor::visit_map(Node::GROWN, map)
    }

    /// The array whose elements `seq` hands over, as [`from_str`] reads an array.
    pub fn visit_seq<'de, A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        Visitor::visit_seq(Node::GROWN, seq)
    }
}

/// With serde_json's `arbitrary_precision`, a number that is not a 64-bit integer reaches a
/// visitor as a one-entry map with this key and the number's text.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// [`parse_json`]'s bound on Bundle entries.
struct Limits {
    max_entries: usize,
    too_many: Cell<bool>,
}

#[derive(Clone, Copy)]
enum Place {
    Root,
    /// The root object's `entry`.
    Entries,
    Other,
}

/// The reader at one place of the tree: with `limits` ([`parse_json`]) it bounds the entries
/// and builds final-size arrays and objects; without, it grows them as serde_json does.
#[derive(Clone, Copy)]
struct Node<'c> {
    limits: Option<&'c Limits>,
    place: Place,
}

impl Node<'static> {
    const GROWN: Node<'static> = Node {
        limits: None,
        place: Place::Other,
    };
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// The error of a key that repeats in an object.
pub(crate) fn duplicate_key<E: de::Error>(key: &str) -> E {
    let shown: String = key.chars().take(100).collect();
    E::custom(format_args!(
        "duplicate key \"{}\" in an object",
        shown.escape_debug()
    ))
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let child = Node {
            limits: self.limits,
            place: Place::Other,
        };
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(child)? {
            if let (Place::Entries, Some(limits)) = (self.place, self.limits)
                && out.len() >= limits.max_entries
            {
                limits.too_many.set(true);
                return Err(de::Error::custom("too many Bundle entries"));
            }
            out.push(v);
        }
        if self.limits.is_some() {
            out.shrink_to_fit();
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        // The first key is classified as serde_json's `Value` does it, without a `String` for
        // the number token, and the number is parsed from the text as it is read.
        let first = match map.next_key_seed(FirstKey)? {
            None => return Ok(Value::Object(Map::new())),
            Some(FirstKeyClass::Number) => {
                return map.next_value_seed(NumberText).map(Value::Number);
            }
            Some(FirstKeyClass::Key(key)) => key,
        };
        let child = |key: &str| Node {
            limits: self.limits,
            place: match self.place {
                Place::Root if key == "entry" => Place::Entries,
                _ => Place::Other,
            },
        };
        let value = map.next_value_seed(child(&first))?;
        if self.limits.is_none() {
            // serde_json's own way: members inserted as they come. A repeated key's insert
            // answers its earlier value.
            let mut object = Map::new();
            object.insert(first, value);
            while let Some(key) = map.next_key::<String>()? {
                let value = map.next_value_seed(child(&key))?;
                if let Some(key) = insert(&mut object, key, value) {
                    return Err(duplicate_key(&key));
                }
            }
            return Ok(Value::Object(object));
        }
        let mut pairs = vec![(first, value)];
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(child(&key))?;
            pairs.push((key, value));
        }
        let mut object = Map::with_capacity(pairs.len());
        for (key, value) in pairs {
            if object.contains_key(&key) {
                return Err(duplicate_key(&key));
            }
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// The first key of an object: [`NUMBER_TOKEN`] or a member's name.
struct FirstKey;

enum FirstKeyClass {
    Number,
    Key(String),
}

impl<'de> DeserializeSeed<'de> for FirstKey {
    type Value = FirstKeyClass;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<FirstKeyClass, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FirstKey {
    type Value = FirstKeyClass;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E>(self, s: &str) -> Result<FirstKeyClass, E> {
        Ok(if s == NUMBER_TOKEN {
            FirstKeyClass::Number
        } else {
            FirstKeyClass::Key(s.to_owned())
        })
    }
    fn visit_string<E>(self, s: String) -> Result<FirstKeyClass, E> {
        Ok(if s == NUMBER_TOKEN {
            FirstKeyClass::Number
        } else {
            FirstKeyClass::Key(s)
        })
    }
}

/// The text of a number under [`NUMBER_TOKEN`], parsed as it is read.
struct NumberText;

impl<'de> DeserializeSeed<'de> for NumberText {
    type Value = Number;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Number, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NumberText {
    type Value = Number;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("string containing a number")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Number, E> {
        s.parse::<Number>().map_err(E::custom)
    }
}

/// Inserts a member; a key already present is handed back (the object keeps its first value).
fn insert(object: &mut Map<String, Value>, key: String, value: Value) -> Option<String> {
    match object.entry(key) {
        serde_json::map::Entry::Vacant(v) => {
            v.insert(value);
            None
        }
        serde_json::map::Entry::Occupied(o) => Some(o.key().clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth_in_both_layouts() {
        for text in [
            r#"{"resourceType":"Patient","id":"x","gender":"male","gender":"female"}"#,
            r#"{"a":{"b":[{"c":1,"c":1}]}}"#,
            r#"{"a":1,"b":2,"a":1}"#,
        ] {
            let e = from_str(text).unwrap_err().to_string();
            assert!(e.contains("duplicate key"), "{text}: {e}");
            let e = from_slice(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("duplicate key"), "{text}: {e}");
            match parse_json(text.as_bytes(), 10) {
                Err(JsonError::Syntax(e)) => assert!(e.to_string().contains("duplicate key")),
                other => panic!("{text}: {other:?}"),
            }
        }
        let e = from_str(r#"{"resourceType":"Patient","gender":"male","gender":"female"}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "duplicate key \"gender\" in an object at line 1 column 60"
        );
        // Not UTF-8: the slice reader says the same.
        let e = from_slice(b"{\"a\":1,\"a\":2,\"b\":\"\xff\"}")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("duplicate key \"a\""), "{e}");
    }

    /// Without duplicates, both layouts give serde_json's value, byte for byte.
    #[test]
    fn values_are_serde_jsons() {
        for text in [
            r#"{"a":1,"b":[1.50,-0,1e5,12345678901234567890123,0.1e-3],"c":{},"d":[],"e":null}"#,
            r#"[{"x":{"y":[[[]]]}},"s\u00e9\n",true,false,null]"#,
            r#"{"$serde_json::private::Number":"1.50"}"#,
            r#"{"z":1,"a":2,"m":{"k":"v"}}"#,
        ] {
            let want: Value = serde_json::from_str(text).unwrap();
            for got in [
                from_str(text).unwrap(),
                from_slice(text.as_bytes()).unwrap(),
                parse_json(text.as_bytes(), 10).unwrap(),
            ] {
                assert_eq!(
                    serde_json::to_string(&got).unwrap(),
                    serde_json::to_string(&want).unwrap()
                );
            }
        }
    }

    #[test]
    fn entries_are_bounded() {
        let text = r#"{"resourceType":"Bundle","entry":[{},{},{}],"other":[1,2,3,4]}"#;
        assert!(matches!(
            parse_json(text.as_bytes(), 2),
            Err(JsonError::TooManyEntries)
        ));
        assert!(parse_json(text.as_bytes(), 3).is_ok());
        assert!(from_str(text).is_ok());
    }
}

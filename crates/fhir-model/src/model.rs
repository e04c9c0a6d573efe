//! Indexed model tables.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::primitives::Prim;

const R4_MODEL_JSON: &str = include_str!("../data/r4-model.json");

/// The kind of a type definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    /// `string`, `date`, `code`, …: the JSON value itself, plus an optional `_name` shadow.
    Primitive,
    /// A complex data type such as `HumanName` or `Quantity`.
    Complex,
    /// A resource type, including the abstract `Resource` and `DomainResource`.
    Resource,
    /// An element defined inline in a resource or type, named by its path (`Patient.contact`).
    Backbone,
}

/// One element of a type, inherited elements included.
#[derive(Debug, Clone)]
pub struct ElementDef {
    /// The element name; `value` for `value[x]`.
    pub name: String,
    /// True for choice elements (`value[x]`).
    pub choice: bool,
    /// Type codes. Backbone elements have a synthetic type named by their path; elements that hold
    /// resources have `["Resource"]`.
    pub types: Vec<String>,
    pub min: u32,
    /// `max == "*"`: the JSON representation is an array.
    pub max_many: bool,
    /// `isSummary` in the base definition: part of a `_summary=true` answer.
    pub summary: bool,
}

/// A type definition with its (flattened) elements.
#[derive(Debug, Clone)]
pub struct TypeDef {
    pub name: String,
    pub kind: TypeKind,
    pub base: Option<String>,
    pub is_abstract: bool,
    pub elements: Vec<ElementDef>,
    /// JSON key -> child; choice elements are expanded (`valueQuantity`).
    children: ChildTable,
    /// The syntax of a primitive type's values.
    pub(crate) prim: Option<Prim>,
}

/// Where a JSON key of a type leads: its element, the concrete type, and that type's index in
/// [`Model`]'s table (so that validation needs no second lookup by name).
#[derive(Debug, Clone, Copy)]
struct Child {
    element: u32,
    ty: u32,
    def: Option<u32>,
}

/// A type's children by JSON key: open addressing over a power-of-two table, each key hashed
/// and compared through two words that, with its length, identify a key of up to 16 bytes
/// (longer keys' middles are compared as slices). The walks look a key up for every JSON
/// member, and these keys are short: no `memcmp` call, no byte-by-byte hash.
#[derive(Debug, Clone, Default)]
struct ChildTable {
    /// Per child: its key's words, the key, the child.
    entries: Vec<(KeyWords, Box<str>, Child)>,
    /// Index + 1 into `entries`; 0: empty.
    slots: Vec<u32>,
    /// `64 - log2(slots.len())`.
    shift: u32,
}

/// A key's length and two words: its first and last 8 bytes (overlapping when shorter than
/// 16), or for shorter keys its first and last 4 or 2 bytes, or its one byte: with the length
/// they identify a key of up to 16 bytes (longer keys also compare their middles,
/// [`KeyWords::same_key`]). The model's child tables and de-identification's member tables
/// look JSON keys up by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyWords {
    len: usize,
    first: u64,
    last: u64,
}

impl KeyWords {
    #[inline(always)]
    pub fn of(key: &[u8]) -> KeyWords {
        let len = key.len();
        let (first, last) = if len >= 8 {
            (word8(&key[..8]), word8(&key[len - 8..]))
        } else if len >= 4 {
            (word4(&key[..4]), word4(&key[len - 4..]))
        } else if len >= 2 {
            (
                u64::from(u16::from_le_bytes([key[0], key[1]])),
                u64::from(u16::from_le_bytes([key[len - 2], key[len - 1]])),
            )
        } else {
            (key.first().map_or(0, |&b| u64::from(b)), 0)
        };
        KeyWords { len, first, last }
    }

    /// The key's slot in a table of `2^(64 - shift)` slots.
    #[inline(always)]
    pub fn hash(&self, shift: u32) -> usize {
        let h = (self.first ^ self.last.rotate_left(29) ^ self.len as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> shift) as usize
    }

    /// Whether `key` (whose words these are) is `other_key` (whose words are `other`).
    #[inline(always)]
    pub fn same_key(&self, key: &[u8], other: &KeyWords, other_key: &[u8]) -> bool {
        self == other
            && (self.len <= 16 || key.get(8..self.len - 8) == other_key.get(8..self.len - 8))
    }
}

#[inline(always)]
fn word8(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn word4(b: &[u8]) -> u64 {
    let mut w = [0u8; 4];
    w.copy_from_slice(b);
    u64::from(u32::from_le_bytes(w))
}

impl ChildTable {
    fn new(children: Vec<(String, Child)>) -> ChildTable {
        let mut size = 4usize;
        while size < children.len() * 2 {
            size *= 2;
        }
        let mut t = ChildTable {
            entries: Vec::with_capacity(children.len()),
            slots: vec![0; size],
            shift: 64 - size.trailing_zeros(),
        };
        for (key, child) in children {
            match t.find(&key) {
                // A repeated key replaces the earlier child, as a map insert would.
                Some(i) => t.entries[i].2 = child,
                None => {
                    let words = KeyWords::of(key.as_bytes());
                    let mut s = words.hash(t.shift);
                    while t.slots[s] != 0 {
                        s = (s + 1) & (size - 1);
                    }
                    t.slots[s] = t.entries.len() as u32 + 1;
                    t.entries.push((words, key.into_boxed_str(), child));
                }
            }
        }
        t
    }

    #[inline]
    fn find(&self, key: &str) -> Option<usize> {
        let words = KeyWords::of(key.as_bytes());
        let mask = self.slots.len().wrapping_sub(1);
        let mut s = words.hash(self.shift);
        loop {
            let i = (*self.slots.get(s)? as usize).checked_sub(1)?;
            let (w, k, _) = &self.entries[i];
            if w.same_key(k.as_bytes(), &words, key.as_bytes()) {
                return Some(i);
            }
            s = (s + 1) & mask;
        }
    }

    #[inline]
    fn get(&self, key: &str) -> Option<&Child> {
        self.find(key).map(|i| &self.entries[i].2)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Child> {
        self.entries.iter_mut().map(|(_, _, c)| c)
    }
}

impl TypeDef {
    /// The element and concrete type a JSON key names, if any.
    #[inline]
    pub fn child(&self, json_key: &str) -> Option<ChildRef<'_>> {
        self.children.get(json_key).map(|c| self.child_ref(c))
    }

    #[inline]
    fn child_ref(&self, c: &Child) -> ChildRef<'_> {
        let element = &self.elements[c.element as usize];
        ChildRef {
            element,
            type_name: &element.types[c.ty as usize],
            def: c.def,
        }
    }

    /// Every JSON key of the type with the child it names (choice elements expanded): the
    /// keys [`TypeDef::child`] finds, each once.
    pub fn children(&self) -> impl Iterator<Item = (&str, ChildRef<'_>)> {
        self.children
            .entries
            .iter()
            .map(|(_, key, c)| (&**key, self.child_ref(c)))
    }

    /// An element by its name (`value` for `value[x]`).
    pub fn element(&self, name: &str) -> Option<&ElementDef> {
        self.elements.iter().find(|e| e.name == name)
    }
}

/// An element reached through a JSON key, with the concrete type that key selects.
#[derive(Debug, Clone, Copy)]
pub struct ChildRef<'a> {
    pub element: &'a ElementDef,
    pub type_name: &'a str,
    /// The concrete type's index in the model ([`Model::child_def`]).
    def: Option<u32>,
}

impl ChildRef<'_> {
    /// The concrete type's index in the model ([`Model::type_index`] of `type_name`), when the
    /// model defines that type: a key for tables over the model's types.
    #[inline]
    pub fn type_index(&self) -> Option<u32> {
        self.def
    }
}

/// The type of a search parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SearchParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

impl SearchParamType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "number" => Self::Number,
            "date" => Self::Date,
            "string" => Self::String,
            "token" => Self::Token,
            "reference" => Self::Reference,
            "composite" => Self::Composite,
            "quantity" => Self::Quantity,
            "uri" => Self::Uri,
            "special" => Self::Special,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Number => "number",
            Self::Date => "date",
            Self::String => "string",
            Self::Token => "token",
            Self::Reference => "reference",
            Self::Composite => "composite",
            Self::Quantity => "quantity",
            Self::Uri => "uri",
            Self::Special => "special",
        }
    }
}

/// A search parameter as it applies to one resource type.
#[derive(Debug, Clone)]
pub struct SearchParam {
    pub code: String,
    pub url: String,
    pub kind: SearchParamType,
    /// The FHIRPath expression restricted to the parts that apply to this resource type.
    pub expression: Option<String>,
    /// Target resource types of a reference parameter.
    pub targets: Vec<String>,
    /// Components of a composite parameter: (definition url, expression).
    pub components: Vec<(String, String)>,
}

/// The R4 model.
#[derive(Debug)]
pub struct Model {
    types: Vec<TypeDef>,
    /// Type name -> index in `types`.
    by_name: FxHashMap<String, u32>,
    resource_types: Vec<String>,
    /// resource type (incl. `Resource`, `DomainResource`) -> code -> parameter
    search: HashMap<String, HashMap<String, SearchParam>>,
    compartment: HashMap<String, Vec<String>>,
}

static R4: OnceLock<Model> = OnceLock::new();

/// The FHIR R4 model, built on first use from the embedded tables.
pub fn r4() -> &'static Model {
    R4.get_or_init(|| Model::from_json(R4_MODEL_JSON).expect("embedded R4 model tables are valid"))
}

#[derive(Deserialize)]
struct RawModel {
    types: Vec<RawType>,
    search: Vec<RawSearch>,
    compartment: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct RawType {
    n: String,
    k: String,
    b: Option<String>,
    a: bool,
    e: Vec<RawElement>,
}

/// An element entry: `[name, choice, [type codes], min, many]`, then `1` when the element is
/// marked `isSummary` (absent otherwise: entries of the first layout read as not summary).
struct RawElement {
    name: String,
    choice: u8,
    types: Vec<String>,
    min: u32,
    many: u8,
    summary: u8,
}

impl<'de> Deserialize<'de> for RawElement {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = RawElement;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("[name, choice, types, min, many] with an optional summary flag")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawElement, A::Error> {
                use serde::de::Error;
                let missing = |i: usize| A::Error::invalid_length(i, &self);
                let e = RawElement {
                    name: seq.next_element()?.ok_or_else(|| missing(0))?,
                    choice: seq.next_element()?.ok_or_else(|| missing(1))?,
                    types: seq.next_element()?.ok_or_else(|| missing(2))?,
                    min: seq.next_element()?.ok_or_else(|| missing(3))?,
                    many: seq.next_element()?.ok_or_else(|| missing(4))?,
                    summary: seq.next_element()?.unwrap_or(0),
                };
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::invalid_length(7, &self));
                }
                Ok(e)
            }
        }
        d.deserialize_seq(Entry)
    }
}

#[derive(Deserialize)]
struct RawSearch {
    c: String,
    u: String,
    t: String,
    b: Vec<String>,
    x: HashMap<String, String>,
    tg: Vec<String>,
    comp: Vec<(String, String)>,
}

/// The suffix a choice type adds to its element name: `valueQuantity`, `valueDateTime`.
fn choice_suffix(type_code: &str) -> String {
    let mut chars = type_code.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

impl Model {
    fn from_json(text: &str) -> Result<Model, String> {
        let raw: RawModel = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut types = Vec::with_capacity(raw.types.len());
        let mut by_name: FxHashMap<String, u32> =
            FxHashMap::with_capacity_and_hasher(raw.types.len(), Default::default());
        let mut resource_types = Vec::new();
        for t in raw.types {
            let kind = match t.k.as_str() {
                "P" => TypeKind::Primitive,
                "C" => TypeKind::Complex,
                "R" => TypeKind::Resource,
                "B" => TypeKind::Backbone,
                other => return Err(format!("unknown type kind {other}")),
            };
            let elements: Vec<ElementDef> =
                t.e.into_iter()
                    .map(|e| ElementDef {
                        name: e.name,
                        choice: e.choice != 0,
                        types: e.types,
                        min: e.min,
                        max_many: e.many != 0,
                        summary: e.summary != 0,
                    })
                    .collect();
            let mut children = Vec::new();
            for (ei, el) in elements.iter().enumerate() {
                let child = |ti: usize| Child {
                    element: ei as u32,
                    ty: ti as u32,
                    def: None,
                };
                if el.choice {
                    for (ti, ty) in el.types.iter().enumerate() {
                        children.push((format!("{}{}", el.name, choice_suffix(ty)), child(ti)));
                    }
                } else {
                    children.push((el.name.clone(), child(0)));
                }
            }
            if kind == TypeKind::Resource && !t.a {
                resource_types.push(t.n.clone());
            }
            let prim = (kind == TypeKind::Primitive).then(|| Prim::from_name(&t.n));
            // A later definition of the same name replaces the earlier one, as a map insert would.
            let def = TypeDef {
                name: t.n,
                kind,
                base: t.b,
                is_abstract: t.a,
                elements,
                children: ChildTable::new(children),
                prim,
            };
            match by_name.get(&def.name) {
                Some(&i) => types[i as usize] = def,
                None => {
                    by_name.insert(def.name.clone(), types.len() as u32);
                    types.push(def);
                }
            }
        }
        resource_types.sort();
        // Resolve every child's type to its index, once.
        for t in &mut types {
            let TypeDef {
                elements, children, ..
            } = t;
            for c in children.values_mut() {
                let ty = &elements[c.element as usize].types[c.ty as usize];
                c.def = by_name.get(ty.as_str()).copied();
            }
        }

        let mut search: HashMap<String, HashMap<String, SearchParam>> = HashMap::new();
        for s in raw.search {
            let Some(kind) = SearchParamType::parse(&s.t) else {
                return Err(format!("unknown search parameter type {}", s.t));
            };
            for base in &s.b {
                let param = SearchParam {
                    code: s.c.clone(),
                    url: s.u.clone(),
                    kind,
                    expression: s.x.get(base).cloned(),
                    targets: s.tg.clone(),
                    components: s.comp.clone(),
                };
                search
                    .entry(base.clone())
                    .or_default()
                    .insert(s.c.clone(), param);
            }
        }
        Ok(Model {
            types,
            by_name,
            resource_types,
            search,
            compartment: raw.compartment,
        })
    }

    /// A type by name: `Patient`, `HumanName`, `string`, or a backbone path such as `Patient.contact`.
    pub fn type_def(&self, name: &str) -> Option<&TypeDef> {
        let &i = self.by_name.get(name)?;
        self.types.get(i as usize)
    }

    /// A type's index (below [`Model::type_count`]), the key [`ChildRef::type_index`] gives.
    pub fn type_index(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// How many types the model defines.
    pub fn type_count(&self) -> usize {
        self.types.len()
    }

    /// The definition of a child's concrete type (`child` from a type of this model): what
    /// `type_def(child.type_name)` gives, without hashing the name.
    pub fn child_def(&self, child: ChildRef<'_>) -> Option<&TypeDef> {
        child.def.and_then(|i| self.types.get(i as usize))
    }

    /// The child a JSON key names in `def` (a type of this model), with the definition of its
    /// concrete type when the model has one: one hash lookup instead of two.
    pub(crate) fn child_with_def<'m>(
        &'m self,
        def: &'m TypeDef,
        json_key: &str,
    ) -> Option<(ChildRef<'m>, Option<&'m TypeDef>)> {
        let c = def.children.get(json_key)?;
        let child_def = c.def.and_then(|i| self.types.get(i as usize));
        Some((def.child_ref(c), child_def))
    }

    /// Any resource type, including the abstract `Resource` and `DomainResource`.
    pub fn is_resource(&self, name: &str) -> bool {
        self.type_def(name)
            .is_some_and(|t| t.kind == TypeKind::Resource)
    }

    /// The concrete resource types, sorted.
    pub fn resource_types(&self) -> &[String] {
        &self.resource_types
    }

    pub fn is_primitive(&self, name: &str) -> bool {
        self.type_def(name)
            .is_some_and(|t| t.kind == TypeKind::Primitive)
    }

    /// The base type: `Patient` -> `DomainResource`, `code` -> `string`, `Age` -> `Quantity`.
    pub fn base_of(&self, name: &str) -> Option<&str> {
        self.type_def(name)?.base.as_deref()
    }

    /// Whether `ty` is `base` or derives from it.
    pub fn is_subtype_of(&self, ty: &str, base: &str) -> bool {
        let mut cur = Some(ty);
        while let Some(t) = cur {
            if t == base {
                return true;
            }
            cur = self.base_of(t);
        }
        false
    }

    /// The element a JSON key names in a type, choice elements resolved to their concrete type.
    pub fn child(&self, type_name: &str, json_key: &str) -> Option<ChildRef<'_>> {
        self.type_def(type_name)?.child(json_key)
    }

    /// An element of a type by element name (`value` for `value[x]`).
    pub fn element(&self, type_name: &str, name: &str) -> Option<&ElementDef> {
        self.type_def(type_name)?.element(name)
    }

    /// Whether the element a JSON key names in a type is marked `isSummary` in its base
    /// definition (`Patient`, `birthDate` or `_birthDate`; `Observation`, `valueQuantity`;
    /// `Patient.link`, `other`): the elements `_summary=true` keeps. False for keys the type
    /// does not define.
    pub fn is_summary(&self, type_name: &str, json_key: &str) -> bool {
        let name = json_key.strip_prefix('_').unwrap_or(json_key);
        self.child(type_name, name)
            .is_some_and(|c| c.element.summary)
    }

    /// All search parameters of a resource type, those defined on `Resource` and `DomainResource`
    /// included.
    pub fn search_params(&self, resource_type: &str) -> Vec<&SearchParam> {
        let mut out = Vec::new();
        for base in [resource_type, "DomainResource", "Resource"] {
            if base != resource_type && !self.is_subtype_of(resource_type, base) {
                continue;
            }
            if let Some(params) = self.search.get(base) {
                out.extend(params.values());
            }
            if base == "Resource" && resource_type == "Resource" {
                break;
            }
        }
        out.sort_by(|a, b| a.code.cmp(&b.code));
        out.dedup_by(|a, b| a.code == b.code);
        out
    }

    /// One search parameter of a resource type by code.
    pub fn search_param(&self, resource_type: &str, code: &str) -> Option<&SearchParam> {
        for base in [resource_type, "DomainResource", "Resource"] {
            if base != resource_type && !self.is_subtype_of(resource_type, base) {
                continue;
            }
            if let Some(p) = self.search.get(base).and_then(|m| m.get(code)) {
                return Some(p);
            }
        }
        None
    }

    /// The search parameters that link a resource type to a Patient (R4 Patient
    /// CompartmentDefinition); `None` when the type is not in the Patient compartment.
    /// For `Patient` itself this is `["link"]`: a Patient is in its own compartment by id.
    pub fn patient_compartment(&self, resource_type: &str) -> Option<&[String]> {
        self.compartment.get(resource_type).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_choice_elements() {
        let m = r4();
        let c = m.child("Observation", "valueQuantity").unwrap();
        assert_eq!(c.element.name, "value");
        assert!(c.element.choice);
        assert_eq!(c.type_name, "Quantity");
        let c = m.child("Observation", "effectiveDateTime").unwrap();
        assert_eq!(c.type_name, "dateTime");
        assert!(m.child("Observation", "value").is_none());
        assert!(m.child("Observation", "valueFoo").is_none());
    }

    #[test]
    fn child_tables_find_every_key_and_nothing_else() {
        let m = r4();
        let mut keys = 0;
        for def in &m.types {
            // What the table was built from: every element, choice elements expanded.
            let mut expected: HashMap<String, (String, String)> = HashMap::new();
            for el in &def.elements {
                if el.choice {
                    for ty in &el.types {
                        let key = format!("{}{}", el.name, choice_suffix(ty));
                        expected.insert(key, (el.name.clone(), ty.clone()));
                    }
                } else {
                    expected.insert(el.name.clone(), (el.name.clone(), el.types[0].clone()));
                }
            }
            for (key, (name, ty)) in &expected {
                let c = def
                    .child(key)
                    .unwrap_or_else(|| panic!("{}.{key}", def.name));
                assert_eq!((&c.element.name, c.type_name), (name, ty.as_str()));
                assert_eq!(c.type_index(), m.type_index(ty));
                assert_eq!(
                    m.child_def(c).map(|d| &d.name),
                    m.type_def(ty).map(|d| &d.name)
                );
                keys += 1;
                // Near misses: a byte changed at each end and in the middle, one more or less.
                let mut near = vec![
                    format!("{key}x"),
                    format!("x{key}"),
                    key[..key.len() - 1].to_string(),
                ];
                for at in [0, key.len() / 2, key.len() - 1] {
                    let mut b = key.clone().into_bytes();
                    b[at] ^= 1;
                    near.push(String::from_utf8(b).expect("ascii key"));
                }
                for n in near.iter().filter(|n| !expected.contains_key(*n)) {
                    assert!(def.child(n).is_none(), "{}.{n}", def.name);
                }
            }
            assert!(def.child("").is_none());
            // `children` lists the same keys, each once, with the child `child` finds.
            let listed: Vec<(&str, ChildRef<'_>)> = def.children().collect();
            assert_eq!(listed.len(), expected.len(), "{}", def.name);
            for (key, c) in listed {
                let (name, ty) = &expected[key];
                assert_eq!((&c.element.name, c.type_name), (name, ty.as_str()));
                assert_eq!(c.type_index(), def.child(key).and_then(|c| c.type_index()));
            }
        }
        assert!(keys > 8000, "{keys}");
        // Every length up to 40 on a synthetic table, against a map.
        let names: Vec<String> = (0..40)
            .map(|n| "abcdefghij".repeat(4)[..n].to_string())
            .collect();
        let child = |i: usize| Child {
            element: i as u32,
            ty: 0,
            def: None,
        };
        let t = ChildTable::new(
            names
                .iter()
                .enumerate()
                .skip(1)
                .map(|(i, n)| (n.clone(), child(i)))
                .collect(),
        );
        for (i, n) in names.iter().enumerate() {
            assert_eq!(
                t.get(n).map(|c| c.element),
                (i > 0).then_some(i as u32),
                "{n}"
            );
            let mut other = n.clone().into_bytes();
            if let Some(b) = other.get_mut(n.len() / 2) {
                *b = b'z';
                assert!(t.get(std::str::from_utf8(&other).unwrap()).is_none());
            }
        }
    }

    #[test]
    fn knows_resource_and_primitive_types() {
        let m = r4();
        assert!(m.is_resource("Patient"));
        assert!(m.is_resource("Resource"));
        assert!(!m.resource_types().iter().any(|t| t == "Resource"));
        assert_eq!(m.resource_types().len(), 146);
        assert!(m.is_primitive("dateTime"));
        assert!(m.is_subtype_of("code", "string"));
        assert!(m.is_subtype_of("Age", "Quantity"));
        assert!(m.is_subtype_of("Patient", "Resource"));
        assert!(!m.is_subtype_of("Patient", "Observation"));
        assert_eq!(m.child("Patient", "id").unwrap().type_name, "id");
        assert_eq!(m.child("HumanName", "id").unwrap().type_name, "string");
    }

    #[test]
    fn backbone_and_content_reference() {
        let m = r4();
        let c = m.child("Patient", "contact").unwrap();
        assert_eq!(c.type_name, "Patient.contact");
        assert!(c.element.max_many);
        assert_eq!(
            m.child("Patient.contact", "name").unwrap().type_name,
            "HumanName"
        );
        assert_eq!(
            m.child("Questionnaire.item", "item").unwrap().type_name,
            "Questionnaire.item"
        );
        assert_eq!(
            m.child("Bundle.entry", "resource").unwrap().type_name,
            "Resource"
        );
        assert_eq!(
            m.child("Patient", "contained").unwrap().type_name,
            "Resource"
        );
    }

    #[test]
    fn summary_flags() {
        let m = r4();
        for key in [
            "id",
            "meta",
            "identifier",
            "name",
            "birthDate",
            "_birthDate",
            "deceasedBoolean",
            "link",
        ] {
            assert!(m.is_summary("Patient", key), "Patient.{key}");
        }
        for key in [
            "text",
            "contained",
            "extension",
            "contact",
            "photo",
            // R4 marks a resource's modifierExtension not summary, a backbone's summary.
            "modifierExtension",
            "multipleBirthInteger",
            "nonsense",
        ] {
            assert!(!m.is_summary("Patient", key), "Patient.{key}");
        }
        assert!(m.is_summary("Patient.link", "other"));
        assert!(!m.is_summary("Patient.link", "id"));
        assert!(m.is_summary("Patient.contact", "modifierExtension"));
        assert!(!m.is_summary("Patient.contact", "name"));
        assert!(m.is_summary("Observation", "valueQuantity"));
        assert!(m.is_summary("Quantity", "value"));
        assert!(!m.is_summary("Quantity", "extension"));
        assert!(!m.is_summary("Extension", "url"));
        assert!(!m.is_summary("Narrative", "div"));
        assert!(m.is_summary("Age", "unit"), "inherited from Quantity");
        assert!(!m.is_summary("NoSuchType", "id"));
    }

    #[test]
    fn element_entries_read_with_and_without_the_summary_flag() {
        let text = r#"{"types":[{"n":"T","k":"C","b":null,"a":false,"e":[["a",0,["string"],0,0],["b",0,["string"],1,1,1]]}],"search":[],"compartment":{}}"#;
        let m = Model::from_json(text).unwrap();
        assert!(!m.element("T", "a").unwrap().summary);
        let b = m.element("T", "b").unwrap();
        assert!(b.summary && b.max_many && b.min == 1);
        for bad in [r#"["a",0,["string"],0]"#, r#"["a",0,["string"],0,0,1,9]"#] {
            let text = text.replace(r#"["a",0,["string"],0,0]"#, bad);
            assert!(Model::from_json(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn search_parameters_per_type() {
        let m = r4();
        let code = m.search_param("Observation", "code").unwrap();
        assert_eq!(code.kind, SearchParamType::Token);
        assert_eq!(code.expression.as_deref(), Some("Observation.code"));
        let id = m.search_param("Observation", "_id").unwrap();
        assert_eq!(id.kind, SearchParamType::Token);
        let subject = m.search_param("Observation", "subject").unwrap();
        assert!(subject.targets.iter().any(|t| t == "Patient"));
        assert!(
            m.search_params("Patient")
                .iter()
                .any(|p| p.code == "birthdate")
        );
        assert!(m.search_param("Patient", "nonsense").is_none());
    }

    #[test]
    fn patient_compartment() {
        let m = r4();
        let obs = m.patient_compartment("Observation").unwrap();
        assert!(obs.iter().any(|p| p == "subject"));
        assert!(m.patient_compartment("Organization").is_none());
    }
}

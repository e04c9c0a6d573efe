//! Document nodes: a typed, located view of a FHIR JSON value.

use std::borrow::Cow;
use std::fmt;
use std::rc::Rc;

use crate::quantity::Quantity;
use crate::temporal::Temporal;
use crate::typeinfo::{self, TypeInfo};
use crate::value::{SystemValue, UCUM, parse_decimal};
use serde_json::{Map, Value as Json};

/// One step of a [`NodePath`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Segment {
    /// An object member, by its real JSON key (`valueQuantity`, not `value`).
    Key(String),
    /// An array position.
    Index(usize),
}

/// The location of a node from the root JSON value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct NodePath(pub Vec<Segment>);

impl NodePath {
    pub fn root() -> Self {
        NodePath(Vec::new())
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// The path of the `_name` shadow that belongs to this primitive's position (`_given[1]` for
    /// `given[1]`); `None` for the root.
    pub fn shadow(&self) -> Option<NodePath> {
        let mut segs = self.0.clone();
        let pos = segs.iter().rposition(|s| matches!(s, Segment::Key(_)))?;
        if let Segment::Key(k) = &segs[pos] {
            segs[pos] = Segment::Key(format!("_{k}"));
        }
        Some(NodePath(segs))
    }

    /// The JSON value at this path.
    pub fn get<'v>(&self, root: &'v Json) -> Option<&'v Json> {
        let mut cur = root;
        for s in &self.0 {
            cur = match s {
                Segment::Key(k) => cur.get(k.as_str())?,
                Segment::Index(i) => cur.get(*i)?,
            };
        }
        Some(cur)
    }

    /// Parses the form printed by `Display` (`name[0].given[1]`; empty for the root).
    pub fn parse(s: &str) -> Option<NodePath> {
        let mut segs = Vec::new();
        if s.is_empty() {
            return Some(NodePath(segs));
        }
        for part in s.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if key.is_empty() {
                return None;
            }
            segs.push(Segment::Key(key.to_string()));
            while let Some(r) = rest.strip_prefix('[') {
                let end = r.find(']')?;
                segs.push(Segment::Index(r[..end].parse().ok()?));
                rest = &r[end + 1..];
            }
            if !rest.is_empty() {
                return None;
            }
        }
        Some(NodePath(segs))
    }
}

impl fmt::Display for NodePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.0 {
            match s {
                Segment::Key(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Segment::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// Where a node's parent sits: a persistent chain shared by all children of one parent, so that
/// expanding a node costs one small allocation (leaves none) and a full path is only built when asked.
#[derive(Clone)]
pub(crate) enum Loc<'a> {
    /// Not part of the document (a variable's value).
    Detached,
    Root,
    Child(Rc<Link<'a>>),
}

pub(crate) struct Link<'a> {
    parent: Loc<'a>,
    key: &'a str,
    index: Option<usize>,
    /// The location is a primitive's `_key` shadow object (its children live there).
    shadow: bool,
}

impl<'a> Loc<'a> {
    pub(crate) fn child(&self, key: &'a str, index: Option<usize>, shadow: bool) -> Loc<'a> {
        match self {
            Loc::Detached => Loc::Detached,
            _ => Loc::Child(Rc::new(Link {
                parent: self.clone(),
                key,
                index,
                shadow,
            })),
        }
    }

    fn collect(&self, out: &mut Vec<Segment>) -> bool {
        match self {
            Loc::Detached => false,
            Loc::Root => true,
            Loc::Child(l) => {
                if !l.parent.collect(out) {
                    return false;
                }
                out.push(Segment::Key(if l.shadow {
                    format!("_{}", l.key)
                } else {
                    l.key.to_string()
                }));
                if let Some(i) = l.index {
                    out.push(Segment::Index(i));
                }
                true
            }
        }
    }

    /// Same location (for `distinct` / union of nodes).
    pub(crate) fn same(&self, other: &Loc<'a>) -> bool {
        match (self, other) {
            (Loc::Root, Loc::Root) => true,
            (Loc::Child(a), Loc::Child(b)) => {
                Rc::ptr_eq(a, b)
                    || (a.key == b.key
                        && a.index == b.index
                        && a.shadow == b.shadow
                        && a.parent.same(&b.parent))
            }
            _ => false,
        }
    }
}

/// A node of the document: a JSON value (and, for primitives, its `_name` shadow), its FHIR type
/// and its location.
#[derive(Clone)]
pub struct Node<'a> {
    pub(crate) value: Option<&'a Json>,
    pub(crate) shadow: Option<&'a Json>,
    /// FHIR type name (`HumanName`, `string`, `Patient`, backbone `Patient.contact`); empty when
    /// unknown (data outside the model).
    pub(crate) ty: &'a str,
    /// Navigation entry of `ty` (`None` when untyped or outside the model).
    pub(crate) info: Option<&'static TypeInfo>,
    /// Element name (`value` for `valueQuantity`); empty for roots.
    pub(crate) name: &'a str,
    /// Location of the parent; for the root (or a detached value) its own location.
    pub(crate) parent: Loc<'a>,
    /// JSON key in the parent object; `None` for the root or a detached value.
    pub(crate) key: Option<&'a str>,
    pub(crate) index: Option<usize>,
}

impl fmt::Debug for Node<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("type", &self.ty)
            .field("path", &self.path().map(|p| p.to_string()))
            .field("value", &self.value)
            .finish()
    }
}

impl<'a> Node<'a> {
    /// A resource or typed value at the document root.
    pub fn root(value: &'a Json) -> Node<'a> {
        Node {
            value: Some(value),
            shadow: None,
            ty: resource_type(value).unwrap_or(""),
            info: resource_type(value).and_then(typeinfo::info),
            name: "",
            parent: Loc::Root,
            key: None,
            index: None,
        }
    }

    /// A value that is not part of the evaluated document (has no path). `ty` may be empty:
    /// then a resource's type comes from `resourceType` and primitives are typed by their JSON kind.
    pub fn detached(value: &'a Json, ty: &'a str) -> Node<'a> {
        let ty = if ty.is_empty() {
            resource_type(value).unwrap_or("")
        } else {
            ty
        };
        Node {
            value: Some(value),
            shadow: None,
            ty,
            info: typeinfo::info(ty),
            name: "",
            parent: Loc::Detached,
            key: None,
            index: None,
        }
    }

    /// Finds the node at `path` below `root`, typing it through the R4 model.
    pub fn at_path(root: &'a Json, path: &NodePath) -> Option<Node<'a>> {
        let mut node = Node::root(root);
        let segs = &path.0;
        let mut i = 0;
        while i < segs.len() {
            let Segment::Key(key) = &segs[i] else {
                return None;
            };
            let index = match segs.get(i + 1) {
                Some(Segment::Index(n)) => {
                    i += 1;
                    Some(*n)
                }
                _ => None,
            };
            i += 1;
            let plain = key.strip_prefix('_').unwrap_or(key);
            let found = node.children().into_iter().find_map(|c| match c {
                Item::Node(n) if n.key() == Some(plain) && n.index() == index => Some(n),
                _ => None,
            })?;
            node = found;
        }
        Some(node)
    }

    pub(crate) fn set_type(&mut self, ty: &'a str) {
        self.ty = ty;
        self.info = typeinfo::info(ty);
    }

    /// The JSON value; `None` for a primitive that only has a `_name` shadow (extensions, no value).
    pub fn json(&self) -> Option<&'a Json> {
        self.value
    }

    /// The `_name` shadow object of a primitive (holding `id` / `extension`).
    pub fn shadow(&self) -> Option<&'a Json> {
        self.shadow
    }

    /// The FHIR type name as the model knows it (`HumanName`, `date`, `Patient`, `Patient.contact`);
    /// empty when unknown.
    pub fn fhir_type(&self) -> &'a str {
        self.ty
    }

    /// The type name FHIRPath reports (`BackboneElement` for inline backbone elements).
    pub fn type_name(&self) -> &'a str {
        if self.ty.contains('.') {
            return self
                .info
                .and_then(|i| i.ancestors.get(1).copied())
                .unwrap_or("BackboneElement");
        }
        if self.ty.is_empty() {
            return match self.value {
                Some(Json::String(_)) => "string",
                Some(Json::Bool(_)) => "boolean",
                Some(Json::Number(n)) if is_integer_text(n.as_str()) => "integer",
                Some(Json::Number(_)) => "decimal",
                _ => "",
            };
        }
        self.ty
    }

    /// The element name (`value` for `valueQuantity`).
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The JSON key under which this node sits in its parent object.
    pub fn key(&self) -> Option<&'a str> {
        self.key
    }

    /// The array index, when the element repeats.
    pub fn index(&self) -> Option<usize> {
        self.index
    }

    /// This node's own location, for its children to point at.
    fn self_loc(&self) -> Loc<'a> {
        match self.key {
            None => self.parent.clone(),
            // A primitive's children (id, extension) are in its shadow object.
            Some(k) => self.parent.child(k, self.index, self.is_primitive()),
        }
    }

    /// Location from the document root; `None` for values outside the document.
    pub fn path(&self) -> Option<NodePath> {
        let mut v = Vec::new();
        if !self.parent.collect(&mut v) {
            return None;
        }
        if let Some(k) = self.key {
            v.push(Segment::Key(k.to_string()));
            if let Some(i) = self.index {
                v.push(Segment::Index(i));
            }
        }
        Some(NodePath(v))
    }

    /// Location of the `_name` shadow of a primitive (whether or not it exists in the document).
    pub fn shadow_path(&self) -> Option<NodePath> {
        if self.is_primitive() {
            self.path()?.shadow()
        } else {
            None
        }
    }

    /// True for FHIR primitive values (including a shadow-only primitive).
    pub fn is_primitive(&self) -> bool {
        match self.value {
            Some(Json::Object(_)) | Some(Json::Array(_)) => false,
            Some(_) => true,
            None => self.shadow.is_some(),
        }
    }

    /// True when the node is a resource (root, contained, Bundle entry resource, …).
    pub fn is_resource(&self) -> bool {
        self.info.is_some_and(|i| i.is_resource)
    }

    pub(crate) fn same(&self, other: &Node<'a>) -> bool {
        match (self.value, other.value) {
            (Some(a), Some(b)) => {
                std::ptr::eq(a, b)
                    && self.key == other.key
                    && self.index == other.index
                    && self.parent.same(&other.parent)
            }
            (None, None) => match (self.shadow, other.shadow) {
                (Some(a), Some(b)) => std::ptr::eq(a, b),
                _ => false,
            },
            _ => false,
        }
    }

    /// The object holding this node's children (a primitive's live in its `_name` shadow), with the
    /// navigation entry of its type (`Element` for a primitive; `None` when untyped).
    fn child_map(&self) -> Option<(&'a Map<String, Json>, Option<&'static TypeInfo>)> {
        if self.is_primitive() {
            match self.shadow {
                Some(Json::Object(m)) => Some((m, typeinfo::element())),
                _ => None,
            }
        } else {
            match self.value {
                Some(Json::Object(m)) => Some((m, self.info)),
                _ => None,
            }
        }
    }

    /// Children named `name` (an element name; choice elements resolve to their typed key), pushed
    /// onto `out` in document order.
    pub(crate) fn push_children_named(&self, name: &str, out: &mut Vec<Item<'a>>) {
        let Some((map, info)) = self.child_map() else {
            return;
        };
        let Some(info) = info else {
            // Untyped data: plain member access.
            if let Some((k, v)) = lookup(map, name) {
                let shadow = if may_have_shadow(v) {
                    shadow_of(map, name)
                } else {
                    None
                };
                push_members(out, &self.self_loc(), k, k, "", None, Some(v), shadow);
            } else if let Some((k, v)) = shadow_entry(map, name) {
                push_members(
                    out,
                    &self.self_loc(),
                    &k[1..],
                    &k[1..],
                    "",
                    None,
                    None,
                    Some(v),
                );
            }
            return;
        };
        // Plain elements, and a choice element named by its typed key (`valueDateTime`).
        if let Some(c) = info.children.get(name) {
            let value = lookup(map, name);
            let shadow = if c.primitive {
                shadow_entry(map, name)
            } else {
                None
            };
            match (value, shadow) {
                (Some((k, v)), s) => push_members(
                    out,
                    &self.self_loc(),
                    k,
                    c.name,
                    c.ty,
                    c.info(),
                    Some(v),
                    s.map(|x| x.1),
                ),
                (None, Some((k, s))) => push_members(
                    out,
                    &self.self_loc(),
                    &k[1..],
                    c.name,
                    c.ty,
                    c.info(),
                    None,
                    Some(s),
                ),
                (None, None) => {}
            }
            return;
        }
        if !info.choices.contains_key(name) {
            return;
        }
        for (key, v) in map {
            let plain = key.strip_prefix('_').unwrap_or(key);
            if plain.len() <= name.len() || !plain.starts_with(name) {
                continue;
            }
            let Some(c) = info.children.get(plain) else {
                continue;
            };
            if c.name != name {
                continue;
            }
            if key.starts_with('_') {
                if has_key(map, plain) {
                    continue;
                }
                push_members(
                    out,
                    &self.self_loc(),
                    plain,
                    c.name,
                    c.ty,
                    c.info(),
                    None,
                    Some(v),
                );
            } else {
                let shadow = if c.primitive {
                    shadow_of(map, key)
                } else {
                    None
                };
                push_members(
                    out,
                    &self.self_loc(),
                    key,
                    c.name,
                    c.ty,
                    c.info(),
                    Some(v),
                    shadow,
                );
            }
            return;
        }
    }

    /// Whether `children()` can be non-empty (an object, or a primitive with a shadow object).
    pub(crate) fn has_children(&self) -> bool {
        matches!(self.value, Some(Json::Object(_))) || matches!(self.shadow, Some(Json::Object(_)))
    }

    /// All child nodes in document order (`children()`).
    pub fn children(&self) -> Vec<Item<'a>> {
        let mut out = Vec::new();
        self.push_children(&mut out);
        out
    }

    pub(crate) fn push_children(&self, out: &mut Vec<Item<'a>>) {
        self.push_children_with(out, true);
    }

    /// With `leaves` false, primitive children that have no shadow (so no children of their own)
    /// are left out: walks looking for complex types need not build them.
    pub(crate) fn push_children_with(&self, out: &mut Vec<Item<'a>>, leaves: bool) {
        let Some((map, info)) = self.child_map() else {
            return;
        };
        // Built on the first child pushed: a walk for complex types skips every child of most
        // objects (all primitives), and the location is a reference-counted allocation.
        let mut loc: Option<Loc<'a>> = None;
        // Most objects have no `_name` shadows: then skip looking for them.
        let shadows = map.keys().any(|k| k.starts_with('_'));
        for (key, v) in map {
            // Without shadows, a primitive child has no children: a walk for complex types skips
            // it before looking its key up in the model.
            if !leaves && !shadows && may_have_shadow(v) {
                continue;
            }
            if key == "resourceType" {
                continue;
            }
            if let Some(plain) = key.strip_prefix('_') {
                if has_key(map, plain) {
                    continue;
                }
                let (name, ty, ci) = match info.and_then(|i| i.children.get(plain)) {
                    Some(c) => (c.name, c.ty, c.info()),
                    None => ("", "", None),
                };
                let loc = loc.get_or_insert_with(|| self.self_loc());
                push_members(out, loc, plain, name, ty, ci, None, Some(v));
                continue;
            }
            let (name, ty, ci, shadow) = match info.and_then(|i| i.children.get(key.as_str())) {
                Some(c) => (
                    c.name,
                    c.ty,
                    c.info(),
                    if shadows && c.primitive {
                        shadow_of(map, key)
                    } else {
                        None
                    },
                ),
                None => (
                    "",
                    "",
                    None,
                    if shadows && may_have_shadow(v) {
                        shadow_of(map, key)
                    } else {
                        None
                    },
                ),
            };
            if !leaves && shadow.is_none() && may_have_shadow(v) {
                continue;
            }
            let loc = loc.get_or_insert_with(|| self.self_loc());
            push_members(out, loc, key, name, ty, ci, Some(v), shadow);
        }
    }
}

/// Only primitives (or arrays of them) have `_name` shadows.
fn may_have_shadow(v: &Json) -> bool {
    match v {
        Json::Object(_) => false,
        Json::Array(a) => !a.first().is_some_and(Json::is_object),
        _ => true,
    }
}

/// Below this many members a linear scan beats hashing the key (FHIR objects are mostly small).
const SCAN_LIMIT: usize = 16;

fn lookup<'a>(map: &'a Map<String, Json>, key: &str) -> Option<(&'a String, &'a Json)> {
    if map.len() <= SCAN_LIMIT {
        map.iter().find(|(k, _)| k.as_str() == key)
    } else {
        map.get_key_value(key)
    }
}

fn has_key(map: &Map<String, Json>, key: &str) -> bool {
    lookup(map, key).is_some()
}

/// `map["_" + name]` without allocating.
fn shadow_entry<'a>(map: &'a Map<String, Json>, name: &str) -> Option<(&'a String, &'a Json)> {
    if map.len() <= SCAN_LIMIT {
        return map
            .iter()
            .find(|(k, _)| k.len() == name.len() + 1 && k.starts_with('_') && &k[1..] == name);
    }
    let mut buf = [0u8; 96];
    if name.len() < buf.len() {
        buf[0] = b'_';
        buf[1..=name.len()].copy_from_slice(name.as_bytes());
        let key = std::str::from_utf8(&buf[..=name.len()]).ok()?;
        map.get_key_value(key)
    } else {
        map.get_key_value(format!("_{name}").as_str())
    }
}

fn shadow_of<'a>(map: &'a Map<String, Json>, name: &str) -> Option<&'a Json> {
    shadow_entry(map, name).map(|(_, v)| v)
}

pub(crate) fn resource_type(v: &Json) -> Option<&str> {
    match v {
        Json::Object(m) => lookup(m, "resourceType")?.1.as_str(),
        _ => None,
    }
}

/// Pushes the node(s) of one member: arrays expand to one node per element (pairing each primitive
/// with its shadow at the same index).
// Every argument is a distinct part of the node being built; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
fn push_members<'a>(
    out: &mut Vec<Item<'a>>,
    parent: &Loc<'a>,
    key: &'a str,
    name: &'a str,
    ty: &'a str,
    info: Option<&'static TypeInfo>,
    value: Option<&'a Json>,
    shadow: Option<&'a Json>,
) {
    let name = if name.is_empty() { key } else { name };
    // Elements holding resources take their type from `resourceType`.
    let resolve_ty = |v: Option<&'a Json>| -> (&'a str, Option<&'static TypeInfo>) {
        if (ty == "Resource" || ty.is_empty())
            && let Some(rt) = v.and_then(resource_type)
        {
            return (rt, typeinfo::info(rt));
        }
        (ty, info)
    };
    match value {
        Some(Json::Array(items)) => {
            let shadows = match shadow {
                Some(Json::Array(s)) => Some(s),
                _ => None,
            };
            // The shadow array may be longer than the value array (trailing extension-only values).
            let len = items.len().max(shadows.map_or(0, |s| s.len()));
            for i in 0..len {
                let v = items.get(i).filter(|v| !v.is_null());
                let sh = shadows.and_then(|s| s.get(i)).filter(|s| !s.is_null());
                if v.is_none() && sh.is_none() {
                    continue;
                }
                let (ty, info) = resolve_ty(v);
                out.push(Item::Node(Node {
                    value: v,
                    shadow: sh,
                    ty,
                    info,
                    name,
                    parent: parent.clone(),
                    key: Some(key),
                    index: Some(i),
                }));
            }
        }
        Some(Json::Null) | None => match shadow {
            Some(Json::Array(s)) => {
                for (i, sh) in s.iter().enumerate() {
                    if sh.is_null() {
                        continue;
                    }
                    out.push(Item::Node(Node {
                        value: None,
                        shadow: Some(sh),
                        ty,
                        info,
                        name,
                        parent: parent.clone(),
                        key: Some(key),
                        index: Some(i),
                    }));
                }
            }
            Some(sh @ Json::Object(_)) => out.push(Item::Node(Node {
                value: None,
                shadow: Some(sh),
                ty,
                info,
                name,
                parent: parent.clone(),
                key: Some(key),
                index: None,
            })),
            _ => {}
        },
        Some(v) => out.push(Item::Node(Node {
            value: Some(v),
            shadow: shadow.filter(|s| s.is_object()),
            ty: resolve_ty(Some(v)).0,
            info: resolve_ty(Some(v)).1,
            name,
            parent: parent.clone(),
            key: Some(key),
            index: None,
        })),
    }
}

pub(crate) fn is_integer_text(s: &str) -> bool {
    !s.contains(['.', 'e', 'E'])
}

/// One element of a FHIRPath result collection.
#[derive(Debug, Clone)]
pub enum Item<'a> {
    /// A node of the evaluated document (or of a variable's JSON value).
    Node(Node<'a>),
    /// A computed value (literal, arithmetic, function result); it has no location.
    Value(SystemValue<'a>),
}

impl<'a> Item<'a> {
    pub fn from_value(v: SystemValue<'a>) -> Self {
        Item::Value(v)
    }

    pub(crate) fn boolean(b: bool) -> Self {
        Item::Value(SystemValue::Boolean(b))
    }

    pub(crate) fn string(s: impl Into<Cow<'a, str>>) -> Self {
        Item::Value(SystemValue::String(s.into()))
    }

    /// The node, when this item is part of a document.
    pub fn as_node(&self) -> Option<&Node<'a>> {
        match self {
            Item::Node(n) => Some(n),
            Item::Value(_) => None,
        }
    }

    /// Location in the document; `None` for computed values and detached nodes.
    pub fn path(&self) -> Option<NodePath> {
        self.as_node()?.path()
    }

    /// Location of a primitive's `_name` shadow.
    pub fn shadow_path(&self) -> Option<NodePath> {
        self.as_node()?.shadow_path()
    }

    /// The type name: the FHIR type for nodes (`HumanName`, `dateTime`), the System type for values.
    pub fn type_name(&self) -> &str {
        match self {
            Item::Node(n) => n.type_name(),
            Item::Value(v) => v.type_name(),
        }
    }

    /// `FHIR` for nodes, `System` for computed values.
    pub fn namespace(&self) -> &'static str {
        match self {
            Item::Node(n) if !n.ty.is_empty() => "FHIR",
            Item::Node(_) => "System",
            Item::Value(_) => "System",
        }
    }

    /// JSON form: FHIR JSON for complex nodes, the JSON primitive for primitive nodes, strings for
    /// dates and times.
    pub fn as_json(&self) -> Json {
        match self {
            Item::Node(n) => match n.value {
                Some(v) => v.clone(),
                None => Json::Null,
            },
            Item::Value(v) => v.to_json(),
        }
    }

    /// The System value of a primitive (FHIR primitives map to System types) or of a Quantity node.
    pub fn to_system(&self) -> Option<SystemValue<'a>> {
        match self {
            Item::Value(v) => Some(v.clone()),
            Item::Node(n) => node_system_value(n),
        }
    }

    /// Children of a node (`children()`); computed values have none.
    pub fn children(&self) -> Vec<Item<'a>> {
        match self {
            Item::Node(n) => n.children(),
            Item::Value(_) => Vec::new(),
        }
    }
}

/// The System value of a FHIR primitive node, typed by its FHIR type (or by its JSON kind when
/// untyped), or of a Quantity-typed complex node.
pub(crate) fn node_system_value<'a>(n: &Node<'a>) -> Option<SystemValue<'a>> {
    let v = n.value?;
    let ty = n.ty;
    match v {
        Json::String(s) => {
            let s: &'a str = s.as_str();
            Some(match ty {
                "date" => SystemValue::Date(Temporal::parse_date(s)?),
                "dateTime" | "instant" => SystemValue::DateTime(Temporal::parse_datetime(s)?),
                "time" => SystemValue::Time(Temporal::parse_time(s)?),
                "integer" | "positiveInt" | "unsignedInt" => SystemValue::Integer(s.parse().ok()?),
                "decimal" => SystemValue::Decimal(s.parse().ok()?),
                "boolean" => SystemValue::Boolean(s.parse().ok()?),
                _ => SystemValue::String(Cow::Borrowed(s)),
            })
        }
        Json::Bool(b) => Some(SystemValue::Boolean(*b)),
        Json::Number(num) => {
            let text = num.as_str();
            if ty == "decimal" || (ty.is_empty() && !is_integer_text(text)) {
                Some(SystemValue::Decimal(parse_decimal(text)?))
            } else {
                match text.parse::<i64>() {
                    Ok(i) => Some(SystemValue::Integer(i)),
                    Err(_) => Some(SystemValue::Decimal(parse_decimal(text)?)),
                }
            }
        }
        Json::Object(m) => {
            if !quantity_like(n, m) {
                return None;
            }
            let value = match m.get("value")? {
                Json::Number(num) => parse_decimal(num.as_str())?,
                _ => return None,
            };
            Some(SystemValue::Quantity(Quantity::new(
                value,
                fhir_quantity_unit(m),
            )))
        }
        _ => None,
    }
}

/// Whether a complex node is read as a Quantity: typed as one (or a profile of one), or untyped
/// with a value and a unit.
fn quantity_like(n: &Node<'_>, m: &serde_json::Map<String, Json>) -> bool {
    n.info.is_some_and(|i| i.is_a("Quantity"))
        || (n.ty.is_empty()
            && m.contains_key("value")
            && (m.contains_key("unit") || m.contains_key("code")))
}

/// Whether the node is a number, or a Quantity whose value is a number, that no Decimal holds
/// (beyond about ±7.9e28). FHIRPath's Decimal has 28 significant digits, so such a number has no
/// FHIRPath value: the evaluator treats it as empty, like a primitive with only extensions,
/// rather than as a complex value that comparisons reject (which would fail a whole view run
/// over one resource). The JSON itself is still there for outputs that copy it.
pub(crate) fn number_out_of_range(n: &Node<'_>) -> bool {
    let number = match n.value {
        Some(Json::Number(num)) => num,
        Some(Json::Object(m)) if quantity_like(n, m) => match m.get("value") {
            Some(Json::Number(num)) => num,
            _ => return false,
        },
        _ => return false,
    };
    let text = number.as_str();
    text.parse::<i64>().is_err() && parse_decimal(text).is_none()
}

/// The unit a FHIR Quantity contributes: the UCUM code when coded in UCUM (calendar-like UCUM codes
/// for years/months stay UCUM), otherwise the unit text, mapped to a calendar keyword when it is one.
fn fhir_quantity_unit(m: &serde_json::Map<String, Json>) -> String {
    let system = m.get("system").and_then(Json::as_str);
    let code = m.get("code").and_then(Json::as_str);
    let unit = m.get("unit").and_then(Json::as_str);
    if let (Some(UCUM), Some(c)) = (system, code) {
        return c.to_string();
    }
    if let Some(u) = unit {
        if let Some(cal) = crate::quantity::calendar_unit(u) {
            return cal.to_string();
        }
        return u.to_string();
    }
    code.unwrap_or("1").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A number beyond Decimal's range made its node a "complex value", and comparing it failed
    /// the whole evaluation (a whole view run, for one resource). It is now empty; its JSON stays.
    #[test]
    fn numbers_beyond_decimal_are_empty_not_errors() {
        let doc: Json = serde_json::from_str(
            r#"{"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                "valueQuantity": {"value": 1e300, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"},
                "component": [{"code": {"text": "y"}, "valueQuantity": {"value": 1e-33}}]}"#,
        )
        .unwrap();
        let run = |src: &str| crate::eval::probe::run(&doc, src, crate::eval::BUDGET).0;
        for src in [
            "value > 5 'mg'",
            "valueQuantity.value > 5",
            "valueQuantity.value + 1",
            "valueQuantity.value.max()",
        ] {
            assert_eq!(run(src), Ok(Vec::new()), "{src}");
        }
        assert_eq!(run("valueQuantity.value.exists()"), Ok(vec![json!(true)]));
        // Equality compares the items themselves, as for a primitive with only extensions.
        assert_eq!(run("valueQuantity.value = 5"), Ok(vec![json!(false)]));
        let value = run("valueQuantity.value").unwrap();
        assert_eq!(value.len(), 1);
        assert_eq!(value[0].as_f64(), Some(1e300));
        assert_eq!(
            run("valueQuantity.value.combine(2).sort().last()"),
            Ok(vec![json!(2)])
        );
        // Below Decimal's 28 decimal places a value rounds to 0 (FHIRPath's Decimal precision).
        assert_eq!(run("component.value.value = 0"), Ok(vec![json!(true)]));
    }

    #[test]
    fn path_roundtrip() {
        let p = NodePath::parse("name[0].given[1]").unwrap();
        assert_eq!(p.to_string(), "name[0].given[1]");
        assert_eq!(p.shadow().unwrap().to_string(), "name[0]._given[1]");
    }

    #[test]
    fn choice_and_shadow() {
        let doc = json!({"resourceType":"Observation","valueQuantity":{"value":1},
            "status":"final","_status":{"id":"x"}});
        let root = Node::root(&doc);
        let mut out = Vec::new();
        root.push_children_named("value", &mut out);
        let Item::Node(n) = &out[0] else { panic!() };
        assert_eq!(n.fhir_type(), "Quantity");
        assert_eq!(n.path().unwrap().to_string(), "valueQuantity");
        out.clear();
        root.push_children_named("status", &mut out);
        let Item::Node(n) = &out[0] else { panic!() };
        assert!(n.shadow().is_some());
        assert_eq!(n.shadow_path().unwrap().to_string(), "_status");
        let at = Node::at_path(&doc, &NodePath::parse("valueQuantity").unwrap()).unwrap();
        assert_eq!(at.fhir_type(), "Quantity");
    }
}

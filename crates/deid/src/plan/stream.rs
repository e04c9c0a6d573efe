//! The compiled plan's walk over a resource's JSON bytes (issue 24): no `serde_json::Value`
//! tree. Untouched tokens are copied, the values a rule changes are rewritten in place, and the
//! output is exactly what the tree path (parse, [`Walk`](super::Walk), labels, cleanup,
//! serialisation) would write for the same input — or the stream gives up and the tree path
//! runs instead.
//!
//! The walk itself is the tree walk's: the same [`Scope`]s, [`Walk::cover`],
//! [`Walk::child_scopes`] and [`Walk::change`], called in the same order (document order, the
//! root `id` first), so rule hits, date-shift prefixes and labels come out the same. What the
//! tree path does around the walk is done inline:
//! - the shape pass: a key outside the model, a `_x` shadow, a repeated key, a `resourceType`
//!   anywhere but first in a resource, an object where the model has a primitive type, an array
//!   inside an array: give up (the tree path validates, or keeps the odd JSON as it is);
//!   a repeating element written as a single value is written as a one-element array;
//! - cleanup (§3.7): strings are trimmed; `null`, emptied objects (not resources) and emptied
//!   arrays are left out (each member is written, then cut off again if nothing remained);
//! - the security labels: a resource's `meta` (written while streaming, before the resource's
//!   operations are all known) is read back and replaced through [`add_labels`] once the
//!   resource ends; a `meta` left without a member, or an empty or `null` member inside it
//!   (where [`add_labels`] would see what cleanup later removes): give up;
//! - serialisation: only compact JSON in `serde_json`'s own form is copied (no whitespace
//!   between tokens, strings without escapes; a string with escapes is decoded and written
//!   again by `serde_json`), numbers keep their text (`arbitrary_precision`).
//!
//! Rule errors also give up: the tree path reports them, with its own wording.
//!
//! In one scope (no nested resource around the node, the common case) a key is looked up in
//! its type's [`MemberTable`]: the model's child and the rules that depend only on the key and
//! the type in one entry ([`Walk::member_leaf_cover`], [`Walk::enter_member`] compute what
//! [`Walk::leaf_cover`] and [`Walk::enter`] would).

use std::borrow::Cow;

use serde_json::{Map, Value as Json};
use smallvec::SmallVec;

use super::{Cover, Member, MemberTable, NodeCx, Plan, Scope, ScopeOps, Walk};
use crate::methods::{Change, add_labels, label_objects, requote_instant};
use crate::typing::declared_def;

/// The stream cannot decide: the tree path runs instead.
struct GiveUp;

type R<T> = Result<T, GiveUp>;

/// Deeper than this (objects and arrays) gives up (`serde_json` refuses 128 levels; FHIR rarely
/// goes past 20).
const MAX_DEPTH: u32 = 100;

/// Anonymizes the resource `input` (compact JSON) into `out` through the compiled plan without
/// a JSON tree. `false`: not done (`out` as it was, `walk` to be discarded) — the tree path must
/// decide.
pub(crate) fn stream(plan: &Plan, walk: &mut Walk<'_>, input: &[u8], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let Ok(text) = std::str::from_utf8(input) else {
        return false;
    };
    let mut st = Streamer {
        s: text,
        b: input,
        pos: 0,
        out,
        plan,
        walk,
        depth: 0,
        metas: SmallVec::new(),
        in_meta: None,
        root_id: None,
    };
    let done = st.root().is_ok();
    if !done {
        st.out.truncate(start);
    }
    done
}

/// A resource's `meta` member as written to the output.
#[derive(Default)]
struct MetaSlot {
    /// The value's range in the output.
    value: Option<(usize, usize)>,
    /// The resource has a `meta` member (written or not).
    seen: bool,
    /// Something inside it was left out (cleanup's work), or it was left out itself.
    dropped: bool,
    /// The output range of its `lastUpdated` string's text (without the quotes) when it has
    /// no escapes, and whether it has other members the direct labels must look at
    /// (`security`, or a `lastUpdated` that is not such a string).
    last_updated: Option<(usize, usize)>,
    complex: bool,
}

/// A scanned primitive token.
enum Prim<'a> {
    /// A string: its text between the quotes, and whether it has escapes.
    Str(&'a str, bool),
    /// A number's text, or `true` / `false`.
    Raw(&'a str),
}

struct Streamer<'a, 'p, 'e> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
    out: &'a mut Vec<u8>,
    plan: &'p Plan,
    walk: &'a mut Walk<'e>,
    depth: u32,
    /// Per resource object being streamed, innermost last.
    metas: SmallVec<[MetaSlot; 2]>,
    /// The index in `metas` of the resource whose `meta` is being streamed.
    in_meta: Option<usize>,
    /// The root `id`'s text after its rule (the tree's `obj.get("id")` after the id is walked).
    root_id: Option<String>,
}

impl<'a, 'p> Streamer<'a, 'p, '_> {
    fn peek(&self) -> R<u8> {
        self.b.get(self.pos).copied().ok_or(GiveUp)
    }

    fn expect(&mut self, c: u8) -> R<()> {
        if self.peek()? != c {
            return Err(GiveUp);
        }
        self.pos += 1;
        Ok(())
    }

    /// A string token at `pos`: its content (between the quotes) and whether it has escapes.
    /// Raw control characters (which JSON forbids) give up.
    #[inline(always)]
    fn string(&mut self) -> R<(&'a str, bool)> {
        self.expect(b'"')?;
        let start = self.pos;
        let b = self.b;
        let mut escaped = false;
        let mut i = start;
        loop {
            // The next quote, backslash or control character: eight bytes at a time (the
            // lowest flagged byte of a word is exact), byte by byte in the input's last 7.
            let c = if let Some(word) = b.get(i..).and_then(|r| r.first_chunk::<8>()) {
                let w = u64::from_le_bytes(*word);
                let m = special_word(w);
                if m == 0 {
                    i += 8;
                    continue;
                }
                let bit = m.trailing_zeros();
                i += (bit / 8) as usize;
                // The byte itself, from the word (not loaded again).
                (w >> (bit & !7)) as u8
            } else {
                while b.get(i).is_some_and(|&c| !special(c)) {
                    i += 1;
                }
                *b.get(i).ok_or(GiveUp)?
            };
            match c {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    i += 2;
                }
                _ => return Err(GiveUp),
            }
        }
        self.pos = i + 1;
        // Quotes are ASCII: `start` and `i` are character boundaries.
        Ok((self.s.get(start..i).ok_or(GiveUp)?, escaped))
    }

    /// A number token at `pos` (JSON's grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`).
    fn number(&mut self) -> R<&'a str> {
        let b = self.b;
        let start = self.pos;
        let mut i = start;
        let digits = |i: &mut usize| {
            let from = *i;
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i > from
        };
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => return Err(GiveUp),
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            if !digits(&mut i) {
                return Err(GiveUp);
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if !digits(&mut i) {
                return Err(GiveUp);
            }
        }
        self.pos = i;
        Ok(&self.s[start..i])
    }

    fn literal(&mut self, lit: &'static str) -> R<&'static str> {
        if !self.b[self.pos..].starts_with(lit.as_bytes()) {
            return Err(GiveUp);
        }
        self.pos += lit.len();
        Ok(lit)
    }

    /// A primitive token (string, number, `true`, `false`) at `pos`.
    fn primitive_token(&mut self) -> R<Prim<'a>> {
        Ok(match self.peek()? {
            b'"' => {
                let (t, e) = self.string()?;
                Prim::Str(t, e)
            }
            b't' => Prim::Raw(self.literal("true")?),
            b'f' => Prim::Raw(self.literal("false")?),
            b'-' | b'0'..=b'9' => Prim::Raw(self.number()?),
            _ => return Err(GiveUp),
        })
    }

    /// Notes that cleanup left something out (inside a resource's `meta`, the labels care).
    fn dropped(&mut self) {
        if let Some(m) = self.in_meta {
            self.metas[m].dropped = true;
        }
    }

    /// A resource's first member, `"resourceType":"T"` (after its `{`): the type's name.
    fn type_member(&mut self) -> R<&'a str> {
        let (key, esc) = self.string()?;
        if esc || key != "resourceType" {
            return Err(GiveUp);
        }
        self.expect(b':')?;
        let (ty, esc) = self.string()?;
        if esc {
            return Err(GiveUp);
        }
        Ok(ty)
    }

    fn root(&mut self) -> R<()> {
        self.expect(b'{')?;
        let ty = self.type_member()?;
        let plan = self.plan;
        let tp = plan.types.get(ty).filter(|tp| tp.stream).ok_or(GiveUp)?;
        let def = tp.def.ok_or(GiveUp)?;
        self.out.extend_from_slice(&self.b[..self.pos]);
        self.walk.ops.push(ScopeOps {
            ops: 0,
            contained: false,
            patient_offset: None,
        });
        let scopes = [Scope::resource(tp, 0)];
        let name = def.name.as_str();
        let cx = NodeCx {
            name,
            ty: name,
            def: Some(def),
            ty_ix: tp.ix,
            parent_ty: "",
            is_resource: true,
        };
        self.node(&cx, &scopes, true, true)?;
        if self.pos != self.b.len() {
            return Err(GiveUp);
        }
        Ok(())
    }

    /// One node (not an array, not `null`) at `pos`; `opened`: a resource object whose `{` and
    /// `resourceType` member are already read and written. Whether anything was written.
    fn node(
        &mut self,
        cx: &NodeCx<'_>,
        scopes: &[Scope<'p>],
        opened: bool,
        is_root: bool,
    ) -> R<bool> {
        let cover = self.walk.cover(scopes, None);
        if opened || self.peek()? == b'{' {
            if let Some((_, r)) = cover {
                // A rule on an object changes nothing itself (its children inherit it).
                self.walk.hits[r as usize] += 1;
                if self.walk.at_root_id {
                    self.walk.id_rule = Some(r);
                }
            }
            return self.object(cx, scopes, cover, opened, is_root);
        }
        self.primitive(cx, scopes, cover)
    }

    fn primitive(
        &mut self,
        cx: &NodeCx<'_>,
        scopes: &[Scope<'p>],
        cover: Option<Cover>,
    ) -> R<bool> {
        let tok_start = self.pos;
        let tok = self.primitive_token()?;
        let text: Cow<'a, str> = match tok {
            Prim::Str(t, false) => Cow::Borrowed(t),
            Prim::Str(t, true) => Cow::Owned(decode(t)?),
            Prim::Raw("true") => Cow::Borrowed("True"),
            Prim::Raw("false") => Cow::Borrowed("False"),
            Prim::Raw(t) => Cow::Borrowed(t),
        };
        let at_root_id = self.walk.at_root_id;
        if at_root_id {
            self.walk.original_id = text.to_string();
            self.walk.current_id.clone_from(&self.walk.original_id);
        }
        if let Some((s, r)) = cover {
            self.walk.hits[r as usize] += 1;
            if at_root_id {
                self.walk.id_rule = Some(r);
            }
            // Matched where it lies (not moved through `map_err` first: its fields were just
            // stored one by one, and reading them back as one wide copy stalled).
            match self.walk.change(&text, cx, scopes, s, r) {
                Err(_) => return Err(GiveUp),
                Ok(None) => {}
                Ok(Some((change, ops))) => {
                    self.walk.ops[scopes[s].ops_ix()].ops |= ops;
                    match change {
                        Change::Keep => {}
                        Change::Remove => {
                            if at_root_id {
                                self.root_id = Some(String::new());
                            }
                            self.dropped();
                            return Ok(false);
                        }
                        Change::Set(Json::String(v)) => {
                            self.write_str(&v);
                            if at_root_id {
                                self.root_id = Some(v);
                            }
                            return Ok(true);
                        }
                        Change::Set(other) => {
                            serde_json::to_writer(&mut *self.out, &other).map_err(|_| GiveUp)?;
                            return Ok(true);
                        }
                    }
                }
            }
        }
        if at_root_id {
            self.root_id = Some(text.to_string());
        }
        match tok {
            // The string with its quotes as the input has it, in one copy.
            Prim::Str(t, false) if !edge_space(t) => {
                self.out.extend_from_slice(&self.b[tok_start..self.pos]);
            }
            Prim::Str(..) => self.write_str(&text),
            Prim::Raw(t) => self.out.extend_from_slice(t.as_bytes()),
        }
        Ok(true)
    }

    /// A string value as cleanup (trimmed) and `serde_json` (escaped) leave it.
    fn write_str(&mut self, v: &str) {
        let t = v.trim();
        if t.len() != v.len() {
            self.dropped();
        }
        // Without an early exit the check vectorises (these are mostly 64-character hashes
        // and dates, which need no escape).
        let plain = !t.bytes().fold(false, |bad, c| {
            bad | (c < 0x20) | (c == b'"') | (c == b'\\')
        });
        if plain {
            self.out.reserve(t.len() + 2);
            self.out.push(b'"');
            self.out.extend_from_slice(t.as_bytes());
            self.out.push(b'"');
        } else {
            // Writing a `str` into a `Vec` cannot fail.
            let _ = serde_json::to_writer(&mut *self.out, t);
        }
    }

    /// An object's members; `opened`: its `{` and `resourceType` member are already handled.
    fn object(
        &mut self,
        cx: &NodeCx<'_>,
        scopes: &[Scope<'p>],
        cover: Option<Cover>,
        opened: bool,
        is_root: bool,
    ) -> R<bool> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(GiveUp);
        }
        // An object of a primitive type, or of a type the model lacks: the tree path decides.
        let def = cx.def.ok_or(GiveUp)?;
        let start = self.out.len();
        if !opened {
            self.expect(b'{')?;
            self.out.push(b'{');
        }
        if cx.is_resource {
            self.metas.push(MetaSlot::default());
        }
        // Something written (a resource has written its `resourceType`).
        let mut any = opened;
        // In one scope (no nested resource around), keys are looked up in the type's member
        // table under the scope's `nodesByType` entries.
        let table: Option<&'p MemberTable> = match (scopes, cx.ty_ix) {
            ([sc], Some(ix)) => sc.plan.by_type.members(def, ix),
            _ => None,
        };
        // Keys seen, by element and type (a choice element's keys differ in type); through the
        // table, by member index (a bit each for the first 128).
        let mut seen: SmallVec<[(usize, usize); 16]> = SmallVec::new();
        let mut seen_bits = 0u128;
        let mut index = 0usize;
        loop {
            let c = self.peek()?;
            if c == b'}' {
                self.pos += 1;
                break;
            }
            if index > 0 || opened {
                if c != b',' {
                    return Err(GiveUp);
                }
                self.pos += 1;
            }
            let key_start = self.pos;
            let (key, esc) = self.string()?;
            self.expect(b':')?;
            if esc || key.starts_with('_') || key == "resourceType" {
                return Err(GiveUp);
            }
            let (child, fast) = match table {
                Some(t) => {
                    let (i, m) = t.get(key).ok_or(GiveUp)?;
                    if i < 128 {
                        let bit = 1u128 << i;
                        if seen_bits & bit != 0 {
                            return Err(GiveUp);
                        }
                        seen_bits |= bit;
                    } else {
                        let id = (i, 0);
                        if seen.contains(&id) {
                            return Err(GiveUp);
                        }
                        seen.push(id);
                    }
                    (m.child(), Some(m))
                }
                None => {
                    let child = def.child(key).ok_or(GiveUp)?;
                    let id = (
                        child.element as *const _ as usize,
                        child.type_name.as_ptr() as usize,
                    );
                    if seen.contains(&id) {
                        return Err(GiveUp);
                    }
                    seen.push(id);
                    (child, None)
                }
            };
            let root_id = is_root && key == "id";
            if root_id {
                // Date shifts read the root id as the rules before them left it: the stream
                // takes the id only first, and only a string (the tree walks any other value
                // whole, as one node).
                if index > 0 || self.peek()? != b'"' {
                    return Err(GiveUp);
                }
                self.walk.at_root_id = true;
                self.root_id = None;
            }
            index += 1;
            let member = self.out.len();
            if any {
                self.out.push(b',');
            }
            // `"key":` as the input has it (no escapes, no whitespace), in one copy.
            self.out.extend_from_slice(&self.b[key_start..self.pos]);
            let meta = cx.is_resource && key == "meta";
            let outer_meta = self.in_meta;
            let value_start = self.out.len();
            if meta {
                if self.peek()? != b'{' {
                    return Err(GiveUp);
                }
                let m = self.metas.len() - 1;
                self.metas[m].seen = true;
                self.in_meta = Some(m);
            }
            // A direct member of a resource's `meta`: what the direct labels need to know.
            let meta_member = self
                .in_meta
                .filter(|_| cx.name == "meta" && cx.ty == "Meta");
            let written = self.member(child, fast, cx, scopes, cover)?;
            if let Some(m) = meta_member {
                let slot = &mut self.metas[m];
                match key {
                    "lastUpdated" => {
                        let v = &self.out[value_start..];
                        let plain = v.len() >= 2
                            && v[0] == b'"'
                            && v[v.len() - 1] == b'"'
                            && !v.contains(&b'\\');
                        if written && plain {
                            slot.last_updated = Some((value_start + 1, self.out.len() - 1));
                        } else {
                            slot.complex = true;
                        }
                    }
                    "security" => slot.complex = true,
                    _ => {}
                }
            }
            if meta {
                let m = self.metas.len() - 1;
                if written {
                    self.metas[m].value = Some((value_start, self.out.len()));
                } else {
                    self.metas[m].dropped = true;
                }
                self.in_meta = outer_meta;
            }
            if written {
                any = true;
            } else {
                self.out.truncate(member);
                self.dropped();
            }
            if root_id {
                self.walk.at_root_id = false;
                self.walk.current_id = self.root_id.take().unwrap_or_default();
                self.walk.offsets[1].set(None);
            }
        }
        if cx.is_resource {
            self.labels(scopes)?;
            self.metas.pop();
        }
        self.out.push(b'}');
        self.depth -= 1;
        if !any && !cx.is_resource {
            self.out.truncate(start);
            return Ok(false);
        }
        Ok(true)
    }

    /// A resource's security labels, as the tree walk adds them once its subtree is walked.
    fn labels(&mut self, scopes: &[Scope<'p>]) -> R<()> {
        let Some(own) = scopes.last().filter(|s| s.depth == 0) else {
            return Ok(());
        };
        if self.walk.ops[own.ops_ix()].contained {
            return Ok(());
        }
        let all = self.walk.ops[own.ops_ix()..]
            .iter()
            .fold(0u8, |a, o| a | o.ops);
        if all == 0 {
            return Ok(());
        }
        let slot = self.metas.last().ok_or(GiveUp)?;
        if !slot.complex && !slot.dropped {
            // What `add_labels` does to a `meta` without `security` (or to none), written
            // directly: `lastUpdated` requoted, the labels appended.
            let mut labels = Vec::with_capacity(256);
            labels.extend_from_slice(if slot.seen {
                &b",\"security\":["[..]
            } else {
                &b",\"meta\":{\"security\":["[..]
            });
            for (bit, json) in LABEL_JSON.iter() {
                if all & bit != 0 {
                    if labels.last() != Some(&b'[') {
                        labels.push(b',');
                    }
                    labels.extend_from_slice(json.as_bytes());
                }
            }
            labels.push(b']');
            match (slot.seen, slot.value) {
                (false, _) => {
                    labels.push(b'}');
                    self.out.extend_from_slice(&labels);
                }
                (true, Some((_, end))) => {
                    // Before the `}` closing `meta`; then `lastUpdated`, which comes earlier.
                    replace(self.out, end - 1..end - 1, &labels);
                    if let Some((a, b)) = slot.last_updated {
                        let text = std::str::from_utf8(&self.out[a..b]).map_err(|_| GiveUp)?;
                        let requoted = requote_instant(text);
                        if requoted != text {
                            replace(self.out, a..b, requoted.as_bytes());
                        }
                    }
                }
                (true, None) => return Err(GiveUp),
            }
            return Ok(());
        }
        let mut obj = Map::new();
        let range = match (slot.seen, slot.value) {
            (false, _) => None,
            (true, Some(range)) if !slot.dropped => {
                let meta: Json =
                    serde_json::from_slice(&self.out[range.0..range.1]).map_err(|_| GiveUp)?;
                obj.insert("meta".into(), meta);
                Some(range)
            }
            // What cleanup removed inside `meta` the tree's labels would still have seen.
            _ => return Err(GiveUp),
        };
        add_labels(&mut obj, all);
        let meta = obj.get("meta").ok_or(GiveUp)?;
        let bytes = serde_json::to_vec(meta).map_err(|_| GiveUp)?;
        match range {
            Some((from, to)) => replace(self.out, from..to, &bytes),
            // A resource always has its `resourceType` written: a member precedes.
            None => {
                self.out.extend_from_slice(b",\"meta\":");
                self.out.extend_from_slice(&bytes);
            }
        }
        Ok(())
    }

    /// A member's value at `pos` (after the key): `null`, an array of items, or one item (as a
    /// one-element array when the element repeats). Whether anything was written.
    fn member(
        &mut self,
        child: fhir_model::ChildRef<'static>,
        fast: Option<&Member>,
        parent: &NodeCx<'_>,
        scopes: &[Scope<'p>],
        cover: Option<Cover>,
    ) -> R<bool> {
        match self.peek()? {
            b'n' => {
                self.literal("null")?;
                Ok(false)
            }
            b'[' => {
                // Arrays count toward the depth as objects do (`serde_json`'s limit counts both):
                // the stream writes only what the tree path can parse.
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(GiveUp);
                }
                self.pos += 1;
                self.out.push(b'[');
                let mut any = false;
                let mut index = 0usize;
                loop {
                    let c = self.peek()?;
                    if c == b']' {
                        self.pos += 1;
                        break;
                    }
                    if index > 0 {
                        if c != b',' {
                            return Err(GiveUp);
                        }
                        self.pos += 1;
                    }
                    index += 1;
                    match self.peek()? {
                        b'n' => {
                            self.literal("null")?;
                            self.dropped();
                            continue;
                        }
                        // Arrays in arrays are not FHIR; cleanup leaves them as they are.
                        b'[' => return Err(GiveUp),
                        _ => {}
                    }
                    let item = self.out.len();
                    if any {
                        self.out.push(b',');
                    }
                    if self.child(child, fast, parent, scopes, cover)? {
                        any = true;
                    } else {
                        self.out.truncate(item);
                        self.dropped();
                    }
                }
                self.out.push(b']');
                self.depth -= 1;
                Ok(any)
            }
            _ if fast.map_or(child.element.max_many, |m| m.max_many) => {
                // The tree path's shape pass makes it a one-element array.
                self.out.push(b'[');
                let written = self.child(child, fast, parent, scopes, cover)?;
                self.out.push(b']');
                Ok(written)
            }
            _ => self.child(child, fast, parent, scopes, cover),
        }
    }

    /// `Walk::child` over the bytes: one item (not `null`, not an array) of element `child`;
    /// `fast`: its member in the parent's [`MemberTable`] (the parent walked in one scope).
    fn child(
        &mut self,
        child: fhir_model::ChildRef<'static>,
        fast: Option<&Member>,
        parent: &NodeCx<'_>,
        scopes: &[Scope<'p>],
        cover: Option<Cover>,
    ) -> R<bool> {
        if let (Some(m), [sc]) = (fast, scopes)
            && m.declared
                .is_none_or(|d| d.kind != fhir_model::TypeKind::Resource)
        {
            if m.declared.is_none() {
                // A leaf, as below.
                if self.peek()? == b'{' {
                    return Err(GiveUp);
                }
                let cover = Walk::member_leaf_cover(sc, cover, parent.is_resource, m);
                let cx = NodeCx {
                    name: m.name,
                    ty: child.type_name,
                    def: None,
                    ty_ix: None,
                    parent_ty: parent.ty,
                    is_resource: false,
                };
                return self.primitive(&cx, scopes, cover);
            }
            let mut cs = super::Scopes::new();
            let cx = Walk::enter_member(sc, cover, parent, m, &mut cs);
            return self.node(&cx, &cs, false, false);
        }
        let declared = declared_def(child);
        if declared.is_none() {
            // A primitive (or a type the model lacks: an object of it gives up, as in
            // `object`): a leaf, covered without building scopes of its own.
            if self.peek()? == b'{' {
                return Err(GiveUp);
            }
            let name = child.element.name.as_str();
            let ty = child.type_name;
            let cover = self.walk.leaf_cover(
                scopes,
                cover,
                parent.is_resource,
                name,
                ty,
                child.type_index(),
            );
            let cx = NodeCx {
                name,
                ty,
                def: None,
                ty_ix: None,
                parent_ty: parent.ty,
                is_resource: false,
            };
            // A leaf's scopes are its parent's (the same resources, the same indexes).
            return self.primitive(&cx, scopes, cover);
        }
        let mut opened = false;
        let nested_def = if declared.is_some_and(|d| d.kind == fhir_model::TypeKind::Resource)
            && self.peek()? == b'{'
        {
            // A nested resource names its type first (else the tree path decides).
            let start = self.pos;
            self.pos += 1;
            let ty = self.type_member()?;
            let d = fhir_model::r4()
                .type_def(ty)
                .filter(|d| d.kind == fhir_model::TypeKind::Resource)
                .ok_or(GiveUp)?;
            if !self.plan.types.get(ty).is_some_and(|tp| tp.stream) {
                return Err(GiveUp);
            }
            self.out.extend_from_slice(&self.b[start..self.pos]);
            opened = true;
            Some(d)
        } else {
            None
        };
        let mut cs = super::Scopes::new();
        let cx = self.walk.enter(
            self.plan,
            scopes,
            cover,
            parent,
            child,
            declared,
            nested_def.map(|d| (d, None)),
            &mut cs,
        );
        self.node(&cx, &cs, opened, false)
    }
}

/// `out[range] = with`, moving the tail once.
fn replace(out: &mut Vec<u8>, range: std::ops::Range<usize>, with: &[u8]) {
    let (from, to) = (range.start, range.end);
    let old_len = out.len();
    if with.len() > to - from {
        out.resize(old_len + with.len() - (to - from), 0);
    }
    out.copy_within(to..old_len, from + with.len());
    out[from..from + with.len()].copy_from_slice(with);
    out.truncate(old_len + with.len() - (to - from));
}

/// Each security label as `serde_json` writes the object `add_labels` builds.
static LABEL_JSON: std::sync::LazyLock<Vec<(u8, String)>> = std::sync::LazyLock::new(|| {
    label_objects()
        .into_iter()
        .map(|(bit, obj)| (bit, Json::Object(obj).to_string()))
        .collect()
});

/// A string's text with escapes, decoded as `serde_json` decodes it (invalid escapes give up).
fn decode(content: &str) -> R<String> {
    let mut quoted = String::with_capacity(content.len() + 2);
    quoted.push('"');
    quoted.push_str(content);
    quoted.push('"');
    serde_json::from_str(&quoted).map_err(|_| GiveUp)
}

/// A byte that ends a run of plain string content: a quote, a backslash, or a control
/// character (which JSON forbids raw).
#[inline(always)]
fn special(c: u8) -> bool {
    (c == b'"') | (c == b'\\') | (c < 0x20)
}

/// The high bit of each byte of `x` (little-endian) that is [`special`], exact up to the
/// lowest such byte (above it, borrows may flag others: only the lowest is used).
#[inline(always)]
fn special_word(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v;
    let quote = zero(x ^ (ONES * u64::from(b'"')));
    let backslash = zero(x ^ (ONES * u64::from(b'\\')));
    let control = x.wrapping_sub(ONES * 0x20) & !x;
    (quote | backslash | control) & (ONES * 0x80)
}

/// Whether cleanup's `trim` would change the text.
fn edge_space(t: &str) -> bool {
    let (Some(first), Some(last)) = (t.chars().next(), t.chars().next_back()) else {
        return false;
    };
    first.is_whitespace() || last.is_whitespace()
}

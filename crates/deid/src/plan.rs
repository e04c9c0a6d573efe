//! The compiled configuration: rules whose paths are structural — `Type`, `Type.a.b.c`,
//! `nodesByType('T')[.c]`, `nodesByName('n')[.c]` — become per-resource-type dispatch tables,
//! and a resource is anonymized in one walk of its JSON tree that decides, for every node, the rule
//! the reference's rule-by-rule passes (engine.rs, §3.4) would have applied to it first.
//!
//! Why one walk gives the same result as the rule-by-rule passes:
//! - A rule processes its matched nodes and, recursively, their descendants up to (not into)
//!   nested resources, skipping nodes an earlier rule processed. So a node goes to the smallest rule
//!   index that matches it or an ancestor within the same resource ("inherited"); rules of an
//!   enclosing resource all run before those of a nested one, so outer resources win first.
//! - Structural matches do not depend on values, and the edits of earlier rules only change or
//!   remove nodes those rules processed, which later rules skip anyway. The one value a method reads
//!   elsewhere is the root `id` (the date-shift prefix, "as it is now"): the walk handles the root's
//!   `id` first and gives each date shift the id as the rules before it left it.
//! - `perturb` seals its node: rules after it do not enter it, earlier ones already did. The walk
//!   enters a sealed subtree only for those earlier rules.
//!
//! What stays on the rule-by-rule walker: rules that need FHIRPath (`where()`, `as`, …),
//! `substitute` (its merge depends on what earlier rules visited below it) and `generalize` (its
//! expressions may read anything) — per resource type they apply to — and resources with `_x`
//! primitive shadows or unknown elements. [`Plan::covers`] decides per resource.

use rustc_hash::FxHashMap as HashMap;
use smallvec::SmallVec;

use chrono::NaiveDate;
use serde_json::Value as Json;

use crate::config::{Config, DateShiftScope, Matcher, Method, Parameters, Rule};
use crate::error::DeidError;
use crate::methods::{
    self, Change, PERTURB, PerturbTarget, add_labels, primitive_change, primitive_text,
};
use crate::patient;
use crate::transforms;
use crate::typing::{declared_def, resource_type_of};
use fhir_model::KeyWords;

pub(crate) mod stream;

/// Rule indexes are `u32`; `NONE` sorts after every rule.
type RuleIx = u32;

/// Per concrete resource type, what the structural rules that apply to it match.
#[derive(Debug, Default)]
struct TypePlan {
    /// Every applicable rule is structural and its method one the walk applies.
    fast: bool,
    /// `fast`, no `perturb` (its seals) and no patient-scoped date shift: the stream over the
    /// JSON bytes applies (stream.rs).
    stream: bool,
    /// `"path": "Type"`: the resource itself.
    root: Option<RuleIx>,
    /// The resource type's definition and index in the model (one lookup per resource).
    def: Option<&'static fhir_model::TypeDef>,
    ix: Option<u32>,
    /// Member paths from the resource (`name.given`), by element name.
    trie: Trie,
    /// `nodesByType('T')[.c]` by type (shared by the plans whose entries are the same: every
    /// plan, unless rules name resource types), `nodesByName('n')[.c]` by name.
    by_type: std::sync::Arc<ByType>,
    by_name: HashMap<String, Entry>,
}

/// `nodesByType('T')[.c]` entries, found by the node's type index in the model (a table over
/// the model's types instead of hashing the type's name for every node).
#[derive(Debug, Default)]
struct ByType {
    /// Per model type ([`fhir_model::Model::type_index`]): 1 + its index in `entries`; 0: none.
    ix: Vec<u32>,
    entries: Vec<Entry>,
    /// Entries of type names the model does not define, which only nodes of such (unindexed)
    /// types can meet: 1 + their index in `entries`.
    unindexed: HashMap<String, u32>,
    /// Per model type, its [`MemberTable`] under these entries, built when the stream first
    /// meets an object of that type.
    members: Box<[std::sync::OnceLock<MemberTable>]>,
}

impl PartialEq for ByType {
    /// The same entries (the member tables follow from them).
    fn eq(&self, other: &ByType) -> bool {
        self.ix == other.ix && self.entries == other.entries && self.unindexed == other.unindexed
    }
}

impl ByType {
    fn new(model: &fhir_model::Model, by_type: HashMap<String, Entry>) -> ByType {
        let mut t = ByType {
            ix: vec![0; model.type_count()],
            members: (0..model.type_count())
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            ..ByType::default()
        };
        let mut by_type: Vec<_> = by_type.into_iter().collect();
        by_type.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, entry) in by_type {
            t.entries.push(entry);
            let slot = t.entries.len() as u32;
            match model.type_index(&name) {
                Some(i) => t.ix[i as usize] = slot,
                None => {
                    t.unindexed.insert(name, slot);
                }
            }
        }
        t
    }

    /// 1 + the index in `entries` of the entry of a node of type `ty`, whose index in the model
    /// is `ty_ix`; 0: none.
    #[inline(always)]
    fn slot(&self, ty: &str, ty_ix: Option<u32>) -> u32 {
        match ty_ix {
            Some(i) => self.ix.get(i as usize).copied().unwrap_or(0),
            None if self.unindexed.is_empty() => 0,
            None => self.unindexed.get(ty).copied().unwrap_or(0),
        }
    }

    /// The entry at `slot` ([`ByType::slot`]).
    #[inline(always)]
    fn entry(&self, slot: u32) -> Option<&Entry> {
        self.entries.get((slot as usize).checked_sub(1)?)
    }

    /// The entry of a node of type `ty`, whose index in the model is `ty_ix`.
    #[inline(always)]
    fn get(&self, ty: &str, ty_ix: Option<u32>) -> Option<&Entry> {
        self.entry(self.slot(ty, ty_ix))
    }

    /// The member table of `def`, the model's type number `ix`.
    #[inline(always)]
    fn members(&self, def: &'static fhir_model::TypeDef, ix: u32) -> Option<&MemberTable> {
        let cell = self.members.get(ix as usize)?;
        Some(cell.get_or_init(|| MemberTable::new(self, def, ix)))
    }
}

/// A type's JSON keys with what the stream reads for each — the model's child (element, name,
/// concrete type, repetition, declared definition) and the `nodesByType` rules that depend on
/// the key and the type only — in one entry: one lookup per key instead of the model's child
/// table, its element and type list, the entry table and the `.c` names compared one by one.
#[derive(Debug)]
pub(crate) struct MemberTable {
    /// 1 + index into `members`; 0: empty. A power of two, at least twice the members.
    slots: Box<[u32]>,
    /// `64 - log2(slots.len())`.
    shift: u32,
    members: Box<[Member]>,
}

/// One key of a [`MemberTable`].
#[derive(Debug)]
pub(crate) struct Member {
    words: KeyWords,
    /// The element's name (`value` for `valueQuantity`).
    name: &'static str,
    child: fhir_model::ChildRef<'static>,
    /// [`declared_def`] of the child: None for a leaf.
    declared: Option<&'static fhir_model::TypeDef>,
    /// The element repeats (an array in JSON).
    max_many: bool,
    /// [`ByType::slot`] of the child's type.
    entry: u32,
    /// That entry's own rule (`nodesByType('T')` of the child's type).
    own: Option<RuleIx>,
    /// The first `nodesByType('P').c` rule naming this child, `P` the table's type.
    parent_rule: Option<RuleIx>,
    /// The key, for keys longer than 16 bytes (their middles are compared).
    key: &'static str,
}

impl MemberTable {
    fn new(by_type: &ByType, def: &'static fhir_model::TypeDef, ix: u32) -> MemberTable {
        let parent = by_type.entry(by_type.slot(&def.name, Some(ix)));
        let members: Vec<Member> = def
            .children()
            .map(|(key, child)| {
                let name = child.element.name.as_str();
                let entry = by_type.slot(child.type_name, child.type_index());
                Member {
                    words: KeyWords::of(key.as_bytes()),
                    name,
                    child,
                    declared: declared_def(child),
                    max_many: child.element.max_many,
                    entry,
                    own: by_type.entry(entry).and_then(|e| e.own),
                    parent_rule: parent.and_then(|e| {
                        e.children
                            .iter()
                            .filter(|(c, _)| c == name)
                            .map(|(_, r)| *r)
                            .min()
                    }),
                    key,
                }
            })
            .collect();
        let mut size = 4usize;
        while size < members.len() * 2 {
            size *= 2;
        }
        let mut slots = vec![0u32; size];
        let shift = 64 - size.trailing_zeros();
        for (i, m) in members.iter().enumerate() {
            let mut s = m.words.hash(shift);
            while slots[s] != 0 {
                s = (s + 1) & (size - 1);
            }
            slots[s] = i as u32 + 1;
        }
        MemberTable {
            slots: slots.into(),
            shift,
            members: members.into(),
        }
    }

    /// The member a JSON key names, and its index.
    #[inline(always)]
    pub(crate) fn get(&self, key: &str) -> Option<(usize, &Member)> {
        let words = KeyWords::of(key.as_bytes());
        let mask = self.slots.len().wrapping_sub(1);
        let mut s = words.hash(self.shift);
        loop {
            let i = (*self.slots.get(s)? as usize).checked_sub(1)?;
            let m = self.members.get(i)?;
            if m.words.same_key(m.key.as_bytes(), &words, key.as_bytes()) {
                return Some((i, m));
            }
            s = (s + 1) & mask;
        }
    }
}

impl Member {
    /// The model's child this key names.
    pub(crate) fn child(&self) -> fhir_model::ChildRef<'static> {
        self.child
    }
}

/// What `nodesByType('T')` / `nodesByName('n')` rules match at a node of that type or name.
#[derive(Debug, Default, PartialEq)]
struct Entry {
    /// `nodesByType('T')`: the first rule matching the node itself.
    own: Option<RuleIx>,
    /// `nodesByType('T').c`: (child name, rule), matching the node's children.
    children: Vec<(String, RuleIx)>,
}

/// The [`Entry`]s a depth-1 node meets in one scope (by its type, by its name).
type Entries<'p> = [Option<&'p Entry>; 2];

#[derive(Debug, Default)]
struct Trie {
    /// The first rule whose path ends here.
    here: Option<RuleIx>,
    next: HashMap<String, Trie>,
    /// Bit `len % 64` set for the length of each key of `next`: most names are ruled out
    /// without hashing them (a resource's root has the `Resource.id` path, so every member of
    /// every resource asks).
    lens: u64,
}

impl Trie {
    /// The position after member `name`.
    #[inline(always)]
    fn next(&self, name: &str) -> Option<&Trie> {
        if self.lens & (1u64 << (name.len() % 64)) == 0 {
            return None;
        }
        self.next.get(name)
    }
}

/// A configuration compiled per resource type.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    types: HashMap<String, TypePlan>,
}

fn min_rule(a: Option<RuleIx>, b: Option<RuleIx>) -> Option<RuleIx> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// What scope `sc`'s rules match at its child named `name` of type `ty`: the member path's rule
/// (`here`, from the trie), when the child is at depth 1 of the scope (`depth1`) its
/// `nodesByType`/`nodesByName` entries' own rules, and when the node itself is at depth 1 its
/// entries' `nodesBy*(…).c` rules naming the child. The entries are returned too: the child's
/// own scope keeps them. Shared by [`Walk::child_scopes`] and the leaf path [`Walk::leaf_cover`].
#[inline(always)]
fn child_rules<'p>(
    sc: &Scope<'p>,
    here: Option<RuleIx>,
    depth1: bool,
    name: &str,
    ty: &str,
    ty_ix: Option<u32>,
) -> (Option<RuleIx>, Entries<'p>) {
    // Two values, not an array iterated by reference: an array would go through the stack
    // and be read back whole into the scope (a store-forwarding stall).
    let (by_type, by_name) = if depth1 {
        (sc.plan.by_type.get(ty, ty_ix), sc.plan.by_name.get(name))
    } else {
        (None, None)
    };
    let mut matched = here;
    if let Some(e) = by_type {
        matched = min_rule(matched, e.own);
    }
    if let Some(e) = by_name {
        matched = min_rule(matched, e.own);
    }
    if sc.depth == 1 {
        // The parent's `nodesBy*(…).c` rules naming this child.
        for e in sc.entries.iter().flatten() {
            for (c, r) in &e.children {
                if c == name {
                    matched = min_rule(matched, Some(*r));
                }
            }
        }
    }
    (matched, [by_type, by_name])
}

/// `a.b.c` member paths (element names only), the part after the rule's type.
fn member_path(rule: &Rule) -> Option<Vec<&str>> {
    let rest = rule
        .path
        .strip_prefix(rule.resource_type.as_str())?
        .strip_prefix('.')?;
    let segs: Vec<&str> = rest.split('.').collect();
    let ident = |s: &&str| {
        let mut c = s.chars();
        c.next().is_some_and(|f| f.is_ascii_lowercase())
            && c.all(|ch| ch.is_ascii_alphanumeric())
            // FHIRPath keywords are operators or literals, not member names here.
            && !matches!(*s, "and" | "or" | "xor" | "implies" | "is" | "as" | "in" | "contains"
                | "div" | "mod" | "true" | "false")
    };
    segs.iter().all(ident).then_some(segs)
}

/// Whether every segment names an element of the type reached so far (choice elements reach all
/// their types; a `Resource` reaches any element).
fn path_exists(model: &fhir_model::Model, ty: &str, segs: &[&str]) -> bool {
    let Some((first, rest)) = segs.split_first() else {
        return true;
    };
    if ty == "Resource" || ty == "DomainResource" {
        return true;
    }
    let Some(el) = model.element(ty, first) else {
        return false;
    };
    el.types.iter().any(|t| {
        let t = if t == "BackboneElement" || t == "Element" {
            // Inline backbone elements are typed by their path.
            format!("{ty}.{first}")
        } else {
            t.clone()
        };
        model.type_def(&t).is_some() && path_exists(model, &t, rest)
    })
}

impl Plan {
    pub(crate) fn compile(config: &Config) -> Plan {
        let model = fhir_model::r4();
        let mut types = HashMap::default();
        // The distinct `nodesByType` tables, shared by the plans that have the same.
        let mut shared: Vec<std::sync::Arc<ByType>> = Vec::new();
        for ty in model.resource_types() {
            let mut tp = TypePlan {
                fast: true,
                def: model.type_def(ty),
                ix: model.type_index(ty),
                ..TypePlan::default()
            };
            let mut by_type: HashMap<String, Entry> = HashMap::default();
            let mut perturb = false;
            for rule in config.rules.iter().filter(|r| r.applies_to(ty)) {
                let ix = rule.index as RuleIx;
                if !matches!(
                    rule.method,
                    Method::Keep
                        | Method::Redact
                        | Method::DateShift
                        | Method::CryptoHash
                        | Method::Encrypt
                        | Method::Perturb { .. }
                ) {
                    tp.fast = false;
                }
                if matches!(rule.method, Method::Perturb { .. }) {
                    perturb = true;
                }
                match &rule.matcher {
                    Matcher::Resource => tp.root = min_rule(tp.root, Some(ix)),
                    Matcher::ByType(t, None) => {
                        let e = by_type.entry(t.clone()).or_default();
                        e.own = e.own.or(Some(ix));
                    }
                    Matcher::ByName(n, None) => {
                        let e = tp.by_name.entry(n.clone()).or_default();
                        e.own = e.own.or(Some(ix));
                    }
                    Matcher::ByType(t, Some(c)) => by_type
                        .entry(t.clone())
                        .or_default()
                        .children
                        .push((c.clone(), ix)),
                    Matcher::ByName(n, Some(c)) => tp
                        .by_name
                        .entry(n.clone())
                        .or_default()
                        .children
                        .push((c.clone(), ix)),
                    Matcher::Expr(_) => match member_path(rule) {
                        Some(segs) if path_exists(model, ty, &segs) => {
                            let mut node = &mut tp.trie;
                            for s in segs {
                                node.lens |= 1u64 << (s.len() % 64);
                                node = node.next.entry(s.to_string()).or_default();
                            }
                            node.here = min_rule(node.here, Some(ix));
                        }
                        // A path naming no element matches nothing on either walker.
                        Some(_) => {}
                        None => tp.fast = false,
                    },
                }
            }
            let table = ByType::new(model, by_type);
            tp.by_type = match shared.iter().find(|t| ***t == table) {
                Some(t) => t.clone(),
                None => {
                    let t = std::sync::Arc::new(table);
                    shared.push(t.clone());
                    t
                }
            };
            tp.stream = tp.fast
                && !perturb
                && config.parameters.date_shift_scope != DateShiftScope::Patient;
            types.insert(ty.clone(), tp);
        }
        Plan { types }
    }

    /// Whether the walk applies to a resource of this type containing these nested types.
    pub(crate) fn covers<'t>(&self, ty: &str, mut nested: impl Iterator<Item = &'t str>) -> bool {
        let fast = |t: &str| self.types.get(t).is_some_and(|p| p.fast);
        fast(ty) && nested.all(fast)
    }
}

/// The rule a node falls to: (scope, rule); scopes are the enclosing resources, outermost first.
type Cover = (usize, RuleIx);

/// One enclosing resource, as seen from the node being walked.
#[derive(Clone, Copy)]
struct Scope<'p> {
    plan: &'p TypePlan,
    /// Trie position of this node relative to the scope's resource (None: no path continues).
    trie: Option<&'p Trie>,
    /// The rule covering this node through an ancestor (within this scope).
    inherited: Option<RuleIx>,
    /// The first rule matching this node itself in this scope: its member path, `"path": "Type"`
    /// at the resource, `nodesBy*(…)` at depth 1 and its parent's `nodesBy*(…).c` (computed
    /// once, when the scope is entered; [`Walk::cover`] adds `inherited` and the seal).
    matched: Option<RuleIx>,
    /// The entries the node itself meets (its type's and name's; depth 1 only): its children's
    /// `nodesBy*(…).c` rules.
    entries: Entries<'p>,
    /// Index into [`Walk::ops`] (`u32` keeps two scopes within 128 bytes: moved, not copied
    /// through `memcpy`, for every node).
    id: u32,
    /// 0 at the scope's resource, 1 for its descendants, 2 below a nested resource (out of
    /// `nodesBy*` reach, which stops at sub-resources but includes them).
    depth: u8,
}

impl<'p> Scope<'p> {
    /// The scope of a resource of plan `plan`, seen from the resource itself; `id` indexes
    /// [`Walk::ops`].
    fn resource(plan: &'p TypePlan, id: usize) -> Scope<'p> {
        Scope {
            plan,
            trie: Some(&plan.trie),
            inherited: None,
            matched: min_rule(plan.trie.here, plan.root),
            entries: [None, None],
            id: id as u32,
            depth: 0,
        }
    }

    /// Index into [`Walk::ops`].
    fn ops_ix(&self) -> usize {
        self.id as usize
    }
}

/// The enclosing resources of a node: one, two in a contained or Bundle entry resource (kept
/// small: these are copied for every node).
type Scopes<'p> = SmallVec<[Scope<'p>; 2]>;

/// A node: its element name, its FHIR type, and its parent's.
struct NodeCx<'a> {
    name: &'a str,
    ty: &'a str,
    /// The type's definition (None for a type the model lacks).
    def: Option<&'static fhir_model::TypeDef>,
    /// The type's index in the model (with `def`: the key of its [`MemberTable`]).
    ty_ix: Option<u32>,
    parent_ty: &'a str,
    /// The root or a nested resource.
    is_resource: bool,
}

/// Operation bits of one resource (scope) of the walk, for the security labels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScopeOps {
    pub ops: u8,
    pub contained: bool,
    /// `dateShiftScope: "patient"`: the offset of the resource's patient, if it has one.
    pub patient_offset: Option<i64>,
}

/// One resource's single walk.
pub(crate) struct Walk<'e> {
    params: &'e Parameters,
    rules: &'e [Rule],
    today: NaiveDate,
    /// Date-shift prefix from the file context; empty: the root id (resource scope).
    file_prefix: &'e str,
    hits: &'e mut [u64],
    /// Per resource met, in pre-order.
    pub ops: Vec<ScopeOps>,
    original_id: String,
    current_id: String,
    /// The root-scope rule that processed the root's `id`.
    id_rule: Option<RuleIx>,
    /// The root's `id` is being walked.
    at_root_id: bool,
    /// Date-shift offsets computed so far, by prefix: file context, current id, original id.
    offsets: [std::cell::Cell<Option<i64>>; 3],
    /// `dateShiftScope: "patient"`: the root Bundle's Patient entries by `fullUrl`.
    bundle_patients: rustc_hash::FxHashMap<String, String>,
}

impl<'e> Walk<'e> {
    pub(crate) fn new(
        params: &'e Parameters,
        rules: &'e [Rule],
        today: NaiveDate,
        file_prefix: &'e str,
        hits: &'e mut [u64],
    ) -> Walk<'e> {
        Walk {
            params,
            rules,
            today,
            file_prefix,
            hits,
            ops: Vec::new(),
            original_id: String::new(),
            current_id: String::new(),
            id_rule: None,
            at_root_id: false,
            offsets: Default::default(),
            bundle_patients: Default::default(),
        }
    }

    /// Anonymizes `root`, a resource of type `ty` the plan covers, in place (labels and cleanup
    /// are the caller's, from [`Walk::ops`]).
    pub(crate) fn run(&mut self, plan: &Plan, root: &mut Json, ty: &str) -> Result<(), DeidError> {
        let Some(tp) = plan.types.get(ty) else {
            return Ok(());
        };
        self.original_id = root.get("id").and_then(primitive_text).unwrap_or_default();
        self.current_id = self.original_id.clone();
        let patient_offset = if self.params.date_shift_scope == DateShiftScope::Patient {
            self.bundle_patients = patient::bundle_patients(root);
            self.patient_offset(root)
        } else {
            None
        };
        self.ops.push(ScopeOps {
            ops: 0,
            contained: false,
            patient_offset,
        });
        let scopes = [Scope::resource(tp, 0)];
        let cx = NodeCx {
            name: ty,
            ty,
            def: fhir_model::r4().type_def(ty),
            ty_ix: fhir_model::r4().type_index(ty),
            parent_ty: "",
            is_resource: true,
        };
        self.node(plan, root, &cx, &scopes, None, true)
    }

    /// The date-shift offset of a (non-contained) resource's patient.
    fn patient_offset(&self, resource: &Json) -> Option<i64> {
        let id = patient::patient_of(resource.as_object()?, &self.bundle_patients)?;
        Some(transforms::patient_shift_offset(
            &self.params.date_shift_key,
            &id,
        ))
    }

    /// The rule covering a node: outer scopes first; under a
    /// seal only the rules that ran before the sealing one.
    #[inline(always)]
    fn cover(&self, scopes: &[Scope<'_>], seal: Option<Cover>) -> Option<Cover> {
        for (s, sc) in scopes.iter().enumerate() {
            let allowed = |r: RuleIx| match seal {
                None => true,
                Some((ss, sr)) => s < ss || (s == ss && r < sr),
            };
            // Within a scope the smaller rule index wins, matched here or on an ancestor.
            let own = min_rule(sc.inherited.filter(|r| allowed(*r)), sc.matched);
            if let Some(r) = own
                && allowed(r)
            {
                return Some((s, r));
            }
        }
        None
    }

    /// [`Walk::cover`] of a child named `name` of type `ty` that is a leaf (a primitive, not a
    /// nested resource: no children, so no scopes of its own), without building its scopes:
    /// what [`Walk::child_scopes`] would match at it, then the cover over those. No seal (the
    /// stream runs without `perturb`).
    #[inline(always)]
    fn leaf_cover(
        &self,
        scopes: &[Scope<'_>],
        cover: Option<Cover>,
        node_is_resource: bool,
        name: &str,
        ty: &str,
        ty_ix: Option<u32>,
    ) -> Option<Cover> {
        for (s, sc) in scopes.iter().enumerate() {
            let here = sc.trie.and_then(|t| t.next(name)).and_then(|t| t.here);
            let depth1 = match sc.depth {
                0 => true,
                1 => !node_is_resource,
                _ => false,
            };
            let (matched, _) = child_rules(sc, here, depth1, name, ty, ty_ix);
            let inherited = match cover {
                Some((cs, r)) if cs == s => Some(r),
                _ => None,
            };
            if let Some(r) = min_rule(inherited, matched) {
                return Some((s, r));
            }
        }
        None
    }

    /// [`child_rules`] for a [`Member`] of the node's type in the single scope `sc` (the
    /// member's table is of `sc.plan`'s `nodesByType` entries): the same rules, with the
    /// type-dependent ones read from the member.
    #[inline(always)]
    fn member_rules<'p>(sc: &Scope<'p>, depth1: bool, m: &Member) -> (Option<RuleIx>, Entries<'p>) {
        let mut matched = sc.trie.and_then(|t| t.next(m.name)).and_then(|t| t.here);
        let (by_type, by_name) = if depth1 {
            matched = min_rule(matched, m.own);
            let by_name = if sc.plan.by_name.is_empty() {
                None
            } else {
                sc.plan.by_name.get(m.name)
            };
            (sc.plan.by_type.entry(m.entry), by_name)
        } else {
            (None, None)
        };
        if let Some(e) = by_name {
            matched = min_rule(matched, e.own);
        }
        if sc.depth == 1 {
            // The node's own `nodesBy*(…).c` rules naming this child: its type's entry (the
            // node's `entries[0]`, the table's type) from the member, its name's here.
            matched = min_rule(matched, m.parent_rule);
            if let Some(e) = sc.entries[1] {
                for (c, r) in &e.children {
                    if c == m.name {
                        matched = min_rule(matched, Some(*r));
                    }
                }
            }
        }
        (matched, [by_type, by_name])
    }

    /// [`Walk::leaf_cover`] of a leaf member `m` of a node walked in one scope, `sc`.
    #[inline(always)]
    fn member_leaf_cover(
        sc: &Scope<'_>,
        cover: Option<Cover>,
        node_is_resource: bool,
        m: &Member,
    ) -> Option<Cover> {
        let depth1 = match sc.depth {
            0 => true,
            1 => !node_is_resource,
            _ => false,
        };
        let (matched, _) = Self::member_rules(sc, depth1, m);
        let inherited = match cover {
            Some((0, r)) => Some(r),
            _ => None,
        };
        min_rule(inherited, matched).map(|r| (0, r))
    }

    /// [`Walk::enter`] for a member `m` (not a leaf, not a nested resource) of a node walked
    /// in one scope, `sc`: the child's one scope, pushed onto `cs`, and its context.
    #[inline(always)]
    fn enter_member<'p, 'c>(
        sc: &Scope<'p>,
        cover: Option<Cover>,
        parent: &NodeCx<'c>,
        m: &Member,
        cs: &mut Scopes<'p>,
    ) -> NodeCx<'c> {
        let depth = match sc.depth {
            0 => 1,
            1 if parent.is_resource => 2,
            1 => 1,
            _ => 2,
        };
        let (matched, entries) = Self::member_rules(sc, depth == 1, m);
        cs.push(Scope {
            plan: sc.plan,
            trie: sc.trie.and_then(|t| t.next(m.name)),
            inherited: match cover {
                Some((0, r)) => Some(r),
                _ => None,
            },
            matched,
            entries,
            id: sc.id,
            depth,
        });
        NodeCx {
            name: m.name,
            ty: m.child.type_name,
            def: m.declared,
            ty_ix: m.child.type_index(),
            parent_ty: parent.ty,
            is_resource: false,
        }
    }

    /// The scopes as seen from a child named `name` of type `ty` of a node (`cover` is the
    /// node's), plus the child's own scope when it is a nested resource.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn child_scopes<'p>(
        &mut self,
        plan: &'p Plan,
        scopes: &[Scope<'p>],
        cover: Option<Cover>,
        node_is_resource: bool,
        name: &str,
        ty: &str,
        ty_ix: Option<u32>,
        nested: Option<(&str, bool, Option<i64>)>,
        out: &mut Scopes<'p>,
    ) {
        for (s, sc) in scopes.iter().enumerate() {
            let depth = match sc.depth {
                0 => 1,
                1 if node_is_resource => 2,
                1 => 1,
                _ => 2,
            };
            let trie = sc.trie.and_then(|t| t.next(name));
            let (matched, [by_type, by_name]) =
                child_rules(sc, trie.and_then(|t| t.here), depth == 1, name, ty, ty_ix);
            out.push(Scope {
                plan: sc.plan,
                trie,
                // Processing recurses into the covered node's children, never into resources.
                inherited: match cover {
                    Some((cs, r)) if cs == s && nested.is_none() => Some(r),
                    _ => None,
                },
                matched,
                entries: [by_type, by_name],
                id: sc.id,
                depth,
            });
        }
        if let Some((ty, contained, patient_offset)) = nested
            && let Some(tp) = plan.types.get(ty)
        {
            let id = self.ops.len();
            self.ops.push(ScopeOps {
                ops: 0,
                contained,
                patient_offset,
            });
            out.push(Scope::resource(tp, id));
        }
    }

    fn node(
        &mut self,
        plan: &Plan,
        value: &mut Json,
        cx: &NodeCx<'_>,
        scopes: &[Scope<'_>],
        seal: Option<Cover>,
        is_root: bool,
    ) -> Result<(), DeidError> {
        let cover = self.cover(scopes, seal);
        let mut child_seal = seal;
        if let Some((s, r)) = cover {
            self.hits[r as usize] += 1;
            if self.at_root_id {
                self.id_rule = Some(r);
            }
            let (ops, sealed) = self.apply(plan, value, cx, scopes, s, r)?;
            self.ops[scopes[s].ops_ix()].ops |= ops;
            if sealed {
                // The earliest seal bounds the subtree.
                child_seal = Some(seal.map_or((s, r), |prev| prev.min((s, r))));
            }
        }
        let Json::Object(obj) = value else {
            return Ok(());
        };
        if is_root && let Some(id) = obj.get_mut("id") {
            // The root's id first: date shifts read it as the rules before them left it.
            self.at_root_id = true;
            let done = self.child(plan, id, "id", cx, scopes, cover, child_seal);
            self.at_root_id = false;
            done?;
            self.current_id = obj.get("id").and_then(primitive_text).unwrap_or_default();
            self.offsets[1].set(None);
        }
        for (key, v) in obj.iter_mut() {
            if key == "resourceType" || (is_root && key == "id") {
                continue;
            }
            match v {
                Json::Array(items) => {
                    for item in items.iter_mut().filter(|i| !i.is_null()) {
                        self.child(plan, item, key, cx, scopes, cover, child_seal)?;
                    }
                }
                Json::Null => {}
                item => self.child(plan, item, key, cx, scopes, cover, child_seal)?,
            }
        }
        // A resource's labels: its operations and those of the resources nested in it, all
        // final once its subtree is walked (scopes are numbered in pre-order).
        if cx.is_resource
            && let Some(own) = scopes.last().filter(|s| s.depth == 0)
            && !self.ops[own.ops_ix()].contained
        {
            let all = self.ops[own.ops_ix()..].iter().fold(0u8, |a, o| a | o.ops);
            if all != 0 {
                add_labels(obj, all);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn child(
        &mut self,
        plan: &Plan,
        item: &mut Json,
        key: &str,
        parent: &NodeCx<'_>,
        scopes: &[Scope<'_>],
        cover: Option<Cover>,
        seal: Option<Cover>,
    ) -> Result<(), DeidError> {
        let Some(child) = parent.def.and_then(|d| d.child(key)) else {
            // Unknown keys never reach the walk (the shape pass sends such resources elsewhere).
            return Ok(());
        };
        let declared = declared_def(child);
        let nested_def = if declared.is_some_and(|d| d.kind == fhir_model::TypeKind::Resource) {
            item.as_object()
                .and_then(resource_type_of)
                .and_then(Json::as_str)
                .and_then(|t| fhir_model::r4().type_def(t))
        } else {
            None
        };
        let nested = nested_def.map(|d| {
            // A contained resource shares its container's patient; another nested resource (a
            // Bundle entry) has its own.
            let patient_offset = if self.params.date_shift_scope != DateShiftScope::Patient {
                None
            } else if child.element.name == "contained" {
                scopes
                    .last()
                    .and_then(|sc| self.ops[sc.ops_ix()].patient_offset)
            } else {
                self.patient_offset(item)
            };
            (d, patient_offset)
        });
        let mut cs = Scopes::new();
        let cx = self.enter(
            plan, scopes, cover, parent, child, declared, nested, &mut cs,
        );
        self.node(plan, item, &cx, &cs, seal, false)
    }

    /// A child node of element `child` under `parent` (shared by the tree walk and the stream):
    /// its scopes (pushed onto `cs`, empty, built in the caller's frame rather than moved out)
    /// and context. `declared`: its declared type's definition ([`declared_def`]);
    /// `nested`: when it is a nested resource, the resource's definition and patient offset.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn enter<'p, 'c>(
        &mut self,
        plan: &'p Plan,
        scopes: &[Scope<'p>],
        cover: Option<Cover>,
        parent: &NodeCx<'c>,
        child: fhir_model::ChildRef<'static>,
        declared: Option<&'static fhir_model::TypeDef>,
        nested: Option<(&'static fhir_model::TypeDef, Option<i64>)>,
        cs: &mut Scopes<'p>,
    ) -> NodeCx<'c> {
        let name = child.element.name.as_str();
        let ty = nested.map_or(child.type_name, |(d, _)| d.name.as_str());
        let ty_ix = match nested {
            None => child.type_index(),
            Some((d, _)) => fhir_model::r4().type_index(&d.name),
        };
        self.child_scopes(
            plan,
            scopes,
            cover,
            parent.is_resource,
            name,
            ty,
            ty_ix,
            nested.map(|(d, offset)| (d.name.as_str(), name == "contained", offset)),
            cs,
        );
        NodeCx {
            name,
            ty,
            def: nested.map(|(d, _)| d).or(declared),
            ty_ix,
            parent_ty: parent.ty,
            is_resource: nested.is_some(),
        }
    }

    /// Applies rule `r` of scope `s` to a node: (operation bits, whether the node is now sealed).
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        plan: &Plan,
        value: &mut Json,
        cx: &NodeCx<'_>,
        scopes: &[Scope<'_>],
        s: usize,
        r: RuleIx,
    ) -> Result<(u8, bool), DeidError> {
        let rules = self.rules;
        let rule = &rules[r as usize];
        match &rule.method {
            Method::Keep => Ok((0, false)),
            Method::Perturb { .. } => {
                let Some(target) = methods::perturb_target(cx.ty) else {
                    return Ok((0, false));
                };
                let value = match target {
                    PerturbTarget::Number(_) => value,
                    PerturbTarget::QuantityValue => {
                        // The quantity's `value`; none: not sealed.
                        let Some(v) = value.get_mut("value").filter(|v| !v.is_null()) else {
                            return Ok((0, false));
                        };
                        // An earlier rule processed the value (a decimal): it stays, the
                        // quantity is sealed.
                        let mut cs = Scopes::new();
                        self.child_scopes(
                            plan,
                            scopes,
                            Some((s, r)),
                            false,
                            "value",
                            "decimal",
                            fhir_model::r4().type_index("decimal"),
                            None,
                            &mut cs,
                        );
                        if self.cover(&cs, Some((s, r))).is_some() {
                            return Ok((0, true));
                        }
                        v
                    }
                };
                let Some(text) = primitive_text(value) else {
                    return Ok((0, true));
                };
                *value = methods::perturb(rule, &text, target.kind())?;
                Ok((PERTURB, true))
            }
            _ => {
                // Borrowed for strings (most values): only numbers and booleans are rendered.
                let text: std::borrow::Cow<'_, str> = match &*value {
                    Json::String(t) => std::borrow::Cow::Borrowed(t.as_str()),
                    other => match primitive_text(other) {
                        Some(t) => std::borrow::Cow::Owned(t),
                        None => return Ok((0, false)),
                    },
                };
                let change = self.change(&text, cx, scopes, s, r)?;
                Ok(match change {
                    None => (0, false),
                    Some((Change::Keep, ops)) => (ops, false),
                    Some((Change::Set(j), ops)) => {
                        *value = j;
                        (ops, false)
                    }
                    Some((Change::Remove, ops)) => {
                        *value = Json::Null;
                        (ops, false)
                    }
                })
            }
        }
    }
}

impl Walk<'_> {
    /// What rule `r` of scope `s` (redact, dateShift, cryptoHash or encrypt) does to the
    /// primitive value `text` of a node: shared by the tree walk and the stream (stream.rs).
    fn change(
        &self,
        text: &str,
        cx: &NodeCx<'_>,
        scopes: &[Scope<'_>],
        s: usize,
        r: RuleIx,
    ) -> Result<Option<(Change, u8)>, DeidError> {
        let rule = &self.rules[r as usize];
        let offset = || {
            // Patient scope: the patient of the innermost resource holding the node.
            if let Some(o) = scopes
                .last()
                .and_then(|sc| self.ops[sc.ops_ix()].patient_offset)
            {
                return o;
            }
            let (slot, prefix) = if !self.file_prefix.is_empty() {
                (0, self.file_prefix)
            } else if s > 0 || self.id_rule.is_some_and(|ir| ir < r) {
                (1, self.current_id.as_str())
            } else {
                (2, self.original_id.as_str())
            };
            let cell = &self.offsets[slot];
            cell.get().unwrap_or_else(|| {
                let o = transforms::date_shift_offset(prefix, &self.params.date_shift_key);
                cell.set(Some(o));
                o
            })
        };
        primitive_change(
            rule,
            self.params,
            text,
            cx.ty,
            cx.name,
            &|| cx.parent_ty.to_string(),
            &offset,
            self.today,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of every model type found in its member table with the model's child and the
    /// plan's `nodesByType` rules for it; keys the model lacks are not found.
    #[test]
    fn member_tables_agree_with_the_model_and_the_entries() {
        let config = Config::parse(
            r#"{"fhirPathRules": [
                {"path": "nodesByType('Extension')", "method": "redact"},
                {"path": "nodesByType('Coding').code", "method": "redact"},
                {"path": "nodesByType('Coding').display", "method": "keep"},
                {"path": "nodesByType('Coding').code", "method": "keep"},
                {"path": "nodesByType('date')", "method": "dateshift"},
                {"path": "nodesByType('HumanName')", "method": "redact"}
            ]}"#,
        )
        .expect("config");
        let plan = Plan::compile(&config);
        let model = fhir_model::r4();
        let by_type = &plan.types["Patient"].by_type;
        // Every type reachable from the resource types, once.
        let mut defs: Vec<&'static fhir_model::TypeDef> = model
            .resource_types()
            .iter()
            .filter_map(|n| model.type_def(n))
            .collect();
        let mut seen: std::collections::HashSet<&str> =
            defs.iter().map(|d| d.name.as_str()).collect();
        let mut next = 0;
        while let Some(&def) = defs.get(next) {
            next += 1;
            for (_, child) in def.children() {
                if let Some(d) = model.child_def(child)
                    && seen.insert(d.name.as_str())
                {
                    defs.push(d);
                }
            }
        }
        let mut keys = 0;
        for def in defs {
            let ty = model.type_index(&def.name).expect("index");
            let table = by_type.members(def, ty).expect("table");
            let parent = by_type.get(&def.name, Some(ty));
            for (key, child) in def.children() {
                let (i, m) = table
                    .get(key)
                    .unwrap_or_else(|| panic!("{}.{key}", def.name));
                assert!(std::ptr::eq(&table.members[i], m));
                assert!(std::ptr::eq(m.child.element, child.element));
                assert_eq!(m.child.type_name, child.type_name);
                assert_eq!(m.name, child.element.name);
                assert_eq!(m.max_many, child.element.max_many);
                assert_eq!(
                    m.declared.map(|d| &d.name),
                    declared_def(child).map(|d| &d.name)
                );
                let entry = by_type.get(child.type_name, child.type_index());
                assert_eq!(m.own, entry.and_then(|e| e.own));
                let named = parent.and_then(|p| {
                    p.children
                        .iter()
                        .filter(|(c, _)| c == &child.element.name)
                        .map(|(_, r)| *r)
                        .min()
                });
                assert_eq!(m.parent_rule, named);
                keys += 1;
                for near in [format!("{key}x"), format!("_{key}"), key[1..].to_string()] {
                    if def.child(&near).is_none() {
                        assert!(table.get(&near).is_none(), "{}.{near}", def.name);
                    }
                }
            }
            assert!(table.get("").is_none(), "{}", def.name);
            // (`ExampleScenario.instance` has an element named so: the stream gives up on the
            // key before looking it up.)
            if def.child("resourceType").is_none() {
                assert!(table.get("resourceType").is_none(), "{}", def.name);
            }
        }
        assert!(keys > 1000, "{keys}");
        // Coding's `.c` rules: the first rule naming each child.
        let coding = model.type_def("Coding").expect("Coding");
        let ix = model.type_index("Coding").expect("index");
        let t = by_type.members(coding, ix).expect("table");
        assert_eq!(t.get("code").expect("code").1.parent_rule, Some(1));
        assert_eq!(t.get("display").expect("display").1.parent_rule, Some(2));
        assert_eq!(t.get("system").expect("system").1.parent_rule, None);
        let name = model.type_def("Patient").expect("Patient");
        let t = by_type
            .members(name, model.type_index("Patient").expect("index"))
            .expect("table");
        assert_eq!(t.get("name").expect("name").1.own, Some(5));
        assert_eq!(t.get("birthDate").expect("birthDate").1.own, Some(4));
        assert_eq!(t.get("extension").expect("extension").1.own, Some(0));
    }
}

//! The rule walker (§3): resources in document order, rules in configuration order,
//! first-match-wins through one visited set per input resource, labels, cleanup.

use std::collections::HashSet;

use chrono::NaiveDate;
use fhirpath::{EvalContext, Item, Node, NodePath, Segment};
use serde_json::{Map, Value as Json};

use std::sync::Arc;

use crate::config::{Config, ConfigError, DateShiftScope, Matcher, Method, ProcessingErrors, Rule};
pub use crate::error::DeidError;
use crate::error::rule_err;
use crate::methods::{
    self, Change, GENERALIZE, PERTURB, PerturbTarget, SUBSTITUTE, V3, add_labels, primitive_change,
    primitive_text,
};
use crate::patient;
use crate::plan::{Plan, Walk};
use crate::transforms;
use crate::typing::{element_type_def, resource_type_of};

/// One anonymized resource.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub resource: Json,
    /// True when `processingErrors: skip` replaced the resource with the redacted stub.
    pub skipped: bool,
    /// Nodes processed per rule (index = rule index).
    pub rule_hits: Vec<u64>,
}

/// What [`Engine::anonymize_json`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// True when `processingErrors: skip` replaced the resource with the redacted stub.
    pub skipped: bool,
    /// Nodes processed per rule (index = rule index).
    pub rule_hits: Vec<u64>,
    /// Whether the stream over the JSON bytes wrote it (else the tree path did).
    pub streamed: bool,
}

/// A compiled configuration ready to anonymize resources. `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Engine {
    config: Config,
    /// The configuration compiled per resource type (plan.rs).
    plan: Arc<Plan>,
    /// Whether resources the plan covers take the single walk (off: rule by rule, for comparison).
    use_plan: bool,
    date_shift_prefix: String,
    today: Option<NaiveDate>,
}

/// The local date (the reference's `DateTime.Now`), read from the clock and the time zone at
/// most once a second per thread. Each resource asks for it: `chrono::Local::now()` per resource
/// (the clock, the zone's offset, a calendar date) was 1.9 % of a de-identified export's CPU
/// (issue 24, perf); an `Instant` compare is a fraction of that. The date may lag the clock by
/// under a second at midnight.
fn local_today() -> NaiveDate {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static TODAY: Cell<Option<(Instant, NaiveDate)>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    TODAY.with(|cell| match cell.get() {
        Some((at, date)) if now.saturating_duration_since(at) < Duration::from_secs(1) => date,
        _ => {
            let date = chrono::Local::now().date_naive();
            cell.set(Some((now, date)));
            date
        }
    })
}

enum Edit {
    /// Replace the value at the path.
    Set(NodePath, Json),
    /// Remove the value at the path (object key removed, array slot nulled).
    Remove(NodePath),
}

impl Engine {
    pub fn new(config: Config) -> Engine {
        Engine {
            plan: Arc::new(Plan::compile(&config)),
            config,
            use_plan: true,
            date_shift_prefix: String::new(),
            today: None,
        }
    }

    pub fn from_config_text(text: &str) -> Result<Engine, ConfigError> {
        Ok(Engine::new(Config::parse(text)?))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Date-shift prefix from the host's file context (§2.3): the file name for `file` scope, the
    /// folder's last segment for `folder` scope; ignored for `resource` scope.
    pub fn with_file_context(mut self, file_name: &str, folder_name: &str) -> Engine {
        self.date_shift_prefix = match self.config.parameters.date_shift_scope {
            DateShiftScope::Resource | DateShiftScope::Patient => String::new(),
            DateShiftScope::File => file_name.to_string(),
            DateShiftScope::Folder => folder_name.trim_end_matches(['/', '\\']).to_string(),
        };
        self
    }

    /// Applies every rule through the rule-by-rule walker, even where the compiled plan would do:
    /// the reference the plan is compared against in tests and benchmarks.
    pub fn rule_by_rule(mut self) -> Engine {
        self.use_plan = false;
        self
    }

    /// Fixes "today" for the age-over-89 test (the reference reads the local clock).
    pub fn with_today(mut self, today: NaiveDate) -> Engine {
        self.today = Some(today);
        self
    }

    /// Decrypts a value produced by an `encrypt` rule with this configuration's key.
    pub fn decrypt(&self, b64: &str) -> Result<String, transforms::CryptoError> {
        transforms::decrypt(&self.config.parameters.encrypt_key, b64)
    }

    /// Parses and anonymizes one resource.
    pub fn anonymize_str(&self, text: &str) -> Result<Outcome, DeidError> {
        let v: Json = serde_json::from_str(text.trim_start_matches('\u{feff}'))
            .map_err(|e| DeidError::InvalidInput(e.to_string()))?;
        self.anonymize(v)
    }

    /// Anonymizes one resource given as JSON bytes and appends the output's compact JSON to
    /// `out`: the bytes `serde_json::to_writer` writes for [`Engine::anonymize`]'s resource.
    /// Compact input whose types the compiled plan covers without FHIRPath, `substitute`,
    /// `generalize`, `perturb` or patient-scoped date shifts is rewritten as it streams, without
    /// a JSON tree (plan/stream.rs); anything else is parsed and goes through
    /// [`Engine::anonymize`]. On error `out` is as it was.
    pub fn anonymize_json(&self, input: &[u8], out: &mut Vec<u8>) -> Result<Written, DeidError> {
        let mut hits = vec![0u64; self.config.rules.len()];
        if self.use_plan {
            let mut walk = self.walk(&mut hits);
            if crate::plan::stream::stream(&self.plan, &mut walk, input, out) {
                return Ok(Written {
                    skipped: false,
                    rule_hits: hits,
                    streamed: true,
                });
            }
            hits.fill(0);
        }
        let v: Json =
            serde_json::from_slice(input).map_err(|e| DeidError::InvalidInput(e.to_string()))?;
        let o = self.anonymize(v)?;
        serde_json::to_writer(&mut *out, &o.resource)
            .map_err(|e| DeidError::InvalidInput(e.to_string()))?;
        Ok(Written {
            skipped: o.skipped,
            rule_hits: o.rule_hits,
            streamed: false,
        })
    }

    pub fn anonymize(&self, mut root: Json) -> Result<Outcome, DeidError> {
        let ty = match root.get("resourceType") {
            Some(Json::String(t)) if fhir_model::r4().is_resource(t) => t.clone(),
            Some(Json::String(t)) => {
                return Err(DeidError::InvalidInput(format!(
                    "Cannot locate type information for type '{t}'"
                )));
            }
            _ => return Err(DeidError::InvalidInput("no resourceType".into())),
        };
        let mut shape = Shape::default();
        normalise_arrays(&mut root, &ty, &mut shape);
        if shape.unknown || shape.shadows {
            // Firely refuses elements unknown to the version ("The input FHIR resource is invalid").
            // Only resources with keys outside the model (or inside `_x` shadows) can have them.
            if let Err(issues) = fhir_model::r4().validate(&root)
                && let Some(i) = issues
                    .iter()
                    .find(|i| i.message.starts_with("unknown element"))
            {
                return Err(DeidError::InvalidInput(format!(
                    "The input FHIR resource is invalid: {i}"
                )));
            }
        }
        let fast = self.plan_applies(&ty, &shape);
        let mut hits = vec![0u64; self.config.rules.len()];
        let done = if fast {
            let mut walk = self.walk(&mut hits);
            walk.run(&self.plan, &mut root, &ty).map(|()| {
                cleanup(&mut root, true);
            })
        } else {
            self.run(&mut root, &mut hits)
        };
        match done {
            Ok(()) => Ok(Outcome {
                resource: root,
                skipped: false,
                rule_hits: hits,
            }),
            Err(DeidError::Processing { .. })
                if self.config.processing_errors == ProcessingErrors::Skip =>
            {
                let mut stub = Map::new();
                stub.insert("resourceType".into(), Json::String(ty));
                stub.insert(
                    "meta".into(),
                    serde_json::json!({"security": [{"system": V3, "code": "REDACTED", "display": "redacted"}]}),
                );
                Ok(Outcome {
                    resource: Json::Object(stub),
                    skipped: true,
                    rule_hits: hits,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether this resource would take the compiled plan's single walk (diagnostics and tests).
    pub fn takes_plan(&self, resource: &Json) -> bool {
        let Some(Json::String(ty)) = resource.get("resourceType") else {
            return false;
        };
        let mut copy = resource.clone();
        let mut shape = Shape::default();
        normalise_arrays(&mut copy, ty, &mut shape);
        self.plan_applies(ty, &shape)
    }

    /// The single walk needs known elements only, no `_x` shadows, and plans for every resource
    /// type involved.
    fn plan_applies(&self, ty: &str, shape: &Shape) -> bool {
        self.use_plan
            && !shape.unknown
            && !shape.shadows
            && self
                .plan
                .covers(ty, shape.nested.iter().map(String::as_str))
    }

    /// A compiled plan's walk of one resource, counting rule hits into `hits`.
    fn walk<'e>(&'e self, hits: &'e mut [u64]) -> Walk<'e> {
        Walk::new(
            &self.config.parameters,
            &self.config.rules,
            self.today(),
            &self.date_shift_prefix,
            hits,
        )
    }

    fn today(&self) -> NaiveDate {
        self.today.unwrap_or_else(local_today)
    }

    fn run(&self, root: &mut Json, hits: &mut [u64]) -> Result<(), DeidError> {
        // Resource nodes in document pre-order: (path, type, is contained).
        let mut resources: Vec<(NodePath, String, bool)> = Vec::new();
        {
            let n = Node::root(root);
            resources.push((NodePath::root(), n.fhir_type().to_string(), false));
            collect_resources(&n, &mut resources);
        }
        let patient_offsets = self.patient_offsets(root, &resources);
        let mut visited: HashSet<NodePath> = HashSet::new();
        let mut sealed: Vec<NodePath> = Vec::new();
        let mut ops = vec![0u8; resources.len()];
        let today = self.today();
        for (ri, (rpath, rtype, _)) in resources.iter().enumerate() {
            let mut cache: Option<Vec<(NodePath, String, String)>> = None;
            for rule in self.config.rules.iter().filter(|r| r.applies_to(rtype)) {
                if let Method::Unknown(m) = &rule.method {
                    return Err(DeidError::Config(ConfigError {
                        rule: Some(rule.index),
                        field: "method".into(),
                        problem: format!("Anonymization method {m} not supported."),
                    }));
                }
                let mut edits = Vec::new();
                {
                    let Some(rnode) = Node::at_path(root, rpath) else {
                        break;
                    };
                    let matched = self.matches(root, rpath, &rnode, rule, &mut cache)?;
                    let mut pass = Pass {
                        engine: self,
                        root,
                        rule,
                        visited: &mut visited,
                        sealed: &mut sealed,
                        edits: &mut edits,
                        ops: 0,
                        hits: 0,
                        today,
                        resources: &resources,
                        patient_offsets: &patient_offsets,
                    };
                    for node in &matched {
                        pass.process(node, "")?;
                    }
                    ops[ri] |= pass.ops;
                    hits[rule.index] += pass.hits;
                }
                apply(root, edits);
            }
        }
        // Labels: each non-contained resource gets its own operations and its nested ones'.
        for (p, _, contained) in resources.iter().rev() {
            if *contained {
                continue;
            }
            let mut all = 0u8;
            for (j, (q, _, _)) in resources.iter().enumerate() {
                if q.0.starts_with(&p.0) {
                    all |= ops[j];
                }
            }
            if all != 0
                && let Some(Json::Object(obj)) = get_mut(root, p)
            {
                add_labels(obj, all);
            }
        }
        cleanup(root, true);
        Ok(())
    }

    /// `dateShiftScope: "patient"`: per resource (as listed by `run`), the offset of its
    /// patient, read on the input; a contained resource takes its container's.
    fn patient_offsets(
        &self,
        root: &Json,
        resources: &[(NodePath, String, bool)],
    ) -> Vec<Option<i64>> {
        if self.config.parameters.date_shift_scope != DateShiftScope::Patient {
            return vec![None; resources.len()];
        }
        let bundle = patient::bundle_patients(root);
        let key = &self.config.parameters.date_shift_key;
        let mut out: Vec<Option<i64>> = Vec::with_capacity(resources.len());
        for (i, (p, _, contained)) in resources.iter().enumerate() {
            let o = if *contained {
                (0..i)
                    .rev()
                    .find(|&j| p.0.starts_with(&resources[j].0.0))
                    .and_then(|j| out[j])
            } else {
                Node::at_path(root, p)
                    .and_then(|n| n.json())
                    .and_then(Json::as_object)
                    .and_then(|o| patient::patient_of(o, &bundle))
                    .map(|id| transforms::patient_shift_offset(key, &id))
            };
            out.push(o);
        }
        out
    }

    fn matches<'a>(
        &self,
        root: &'a Json,
        rpath: &NodePath,
        rnode: &Node<'a>,
        rule: &Rule,
        cache: &mut Option<Vec<(NodePath, String, String)>>,
    ) -> Result<Vec<Node<'a>>, DeidError> {
        Ok(match &rule.matcher {
            Matcher::Resource => vec![rnode.clone()],
            Matcher::ByType(want, child) | Matcher::ByName(want, child) => {
                let by_type = matches!(rule.matcher, Matcher::ByType(..));
                let list = cache.get_or_insert_with(|| {
                    let mut v = Vec::new();
                    descendants(rnode, &mut v);
                    v
                });
                let mut out = Vec::new();
                for (p, ty, name) in list.iter() {
                    let hit = if by_type { ty == want } else { name == want };
                    if !hit {
                        continue;
                    }
                    let Some(n) = Node::at_path(root, p) else {
                        continue;
                    };
                    match child {
                        None => out.push(n),
                        Some(c) => out.extend(n.children().into_iter().filter_map(|i| match i {
                            Item::Node(cn) if cn.name() == c => Some(cn),
                            _ => None,
                        })),
                    }
                }
                out
            }
            Matcher::Expr(e) => {
                let ctx = EvalContext::new(root)
                    .with_focus_path(rpath)
                    .map_err(|err| rule_err(rule, err.to_string()))?;
                e.evaluate(&ctx)
                    .map_err(|err| rule_err(rule, err.to_string()))?
                    .into_iter()
                    .filter_map(|i| match i {
                        Item::Node(n) if n.path().is_some() => Some(n),
                        _ => None,
                    })
                    .collect()
            }
        })
    }
}

/// What the first pass over a resource found: the single walk needs known elements only and
/// no `_x` shadows, and the types of the resources nested in it.
#[derive(Debug, Default)]
struct Shape {
    shadows: bool,
    unknown: bool,
    nested: Vec<String>,
}

/// Repeating elements written as a single object become one-element arrays, as the reference
/// parser reads them and its serializer writes them; notes the resource's [`Shape`].
fn normalise_arrays(v: &mut Json, ty: &str, shape: &mut Shape) {
    let Json::Object(o) = v else { return };
    let model = fhir_model::r4();
    let def = match resource_type_of(o) {
        Some(Json::String(rt)) => model.type_def(rt),
        _ => model.type_def(ty),
    };
    normalise_object(o, def, shape);
}

/// [`normalise_arrays`] on an object of type `def`: one type lookup per object, one key lookup
/// per member.
fn normalise_object(
    o: &mut Map<String, Json>,
    def: Option<&'static fhir_model::TypeDef>,
    shape: &mut Shape,
) {
    let model = fhir_model::r4();
    for (k, child) in o.iter_mut() {
        if k == "resourceType" {
            continue;
        }
        let base = k.strip_prefix('_').unwrap_or(k);
        if base.len() != k.len() {
            shape.shadows = true;
        }
        let Some(c) = def.and_then(|d| d.child(base)) else {
            shape.unknown = true;
            continue;
        };
        if c.element.max_many && !child.is_array() && !child.is_null() {
            *child = Json::Array(vec![child.take()]);
        }
        if k.starts_with('_') {
            continue;
        }
        let mut each = |e: &mut Json| {
            let Json::Object(eo) = e else { return };
            let edef = match resource_type_of(eo) {
                Some(Json::String(rt)) => {
                    shape.nested.push(rt.clone());
                    model.type_def(rt)
                }
                _ => element_type_def(c.type_name),
            };
            normalise_object(eo, edef, shape)
        };
        match child {
            Json::Array(a) => a.iter_mut().for_each(each),
            other => each(other),
        }
    }
}

fn collect_resources(node: &Node<'_>, out: &mut Vec<(NodePath, String, bool)>) {
    for c in node.children() {
        let Item::Node(c) = c else { continue };
        if c.is_resource()
            && let Some(p) = c.path()
        {
            let contained = c.name() == "contained";
            out.push((p, c.fhir_type().to_string(), contained));
        }
        collect_resources(&c, out);
    }
}

/// Descendants without the node itself, stopping at (but including) sub-resources (§3.2 fast path).
fn descendants(node: &Node<'_>, out: &mut Vec<(NodePath, String, String)>) {
    for c in node.children() {
        let Item::Node(c) = c else { continue };
        if let Some(p) = c.path() {
            out.push((p, c.fhir_type().to_string(), c.name().to_string()));
        }
        if !c.is_resource() {
            descendants(&c, out);
        }
    }
}

struct Pass<'e, 'a> {
    engine: &'e Engine,
    root: &'a Json,
    rule: &'e Rule,
    visited: &'e mut HashSet<NodePath>,
    sealed: &'e mut Vec<NodePath>,
    edits: &'e mut Vec<Edit>,
    ops: u8,
    hits: u64,
    today: NaiveDate,
    /// The resources of the input and their patients' offsets (patient scope).
    resources: &'e [(NodePath, String, bool)],
    patient_offsets: &'e [Option<i64>],
}

impl<'a> Pass<'_, 'a> {
    /// Records a method's change to the value at `path`.
    fn change(&mut self, path: &NodePath, change: Change) {
        match change {
            Change::Keep => {}
            Change::Set(v) => self.edits.push(Edit::Set(path.clone(), v)),
            Change::Remove => self.edits.push(Edit::Remove(path.clone())),
        }
    }

    fn is_visited(&self, p: &NodePath) -> bool {
        self.visited.contains(p) || self.sealed.iter().any(|s| p.0.starts_with(&s.0))
    }

    /// `ProcessNodeRecursive`: the node, then its non-resource children.
    fn process(&mut self, node: &Node<'a>, parent_type: &str) -> Result<(), DeidError> {
        let Some(path) = node.path() else {
            return Ok(());
        };
        if self.is_visited(&path) {
            return Ok(());
        }
        self.hits += 1;
        self.apply_method(node, &path, parent_type)?;
        self.visited.insert(path);
        let ty = node.fhir_type();
        for c in node.children() {
            if let Item::Node(c) = c
                && !c.is_resource()
            {
                self.process(&c, ty)?;
            }
        }
        Ok(())
    }

    fn apply_method(
        &mut self,
        node: &Node<'a>,
        path: &NodePath,
        parent_type: &str,
    ) -> Result<(), DeidError> {
        let params = &self.engine.config.parameters;
        let ty = node.fhir_type();
        let text = node.json().and_then(primitive_text);
        match &self.rule.method {
            Method::Keep | Method::Unknown(_) => {}
            Method::Redact | Method::DateShift | Method::CryptoHash | Method::Encrypt => {
                let Some(text) = text else { return Ok(()) };
                let root = self.root;
                let parent = || {
                    if parent_type.is_empty() {
                        parent_of(root, path)
                    } else {
                        parent_type.to_string()
                    }
                };
                let offset = || {
                    // Patient scope: the patient of the innermost resource holding the node.
                    if let Some(o) = self
                        .resources
                        .iter()
                        .rposition(|(rp, _, _)| path.0.starts_with(&rp.0))
                        .and_then(|i| self.patient_offsets[i])
                    {
                        return o;
                    }
                    let prefix = if self.engine.date_shift_prefix.is_empty() {
                        // The ROOT resource's id as it is now (possibly already hashed).
                        root.get("id").and_then(primitive_text).unwrap_or_default()
                    } else {
                        self.engine.date_shift_prefix.clone()
                    };
                    transforms::date_shift_offset(&prefix, &params.date_shift_key)
                };
                match primitive_change(
                    self.rule,
                    params,
                    &text,
                    ty,
                    node.name(),
                    &parent,
                    &offset,
                    self.today,
                )? {
                    None => {}
                    Some((change, ops)) => {
                        self.change(path, change);
                        self.ops |= ops;
                    }
                }
            }
            Method::Perturb { .. } => {
                let Some(target) = methods::perturb_target(ty) else {
                    return Ok(());
                };
                let target_node = match target {
                    PerturbTarget::Number(_) => node.clone(),
                    PerturbTarget::QuantityValue => {
                        let Some(v) = node.children().into_iter().find_map(|c| match c {
                            Item::Node(c) if c.name() == "value" => Some(c),
                            _ => None,
                        }) else {
                            return Ok(());
                        };
                        v
                    }
                };
                let Some(tpath) = target_node.path() else {
                    return Ok(());
                };
                self.sealed.push(path.clone());
                if &tpath != path && self.visited.contains(&tpath) {
                    return Ok(());
                }
                let Some(text) = target_node.json().and_then(primitive_text) else {
                    return Ok(());
                };
                let v = methods::perturb(self.rule, &text, target.kind())?;
                self.edits.push(Edit::Set(tpath, v));
                self.ops |= PERTURB;
            }
            Method::Substitute(with) => {
                if node.is_primitive() {
                    self.change(path, methods::substitute_primitive(with));
                    // Children (id/extension in the shadow) go unless an earlier rule processed them.
                    if let Some(sp) = node.shadow_path()
                        && node.shadow().is_some()
                    {
                        let keep = self.visited.iter().any(|v| v.0.starts_with(&sp.0));
                        if !keep {
                            self.edits.push(Edit::Remove(sp));
                        }
                    }
                } else {
                    let existing = node.json().cloned().unwrap_or(Json::Null);
                    let repl = if with.is_null() {
                        Json::Object(Map::new())
                    } else {
                        with.clone()
                    };
                    if !repl.is_object() {
                        return Err(rule_err(
                            self.rule,
                            format!("replaceWith {repl} is not valid {ty} JSON"),
                        ));
                    }
                    let merged = merge(&existing, path, &repl, self.visited);
                    self.edits.push(Edit::Set(path.clone(), merged));
                }
                self.sealed.push(path.clone());
                self.ops |= SUBSTITUTE;
            }
            Method::Generalize {
                cases,
                keep_other_values,
            } => {
                if !node.is_primitive() {
                    return Err(rule_err(
                        self.rule,
                        format!(
                            "generalize is not applicable to the non-primitive {ty} node {path}"
                        ),
                    ));
                }
                if node.json().is_none_or(|v| v.is_null()) {
                    return Ok(());
                }
                let change =
                    methods::generalize(self.rule, cases, *keep_other_values, self.root, path)?;
                self.change(path, change);
                self.ops |= GENERALIZE;
            }
        }
        Ok(())
    }
}

/// The FHIR type of the node containing `path` (`Age` for `valueAge.value`).
fn parent_of(root: &Json, path: &NodePath) -> String {
    let mut segs = path.0.clone();
    segs.pop();
    if matches!(segs.last(), Some(Segment::Index(_))) {
        segs.pop();
        // An array element: keep the index so the node resolves to the element.
        segs = path.0[..path.0.len() - 1].to_vec();
    }
    Node::at_path(root, &NodePath(segs))
        .map(|n| n.fhir_type().to_string())
        .unwrap_or_default()
}

/// Substitute on a complex node (§2.6): replacement children replace unvisited existing ones;
/// visited descendants and their ancestors survive.
fn merge(existing: &Json, path: &NodePath, repl: &Json, visited: &HashSet<NodePath>) -> Json {
    let has_visited_below = |p: &NodePath| {
        visited
            .iter()
            .any(|v| v.0.len() > p.0.len() && v.0.starts_with(&p.0))
    };
    let (Json::Object(ex), Json::Object(rp)) = (existing, repl) else {
        return if visited.contains(path) {
            existing.clone()
        } else {
            repl.clone()
        };
    };
    let empty = Json::Object(Map::new());
    let mut out = Map::new();
    for (k, ev) in ex {
        let mut cp = path.clone();
        cp.0.push(Segment::Key(k.clone()));
        // A node an earlier rule processed is left untouched (it still consumes a slot).
        if visited.contains(&cp) {
            out.insert(k.clone(), ev.clone());
            continue;
        }
        match (ev, rp.get(k)) {
            (Json::Array(ea), Some(rv)) => {
                let ra: Vec<Json> = match rv {
                    Json::Array(a) => a.clone(),
                    v => vec![v.clone()],
                };
                let mut arr = Vec::new();
                for (i, e) in ea.iter().enumerate() {
                    let mut ip = cp.clone();
                    ip.0.push(Segment::Index(i));
                    if visited.contains(&ip) {
                        arr.push(e.clone());
                    } else if let Some(r) = ra.get(i) {
                        arr.push(merge(e, &ip, r, visited));
                    } else if has_visited_below(&ip) {
                        arr.push(merge(e, &ip, &empty, visited));
                    }
                }
                arr.extend(ra.iter().skip(ea.len()).cloned());
                out.insert(k.clone(), Json::Array(arr));
            }
            (_, Some(rv)) => {
                if visited.contains(&cp) {
                    out.insert(k.clone(), ev.clone());
                } else {
                    out.insert(k.clone(), merge(ev, &cp, rv, visited));
                }
            }
            (_, None) => {
                if visited.contains(&cp) || has_visited_below(&cp) {
                    out.insert(k.clone(), merge(ev, &cp, &empty, visited));
                }
            }
        }
    }
    for (k, rv) in rp {
        if !ex.contains_key(k) {
            out.insert(k.clone(), rv.clone());
        }
    }
    if let Some(rt) = ex.get("resourceType") {
        out.insert("resourceType".into(), rt.clone());
    }
    Json::Object(out)
}

fn get_mut<'j>(root: &'j mut Json, path: &NodePath) -> Option<&'j mut Json> {
    let mut cur = root;
    for s in &path.0 {
        cur = match s {
            Segment::Key(k) => cur.as_object_mut()?.get_mut(k)?,
            Segment::Index(i) => cur.as_array_mut()?.get_mut(*i)?,
        };
    }
    Some(cur)
}

fn apply(root: &mut Json, edits: Vec<Edit>) {
    for e in edits {
        match e {
            Edit::Set(p, v) => {
                if let Some(slot) = get_mut(root, &p) {
                    *slot = v;
                }
            }
            Edit::Remove(p) => {
                let Some((last, parent)) = p.0.split_last() else {
                    continue;
                };
                let parent = NodePath(parent.to_vec());
                match (last, get_mut(root, &parent)) {
                    (Segment::Key(k), Some(Json::Object(o))) => {
                        o.shift_remove(k);
                    }
                    (Segment::Index(i), Some(Json::Array(a))) => {
                        if let Some(slot) = a.get_mut(*i) {
                            *slot = Json::Null;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Cleans one member of an object; returns whether it is empty (to be removed). Empty array
/// slots are dropped unless a `_x` sibling pairs with them by position (`keep_slots`).
fn cleanup_member(child: &mut Json, keep_slots: bool) -> bool {
    match child {
        Json::Array(a) => {
            let mut all_empty = true;
            for e in a.iter_mut() {
                let er = e.as_object().is_some_and(|o| resource_type_of(o).is_some());
                if cleanup(e, er) {
                    *e = Json::Null;
                } else {
                    all_empty = false;
                }
            }
            if !keep_slots {
                a.retain(|e| !e.is_null());
            }
            all_empty
        }
        c => {
            let r = c.as_object().is_some_and(|o| resource_type_of(o).is_some());
            cleanup(c, r)
        }
    }
}

/// `RemoveEmptyNodes` plus output trimming (§3.7). Returns whether the value is empty.
fn cleanup(v: &mut Json, is_resource: bool) -> bool {
    match v {
        Json::Null => true,
        Json::String(s) => {
            let t = s.trim();
            if t.len() != s.len() {
                *s = t.to_string();
            }
            false
        }
        Json::Object(o) if !o.keys().any(|k| k.starts_with('_')) => {
            // No `_x` shadows (the common case): no sibling to keep array slots for.
            o.retain(|_, child| !cleanup_member(child, false));
            !is_resource && o.is_empty()
        }
        Json::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for k in &keys {
                let sibling = match k.strip_prefix('_') {
                    Some(base) => o.contains_key(base),
                    None => o.contains_key(&format!("_{k}")),
                };
                if let Some(child) = o.get_mut(k)
                    && cleanup_member(child, sibling)
                {
                    o.shift_remove(k);
                }
            }
            !is_resource && o.is_empty()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_is_send_sync() {
        fn f<T: Send + Sync>() {}
        f::<Engine>();
    }

    #[test]
    fn local_today_is_the_clock_date() {
        // Read around the cached read, so that a midnight between them cannot fail the test.
        let before = chrono::Local::now().date_naive();
        let first = local_today();
        let again = local_today();
        let after = chrono::Local::now().date_naive();
        for d in [first, again] {
            assert!(d == before || d == after, "{d} not in {before}..={after}");
        }
    }
}

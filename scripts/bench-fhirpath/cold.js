// The fhirpath.js side of scripts/bench-fhirpath.sh: "cold" FHIRPath evaluation. For each resource
// of the first BUNDLES Synthea bundles, each expression of the list that applies to the resource's
// type is parsed and evaluated once (`fhirpath.evaluate`, which parses on every call), as a
// de-identification or view run that does not keep compiled expressions would do.
// Prints one JSON line: engine, resources, evaluations, items (total and per expression),
// seconds of the timed loop (wall and CPU), peak RSS (KiB).
// Usage: node cold.js EXPRESSIONS.tsv DATA_DIR BUNDLES
'use strict';
const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const fhirpath = require('fhirpath');
const r4 = require('fhirpath/fhir-context/r4');
// Internal modules (not in the package's exports): beside its main file.
const fhirpathSrc = path.dirname(require.resolve('fhirpath'));
const navigation = require(path.join(fhirpathSrc, 'navigation.js'));
const { ResourceNode } = require(path.join(fhirpathSrc, 'types.js'));

const [exprFile, dataDir, bundlesArg] = process.argv.slice(2);
const maxBundles = parseInt(bundlesArg || '10', 10);

// The two functions SQL on FHIR adds, with the semantics of crates/views/src/functions.rs.
function splitReference(text) {
  if (typeof text !== 'string' || text.startsWith('#') || text.startsWith('urn:')) return null;
  let parts = text.split(/[?#]/)[0].split('/');
  if (parts.length >= 4 && parts[parts.length - 2] === '_history') parts = parts.slice(0, -2);
  if (parts.length < 2) return null;
  const ty = parts[parts.length - 2];
  const id = parts[parts.length - 1];
  const typeOk = /^[A-Z]/.test(ty) && r4.resources.includes(ty);
  const idOk = id.length > 0 && id.length <= 64 && /^[A-Za-z0-9.-]+$/.test(id);
  return typeOk && idOk ? [ty, id] : null;
}
// The de-identification engine's nodesByType('T') (docs/specs/anonymizer.md 3.3): the focus and its
// descendants whose FHIR type is T, never entering a child that is a resource (contained), written
// over fhirpath.js's own children() and node types. descendants().ofType(T) differs: it enters
// contained resources, and fhirpath.js types extension nodes System.Object.
function nodesByType(coll, typeName) {
  const ctx = this;
  const out = [];
  const visit = (node) => {
    const info = node.getTypeInfo();
    // fhirpath.js types extension nodes System.Object, with the type name as their node path.
    const name = info.namespace === 'System' && info.name === 'Object' && node.path
      ? r4.path2Type[node.path] || node.path : info.name;
    if (name === typeName) {
      out.push(node);
    }
    for (const child of navigation.children.call(ctx, [node])) {
      if (child.data && typeof child.data === 'object' && child.data.resourceType) continue;
      visit(child);
    }
  };
  for (const node of coll) if (node instanceof ResourceNode) visit(node);
  return out;
}
const userInvocationTable = {
  nodesByType: { fn: nodesByType, arity: { 1: ['String'] }, internalStructures: true },
  getResourceKey: {
    fn: (inputs) => inputs.filter((r) => r && r.resourceType && typeof r.id === 'string').map((r) => r.id),
    arity: { 0: [] },
  },
  getReferenceKey: {
    fn: (inputs, type) => {
      const out = [];
      for (const r of inputs) {
        const split = r && splitReference(r.reference);
        if (split && (!type || type.name === split[0])) out.push(split[1]);
      }
      return out;
    },
    arity: { 0: [], 1: ['TypeSpecifier'] },
  },
};
const options = { userInvocationTable };

const files = fs.readdirSync(dataDir).filter((f) => f.endsWith('.json.gz')).sort().slice(0, maxBundles);
const resources = [];
for (const f of files) {
  const doc = JSON.parse(zlib.gunzipSync(fs.readFileSync(path.join(dataDir, f))).toString('utf8'));
  if (doc.resourceType === 'Bundle') for (const e of doc.entry || []) resources.push(e.resource);
  else resources.push(doc);
}
const exprs = fs.readFileSync(exprFile, 'utf8').split('\n').filter((l) => l).map((l) => {
  const [set, type, js] = l.split('\t');
  return { set, type, js };
});

const items = new Array(exprs.length).fill(0);
let evaluations = 0;
const cpu0 = process.cpuUsage();
const t0 = process.hrtime.bigint();
for (const r of resources) {
  for (let i = 0; i < exprs.length; i++) {
    const e = exprs[i];
    if (e.type !== '*' && e.type !== r.resourceType) continue;
    items[i] += fhirpath.evaluate(r, e.js, null, r4, options).length;
    evaluations++;
  }
}
const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
// CPU time of the whole process (user + system, the engine's thread and V8's helpers).
const cpu = process.cpuUsage(cpu0);
console.log(JSON.stringify({
  engine: 'fhirpath.js',
  resources: resources.length,
  evaluations,
  items_total: items.reduce((a, b) => a + b, 0),
  items,
  seconds,
  cpu_seconds: (cpu.user + cpu.system) / 1e6,
  peak_rss_kib: process.resourceUsage().maxRSS,
}));

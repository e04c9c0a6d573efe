// Evaluates the benchmark expressions with the HL7 JavaScript engine (fhirpath.js) over the same
// resources as benches/fhirpath.rs and prints one line per expression:
// `name<TAB>resources<TAB>items<TAB>ms per pass over all resources` (best pass).
// Usage: node bench.js EXPRESSIONS_FILE DATA_DIR BUNDLES PASSES [REPEAT]
'use strict';
const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const fhirpath = require('fhirpath');
const r4 = require('fhirpath/fhir-context/r4');

const [exprFile, dataDir, bundlesArg, passesArg] = process.argv.slice(2);
const maxBundles = parseInt(bundlesArg || '20', 10);
const passes = parseInt(passesArg || '3', 10);
const repeat = Math.max(1, parseInt(process.argv[6] || '1', 10));

const files = fs.readdirSync(dataDir).filter((f) => f.endsWith('.json.gz')).sort().slice(0, maxBundles);
const resources = [];
for (const f of files) {
  const bundle = JSON.parse(zlib.gunzipSync(fs.readFileSync(path.join(dataDir, f))).toString('utf8'));
  for (const e of bundle.entry || []) resources.push(e.resource);
}

const lines = fs.readFileSync(exprFile, 'utf8').split('\n').filter((l) => l && !l.startsWith('#'));
for (const line of lines) {
  const [name, , jsExpr] = line.split('\t');
  const compiled = fhirpath.compile(jsExpr, r4);
  let items = 0;
  for (const r of resources) items += compiled(r).length; // warm-up and result count
  const times = [];
  for (let p = 0; p < passes; p++) {
    const t0 = process.hrtime.bigint();
    for (const r of resources) for (let k = 0; k < repeat; k++) compiled(r);
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  times.sort((a, b) => a - b);
  console.log(`${name}\t${resources.length}\t${items}\t${(times[0] / repeat).toFixed(2)}`);
}

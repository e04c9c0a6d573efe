// Runs one ViewDefinition over one NDJSON file with the SQL on FHIR reference implementation
// (sof-js, FHIR/sql-on-fhir-v2) and writes CSV: the reference side of scripts/bench-views.sh.
// Streams the input line by line and evaluates batches of BATCH resources (sof-js validates and
// normalises the view once per evaluate() call), so memory stays bounded as on our side.
// Usage: node sof-js-view.mjs SOF_JS_DIR VIEW.json INPUT.ndjson OUT.csv
import { createReadStream, createWriteStream, readFileSync } from 'node:fs'
import readline from 'node:readline'
import { pathToFileURL } from 'node:url'
import path from 'node:path'

const [sofDir, viewPath, input, outPath] = process.argv.slice(2)
const { evaluate, get_columns } = await import(pathToFileURL(path.join(sofDir, 'src', 'index.js')))
const view = JSON.parse(readFileSync(viewPath, 'utf8'))
const columns = get_columns(view).map((c) => c.name)
const BATCH = 1000

const out = createWriteStream(outPath)
const csv = (v) => {
  if (v === null || v === undefined) return ''
  const s = typeof v === 'object' ? JSON.stringify(v) : String(v)
  return /[",\n\r]/.test(s) ? '"' + s.replaceAll('"', '""') + '"' : s
}
let pending = columns.join(',') + '\n'
let resources = 0
let rows = 0
let batch = []

async function flush() {
  for (const row of evaluate(view, batch)) {
    pending += columns.map((c) => csv(row[c])).join(',') + '\n'
    rows++
  }
  batch = []
  if (!out.write(pending)) await new Promise((r) => out.once('drain', r))
  pending = ''
}

const lines = readline.createInterface({ input: createReadStream(input), crlfDelay: Infinity })
for await (const line of lines) {
  if (!line.trim()) continue
  const r = JSON.parse(line)
  resources++
  if (r.resourceType !== view.resource) continue
  batch.push(r)
  if (batch.length >= BATCH) await flush()
}
await flush()
await new Promise((r) => out.end(r))
console.log(JSON.stringify({ resources, rows }))

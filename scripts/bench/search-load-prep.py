"""Prepare the data and queries of scripts/bench-search-load.sh: Synthea Bundles -> NDJSON per type
(urn:uuid references rewritten to Type/id, shared resources once) for `fhirhose load`, batch Bundles
of PUT Type/id entries for the reference server, and queries.tsv (20 query forms x PATIENTS)."""
import collections, glob, gzip, json, os, sys

src, work = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(os.path.join(src, "*.json.gz")) + glob.glob(os.path.join(src, "*.json")))
bundles = []
for f in files:
    opener = gzip.open if f.endswith(".gz") else open
    with opener(f, "rt", encoding="utf-8") as fh:
        bundles.append(json.load(fh))
full = {}
for b in bundles:
    for e in b.get("entry", []):
        r = e["resource"]
        if e.get("fullUrl"):
            full[e["fullUrl"]] = f'{r["resourceType"]}/{r["id"]}'

def fix(node):
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in full:
            node["reference"] = full[ref]
        for v in node.values():
            fix(v)
    elif isinstance(node, list):
        for v in node:
            fix(v)

by_type = collections.defaultdict(list)
seen = set()
os.makedirs(os.path.join(work, "ndjson"), exist_ok=True)
os.makedirs(os.path.join(work, "batches"), exist_ok=True)
for i, b in enumerate(bundles):
    entries = []
    for e in b.get("entry", []):
        r = e["resource"]
        fix(r)
        key = (r["resourceType"], r["id"])
        if key in seen:  # shared Organizations/Practitioners: the first copy only
            continue
        seen.add(key)
        by_type[r["resourceType"]].append(r)
        entries.append({"fullUrl": f'{r["resourceType"]}/{r["id"]}', "resource": r,
                        "request": {"method": "PUT", "url": f'{r["resourceType"]}/{r["id"]}'}})
    # batches of at most 500 entries
    for j in range(0, len(entries), 500):
        with open(os.path.join(work, "batches", f"{i:04d}-{j // 500}.json"), "w") as out:
            json.dump({"resourceType": "Bundle", "type": "batch", "entry": entries[j:j + 500]}, out)
for t, rs in by_type.items():
    with open(os.path.join(work, "ndjson", f"{t}.ndjson"), "w") as out:
        for r in rs:
            out.write(json.dumps(r, separators=(",", ":")) + "\n")
print("resources:", sum(len(v) for v in by_type.values()), dict((k, len(v)) for k, v in sorted(by_type.items())))

# The 20 query forms, each instantiated for PATIENTS patients (every 10th Patient by id order).
TEMPLATES = [
    ("patient-by-family", "Patient?family={family}"),
    ("patient-gender-birthdate", "Patient?gender={gender}&birthdate=ge1960-01-01&_count=50"),
    ("obs-by-patient", "Observation?patient=Patient/{pid}&_count=50"),
    ("obs-patient-code", "Observation?patient=Patient/{pid}&code=http://loinc.org|8302-2&_count=50"),
    ("obs-patient-category", "Observation?patient=Patient/{pid}&category=vital-signs&_count=50"),
    ("obs-patient-date", "Observation?patient=Patient/{pid}&date=ge2015-01-01&date=lt2020-01-01&_count=50"),
    ("obs-by-code", "Observation?code=http://loinc.org|{loinc}&_count=50"),
    ("obs-code-date", "Observation?code=http://loinc.org|8867-4&date=ge{year}-01-01&date=lt{year2}-01-01&_count=50"),
    ("obs-code-value", "Observation?code=http://loinc.org|29463-7&value-quantity=gt{weight}&_count=50"),
    ("condition-by-patient", "Condition?patient=Patient/{pid}&_count=50"),
    ("condition-by-code", "Condition?code=http://snomed.info/sct|{snomed}&_count=50"),
    ("encounter-by-patient", "Encounter?patient=Patient/{pid}&_count=50"),
    ("encounter-patient-date", "Encounter?patient=Patient/{pid}&date=ge2010-01-01&_count=50"),
    ("encounter-include-practitioner", "Encounter?patient=Patient/{pid}&_include=Encounter:practitioner&_count=50"),
    ("medreq-include-requester", "MedicationRequest?patient=Patient/{pid}&_include=MedicationRequest:requester&_count=50"),
    ("procedure-by-patient", "Procedure?patient=Patient/{pid}&_count=50"),
    ("immunization-by-patient", "Immunization?patient=Patient/{pid}&_count=50"),
    ("diagreport-include-result", "DiagnosticReport?patient=Patient/{pid}&_include=DiagnosticReport:result&_count=50"),
    ("obs-chained-family", "Observation?patient.family={family}&code=http://loinc.org|8302-2&_count=50"),
    ("condition-chained-gender", "Condition?patient.gender={gender}&code=http://snomed.info/sct|{snomed}&_count=50"),
]
patients = sorted(by_type["Patient"], key=lambda p: p["id"])
n = int(os.environ.get("PATIENTS", "10"))
picked = patients[:: max(1, len(patients) // n)][:n]
loincs = ["8867-4", "72514-3", "85354-9", "8302-2", "29463-7", "9279-1", "39156-5", "72166-2"]
snomeds = ["444814009", "195662009", "10509002", "162864005", "72892002"]
with open(os.path.join(work, "queries.tsv"), "w") as out:
    for k, p in enumerate(picked):
        values = {"pid": p["id"], "family": p["name"][0]["family"], "gender": p["gender"],
                  "loinc": loincs[k % len(loincs)], "snomed": snomeds[k % len(snomeds)],
                  "year": 2012 + k, "year2": 2013 + k, "weight": 60 + 3 * k}
        for name, t in TEMPLATES:
            out.write(f"{name}\t{t.format(**values)}\n")
print("queries:", len(picked) * len(TEMPLATES))

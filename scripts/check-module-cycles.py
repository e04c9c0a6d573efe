#!/usr/bin/env python3
"""Fails when the top-level modules of a crate import each other in a circle (issue 23 item 5).

For every crate under crates/, each top-level module (src/NAME.rs or src/NAME/) gets an edge to
every other top-level module its non-test code names: `crate::NAME`, `crate::{NAME, ...}`,
`super::super::NAME` from a file one level down, and items re-exported by lib.rs/main.rs
(`pub use NAME::Item;` makes `crate::Item` an edge to NAME). Comments (doc links included) and
`#[cfg(test)]` modules at the end of a file do not count. Prints each cycle (a strongly connected
component of more than one module) and exits 1 if there is any.

Usage: scripts/check-module-cycles.py [CRATES_DIR]      (default: crates/ beside this script)
"""

import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip(text):
    """The file without its trailing test module and without comments."""
    m = re.search(r"^\s*#\[cfg\(test\)\]\s*\n\s*(pub\s+)?mod\s+\w+\s*\{", text, re.M)
    if m:
        text = text[: m.start()]
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def group_names(text, start):
    """The first identifiers of each path in the brace group opening at text[start] == '{'."""
    names, depth, expect = [], 0, True
    i = start
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
            expect = depth == 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        elif c == "," and depth == 1:
            expect = True
        elif expect and depth == 1:
            m = re.match(IDENT, text[i:])
            if m:
                names.append(m.group(0))
                expect = False
                i += len(m.group(0))
                continue
        i += 1
    return names


def references(text):
    names = set(re.findall(r"\bcrate::(" + IDENT + r")\b(?!\s*!)", text))
    for m in re.finditer(r"\bcrate::\{", text):
        names.update(group_names(text, m.end() - 1))
    return names


def reexports(root_text, modules):
    """Item name -> module, from `pub use MODULE::...;` at the crate root."""
    out = {}
    for m in re.finditer(r"\buse\s+(?:crate::)?(" + IDENT + r")::([^;]*);", root_text):
        module, rest = m.group(1), m.group(2)
        if module not in modules:
            continue
        for name in re.findall(IDENT, rest):
            if name not in ("self", "super", "crate", "as") and name not in modules:
                out.setdefault(name, module)
    return out


def cycles(graph):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def crate_graph(src):
    roots = [f for f in ("lib.rs", "main.rs") if os.path.isfile(os.path.join(src, f))]
    files = {}
    for dirpath, _, filenames in os.walk(src):
        for f in filenames:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src).split(os.sep)
            if len(rel) == 1 and f in ("lib.rs", "main.rs"):
                continue
            if rel[0] == "bin":
                continue
            module = rel[0][:-3] if len(rel) == 1 else rel[0]
            files.setdefault(module, []).append((len(rel), os.path.join(dirpath, f)))
    modules = set(files)
    root_text = "".join(strip(open(os.path.join(src, r), encoding="utf-8").read()) for r in roots)
    items = reexports(root_text, modules)
    graph = {}
    for module, paths in files.items():
        edges = set()
        for depth, path in paths:
            text = strip(open(path, encoding="utf-8").read())
            names = references(text)
            if depth == 2:
                names.update(re.findall(r"\bsuper::super::(" + IDENT + r")\b", text))
            for n in names:
                target = n if n in modules else items.get(n)
                if target and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    crates = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "crates")
    bad = 0
    checked = 0
    for crate in sorted(os.listdir(crates)):
        src = os.path.join(crates, crate, "src")
        if not os.path.isdir(src):
            continue
        checked += 1
        for comp in cycles(crate_graph(src)):
            bad += 1
            print(f"module cycle in {crate}: {' <-> '.join(comp)}")
    if bad:
        print(f"{bad} module cycle(s) in {checked} crates (ARCHITECTURE.md: no module imports a module that imports it back)")
        return 1
    print(f"no module cycles in {checked} crates")
    return 0


if __name__ == "__main__":
    sys.exit(main())

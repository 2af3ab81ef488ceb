#!/usr/bin/env python3
"""Lists the module dependency edges of a crate's src/ (from `crate::`/`super::` paths in code,
comments ignored) and reports import circles.

Usage: scripts/module-deps.py [crates/cairn/src]

Edges are drawn between top-level modules (`api`, `runtime`, ...) and between files. A module
may use its own children (`sources` -> `sources::queue`); every other edge counts, so a child
that uses its parent while the parent uses it is a circle. Paths through the crate root's
re-exports (`crate::Error`) are resolved to the module the item comes from.
"""
import os, re, sys
from collections import defaultdict

src = sys.argv[1] if len(sys.argv) > 1 else "crates/cairn/src"

def module_of(path):
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    return [] if rel == ["lib"] else rel

files = {}
for d, _, fs in os.walk(src):
    for f in fs:
        if f.endswith(".rs"):
            p = os.path.join(d, f)
            files["::".join(module_of(p)) or "lib"] = open(p).read()

def code(text):
    return "\n".join(l.split("//")[0] for l in text.splitlines())

# Root re-exports: name -> module path it comes from.
root = {}
for m in re.finditer(r"pub use ([a-z_:]+)::\{([^}]*)\}|pub use ([a-z_:]+)::([A-Za-z_]+)\s*;", code(files["lib"])):
    if m.group(1):
        for name in m.group(2).replace("\n", " ").split(","):
            name = name.strip().split(" as ")[-1]
            if name:
                root[name] = m.group(1)
    else:
        root[m.group(4)] = m.group(3)

known = set(files)

def resolve(parts):
    """The longest known module prefix of a `crate::` path."""
    if parts and parts[0] in root:
        parts = root[parts[0]].split("::") + parts[1:]
    best = None
    for i in range(1, len(parts) + 1):
        if "::".join(parts[:i]) in known:
            best = "::".join(parts[:i])
    return best

file_edges, top_edges = set(), set()
for name, text in files.items():
    mod = [] if name == "lib" else name.split("::")
    for m in re.finditer(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)", code(text)):
        parts = m.group(2).strip(":").split("::")
        if m.group(1) == "super":
            # `super` of a file is its parent module (of mod.rs: the grandparent).
            parent = mod[:-1]
            parts = parent + parts
        target = resolve(parts)
        if target is None or target == name:
            continue
        if target.startswith(name + "::") or name == "lib":
            continue  # a module may use its own children
        file_edges.add((name, target))
        a, b = name.split("::")[0], target.split("::")[0]
        if a != b:
            top_edges.add((a, b))

def cycles(edges):
    g = defaultdict(set)
    for a, b in edges:
        g[a].add(b)
    found, seen = [], set()
    def dfs(n, stack):
        for m in sorted(g[n]):
            if m in stack:
                c = stack[stack.index(m):] + [m]
                key = frozenset(c)
                if key not in seen:
                    seen.add(key)
                    found.append(c)
            elif len(stack) < 12:
                dfs(m, stack + [m])
    for n in sorted(g):
        dfs(n, [n])
    return found

print("top-level module edges:")
for a, b in sorted(top_edges):
    print(f"  {a} -> {b}")
print("file edges:")
for a, b in sorted(file_edges):
    print(f"  {a} -> {b}")
bad = cycles(top_edges) + cycles(file_edges)
for c in bad:
    print("CIRCLE: " + " -> ".join(c))
print("no circles" if not bad else f"{len(bad)} circle(s)")
sys.exit(1 if bad else 0)

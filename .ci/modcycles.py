#!/usr/bin/env python3
"""Import circles between the top-level modules of a Rust library crate.

Usage: modcycles.py [CRATE_SRC_DIR]   (default: src, the daemon crate)

Reads the module tree from lib.rs (`mod` declarations, inline `mod x { ... }` blocks
included), collects every `crate::...` and `super::...` path in code (comments and string
literals are blanked first; `use crate::{a, b::c}` groups are split), and folds each module
into its top-level parent (`crate::link::proxy` counts as `crate::link`). An edge A -> B is
"code in A names something in B". Every strongly connected group of more than one module is
printed with one shortest cycle through it and each edge of the group with the file:line
that makes it. Exit status 1 when a cycle exists, 0 otherwise, 2 on a usage error.

Why a script of our own rather than `cargo modules`: it needs nothing but Python 3 on the
CI machine, and it reports the line to change, which is what a reviewer acts on.
"""

import os
import re
import sys
from collections import defaultdict, deque

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def blank_non_code(text):
    """The text with comments, string, byte-string, raw-string and char literals replaced
    by spaces (newlines kept), so line numbers still match and nothing quoted or commented
    counts as a path or a brace."""
    out = []
    i, n = 0, len(text)

    def keep_newlines(s):
        return "".join(c if c == "\n" else " " for c in s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(keep_newlines(text[i:j]))
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(text, i)) and not (
            i and (text[i - 1].isalnum() or text[i - 1] == "_")
        ):
            end = '"' + m.group(1)
            j = text.find(end, m.end())
            j = n if j < 0 else j + len(end)
            out.append(keep_newlines(text[i:j]))
            i = j
        elif c == '"' or (c == "b" and text.startswith('b"', i) and not (
            i and (text[i - 1].isalnum() or text[i - 1] == "_")
        )):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            out.append(keep_newlines(text[i:j]))
            i = j
        elif c == "'":
            # A char literal ('x', '\n', '\u{..}', '{') or a lifetime ('a): only the former
            # is blanked.
            m = re.compile(r"'(\\(u\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{2}|.)|[^\\'\n])'").match(text, i)
            if m:
                out.append(" " * (m.end() - i))
                i = m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


MOD_DECL = re.compile(
    r"(?:^|[;{}\s])(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*([;{])"
)
PATH = re.compile(r"(?<![A-Za-z0-9_$])((?:crate|super)(?:\s*::\s*(?:super|self))*)\s*::\s*")


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def group_heads(code, pos):
    """The first segment of each path in a `{a, b::c, d as e}` group starting at pos
    (just after the `{`)."""
    heads, depth, start = [], 0, pos
    i = pos
    while i < len(code):
        c = code[i]
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                heads.append((code[start:i], start))
                return heads
            depth -= 1
        elif c == "," and depth == 0:
            heads.append((code[start:i], start))
            start = i + 1
        i += 1
    return heads


class Crate:
    def __init__(self, src):
        self.src = src
        self.edges = defaultdict(list)  # (from_top, to_top) -> [file:line]
        self.modules = set()
        self.missing = []

    def top(self, path):
        return path[0] if path else None

    def walk_file(self, path, modpath, subdir):
        """Read one file that is module `modpath`; its `mod x;` children live in subdir."""
        with open(path, encoding="utf-8") as f:
            text = f.read()
        code = blank_non_code(text)
        rel = os.path.relpath(path, os.path.dirname(self.src.rstrip("/")) or ".")
        # Inline module blocks: (start, end, name), so each position knows its module path.
        stack, blocks = [], []  # stack of (brace_depth_at_open, name, start)
        depth = 0
        decls = {m.start(1): m for m in MOD_DECL.finditer(code)}
        pending = None
        for i, c in enumerate(code):
            if i in decls and decls[i].group(2) == "{":
                pending = decls[i].group(1)
            if c == "{":
                depth += 1
                if pending is not None:
                    stack.append((depth, pending, i))
                    pending = None
            elif c == "}":
                if stack and stack[-1][0] == depth:
                    d, name, start = stack.pop()
                    blocks.append((start, i, [s[1] for s in stack] + [name]))
                depth -= 1

        def modpath_at(pos):
            best = []
            for start, end, names in blocks:
                if start < pos < end and len(names) > len(best):
                    best = names
            return modpath + best

        for m in decls.values():
            name = m.group(1)
            inner = modpath_at(m.start(1))
            if m.group(2) == "{":
                if len(inner) == 0:
                    self.modules.add(name)
                continue
            # `mod x;` inside inline blocks nests the directory too.
            extra = inner[len(modpath):]
            base = os.path.join(subdir, *extra)
            child = inner + [name]
            if not child[:-1]:
                self.modules.add(name)
            for cand, sub in (
                (os.path.join(base, name + ".rs"), os.path.join(base, name)),
                (os.path.join(base, name, "mod.rs"), os.path.join(base, name)),
            ):
                if os.path.isfile(cand):
                    self.walk_file(cand, child, sub)
                    break
            else:
                self.missing.append(f"{rel}:{line_of(code, m.start(1))}: mod {name}")

        for m in PATH.finditer(code):
            here = modpath_at(m.start())
            segs = [s.strip() for s in re.split(r"::", re.sub(r"\s+", "", m.group(1)))]
            if segs[0] == "crate":
                base = []
            else:
                base = list(here)
            for s in segs:
                if s == "super":
                    if not base:
                        continue  # beyond the root: rustc rejects it anyway
                    base = base[:-1]
                elif s == "self":
                    pass
            rest = m.end()
            if code.startswith("{", rest):
                targets = []
                for head, at in group_heads(code, rest + 1):
                    first = re.match(r"\s*(" + IDENT + r")", head)
                    if first and first.group(1) not in ("self", "super", "crate"):
                        targets.append((base + [first.group(1)], at + first.start(1)))
                    elif first and first.group(1) == "self":
                        targets.append((base, at + first.start(1)))
            else:
                first = re.compile(IDENT).match(code, rest)
                if not first:
                    continue
                targets = [(base + [first.group(0)], m.start())]
            src_top = self.top(here)
            for target, at in targets:
                dst_top = self.top(target)
                if src_top is None or dst_top is None or dst_top == src_top:
                    continue
                site = f"{rel}:{line_of(code, at)}"
                if site not in self.edges[(src_top, dst_top)]:
                    self.edges[(src_top, dst_top)].append(site)

    def load(self):
        root = os.path.join(self.src, "lib.rs")
        if not os.path.isfile(root):
            sys.exit(f"modcycles: no {root}")
        self.walk_file(root, [], self.src)
        # Names that are not modules (a `crate::SomeType` re-exported at the root, or a
        # macro) are not edges between modules.
        self.edges = {k: v for k, v in self.edges.items() if k[1] in self.modules}


def strongly_connected(nodes, succ):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
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
            out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(comp, succ):
    """One shortest cycle inside the group, as a list of modules (first == last)."""
    best = None
    members = set(comp)
    for start in comp:
        prev, queue = {start: None}, deque([start])
        while queue:
            v = queue.popleft()
            for w in sorted(succ[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    cycle = list(reversed(path)) + [start]
                    if best is None or len(cycle) < len(best):
                        best = cycle
                    queue.clear()
                    break
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
    return best


def main(argv):
    if len(argv) > 2:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    src = argv[1] if len(argv) == 2 else "src"
    crate = Crate(src)
    crate.load()
    for miss in crate.missing:
        print(f"modcycles: module file not found for {miss}", file=sys.stderr)
    if crate.missing:
        return 2
    succ = defaultdict(set)
    for a, b in crate.edges:
        succ[a].add(b)
    groups = [c for c in strongly_connected(crate.modules, succ) if len(c) > 1]
    if not groups:
        print(f"modcycles: no import circle among the {len(crate.modules)} top-level modules of {src}")
        return 0
    for comp in groups:
        cycle = shortest_cycle(comp, succ)
        print(f"import circle: {' -> '.join(cycle)}")
        print(f"  modules in this circle: {', '.join(comp)}")
        for a in comp:
            for b in sorted(succ[a]):
                if b in comp:
                    sites = crate.edges[(a, b)]
                    more = f" (+{len(sites) - 3} more)" if len(sites) > 3 else ""
                    print(f"  {a} -> {b}: {', '.join(sites[:3])}{more}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

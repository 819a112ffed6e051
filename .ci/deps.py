#!/usr/bin/env python3
"""Dependency gate of the fast CI tier: licences and sources of every crate in Cargo.lock.

What `cargo deny check licenses sources` does, without installing it (a fresh machine has
only the Rust toolchain, and compiling cargo-deny costs minutes). The RustSec advisory
database lives on GitHub, which this CI's machines cannot reach, so advisories are not
checked here.

Reads `cargo metadata --locked` on stdin:
  cargo metadata --format-version 1 --locked | python3 .ci/deps.py
Fails (exit 1) naming each crate whose licence expression cannot be satisfied with the
licences below, or that comes from anywhere but crates.io or this workspace.
"""
import json
import re
import sys

# Permissive licences only: what may be linked into a binary shipped to every instance.
ALLOWED = {
    "MIT", "Apache-2.0", "ISC", "BSD-2-Clause", "BSD-3-Clause", "Zlib", "0BSD",
    "Unicode-3.0", "Unicode-DFS-2016", "Unlicense", "BSL-1.0", "bzip2-1.0.6", "CC0-1.0",
}
# Exceptions that only widen what a licence allows.
EXCEPTIONS = {"LLVM-exception"}
CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"


def tokens(expr):
    # Old crates write "MIT/Apache-2.0" for "MIT OR Apache-2.0".
    return re.findall(r"\(|\)|[A-Za-z0-9.+-]+", expr.replace("/", " OR "))


def satisfiable(expr):
    """Whether the SPDX expression can be met with ALLOWED (OR: any side; AND: both)."""
    toks = tokens(expr)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def primary():
        if peek() == "(":
            take()
            value = disjunction()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {expr!r}")
            return value
        name = take()
        ok = name in ALLOWED
        if peek() == "WITH":
            take()
            ok = ok and take() in EXCEPTIONS
        return ok

    def conjunction():
        value = primary()
        while peek() == "AND":
            take()
            value = primary() and value
        return value

    def disjunction():
        value = conjunction()
        while peek() == "OR":
            take()
            value = conjunction() or value
        return value

    value = disjunction()
    if pos != len(toks):
        raise ValueError(f"cannot parse licence expression {expr!r}")
    return value


def main():
    meta = json.load(sys.stdin)
    members = set(meta["workspace_members"])
    problems = []
    for pkg in meta["packages"]:
        name = f'{pkg["name"]} {pkg["version"]}'
        if pkg["id"] in members:
            continue
        if pkg.get("source") != CRATES_IO:
            problems.append(f"{name}: comes from {pkg.get('source')!r}, not crates.io")
        licence = pkg.get("license")
        if not licence:
            problems.append(f"{name}: declares no SPDX licence (license-file: {pkg.get('license_file')!r})")
            continue
        try:
            if not satisfiable(licence):
                problems.append(f"{name}: licence {licence!r} is not among the allowed ({', '.join(sorted(ALLOWED))})")
        except (ValueError, IndexError) as e:
            problems.append(f"{name}: {e}")
    for p in problems:
        print(f"dependency gate: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"dependency gate: {len(meta['packages']) - len(members)} crates, all from crates.io under allowed licences")


if __name__ == "__main__":
    main()

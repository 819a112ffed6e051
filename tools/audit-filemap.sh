#!/usr/bin/env bash
# Prints AUDIT.md's file map: every file that runs as root or decides what root does, its
# trust level and its lines of code (blank lines, comment lines and unit tests — a
# `#[cfg(test)]` module to the end of the file, `tests.rs`, `testutil.rs` — not counted).
# Usage: bash tools/audit-filemap.sh   (from anywhere in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

count() { # FILE: code lines
    awk '
        /^[[:space:]]*#\[cfg\(test\)\]/ { exit }
        /^[[:space:]]*$/ { next }
        /^[[:space:]]*\/\// { next }
        /^[[:space:]]*#( |!|$)/ && FILENAME !~ /\.rs$/ { next }
        { n++ }
        END { print n + 0 }' "$1"
}

level() { # FILE: trust level
    case $1 in
        proto/src/catalogue.rs | proto/src/newtypes.rs | proto/src/request.rs | \
            proto/src/codec.rs | proto/src/stream.rs | proto/src/param_types.rs | proto/src/lib.rs | \
            proto/src/checks.rs | proto/src/signed.rs)
            echo "core: the contract, validated by the helper" ;;
        proto/src/* | shared/src/*) echo "shared, not a boundary" ;;
        helper/src/states/*) echo "root: state module" ;;
        helper/src/upgrade/* | helper/src/upgrade_main.rs) echo "root: installer (opsagent-upgrade)" ;;
        helper/src/*) echo "core: root helper" ;;
        logline/*) echo "core: log escaping (every process)" ;;
        packaging/opsagent-supervise | packaging/userdata.sh) echo "root: shell" ;;
        units/* | polkit/*) echo "root: configuration" ;;
        *) echo "unprivileged" ;;
    esac
}

files=$(git ls-files 'helper/src/*.rs' 'proto/src/*.rs' 'shared/src/*.rs' 'logline/src/*.rs' packaging/opsagent-supervise packaging/userdata.sh units polkit |
    grep -v -E '(^|/)(tests|testutil)(\.rs|/)|tests_[a-z]+\.rs$' | sort)
printf '| file | trust | lines |\n|---|---|---:|\n'
declare -A total
for f in $files; do
    n=$(count "$f")
    l=$(level "$f")
    total[$l]=$((${total[$l]:-0} + n))
    printf '| `%s` | %s | %d |\n' "$f" "$l" "$n"
done
printf '\n| trust level | lines |\n|---|---:|\n'
for l in "${!total[@]}"; do printf '| %s | %d |\n' "$l" "${total[$l]}"; done | sort

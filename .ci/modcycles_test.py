#!/usr/bin/env python3
"""Self-test of modcycles.py on tiny crates written to a temp dir: one with a circle it must
report (with the file:line of each edge), one without, and quoted or commented paths that
must not count."""

import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modcycles.py")


def write_crate(root, files):
    for rel, text in files.items():
        path = os.path.join(root, "src", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def run(root):
    return subprocess.run(
        [sys.executable, SCRIPT, os.path.join(root, "src")],
        capture_output=True,
        text=True,
        check=False,
    )


# a -> b (crate:: path), b's submodule reaches back to a through super::super:: inside an
# inline test module: the circle a -> b -> a. c is only named in a string and a comment.
CYCLE = {
    "lib.rs": "pub mod a;\npub mod b;\npub mod c;\n",
    "a.rs": "use crate::{\n    b::Thing,\n};\npub struct Other;\npub fn f() -> crate::b::Thing {\n    Thing\n}\n",
    "b/mod.rs": "pub mod inner;\npub use inner::Thing;\n",
    "b/inner.rs": (
        "pub struct Thing;\n"
        "#[cfg(test)]\n"
        "mod tests {\n"
        "    fn f() { let _ = '{'; }\n"
        "    use super::super::super::a::Other;\n"
        "}\n"
    ),
    "c.rs": '// crate::a::Other\nconst S: &str = "crate::a::Other";\n',
}

# The same shape with the back edge removed; a group import and self/super paths that stay
# inside one top-level module.
ACYCLIC = {
    "lib.rs": "pub mod a;\npub mod b;\npub mod c;\n",
    "a.rs": "use crate::{b::Thing, c};\npub struct Other;\n",
    "b/mod.rs": "pub mod inner;\npub use self::inner::Thing;\n",
    "b/inner.rs": "pub struct Thing;\nmod tests {\n    use super::super::Thing;\n}\n",
    "c.rs": 'pub fn f() -> &\'static str { "crate::a::Other" } // crate::b\n',
}


class ModCycles(unittest.TestCase):
    def test_reports_a_circle_with_its_sites(self):
        with tempfile.TemporaryDirectory() as root:
            write_crate(root, CYCLE)
            res = run(root)
            self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
            self.assertIn("import circle: a -> b -> a", res.stdout)
            self.assertIn("a -> b: src/a.rs:2, src/a.rs:5", res.stdout)
            self.assertIn("b -> a: src/b/inner.rs:5", res.stdout)
            self.assertNotIn("-> c", res.stdout)

    def test_passes_a_crate_without_circle(self):
        with tempfile.TemporaryDirectory() as root:
            write_crate(root, ACYCLIC)
            res = run(root)
            self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
            self.assertIn("no import circle among the 3 top-level modules", res.stdout)

    def test_missing_module_file_is_an_error(self):
        with tempfile.TemporaryDirectory() as root:
            write_crate(root, {"lib.rs": "mod gone;\n"})
            res = run(root)
            self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
            self.assertIn("src/lib.rs:1: mod gone", res.stderr)


if __name__ == "__main__":
    unittest.main()

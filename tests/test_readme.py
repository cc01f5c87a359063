"""The README's code runs as written, and what it prints is what it says; the repository cites no
document outside itself.

Each ```python block of the README is executed in order in one namespace (the toy model; a block may
use names from an earlier one). A ``print(...)  # -> TEXT`` line must print TEXT: the examples are
ones the toy model gets right (the facts come from the toy world, ``ernie_lab.toy.world``). The
```bash quickstart blocks are what ``.ci/run`` itself does (install, then the test command), so they
are not rerun here.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
EXPECTED = re.compile(r"^print\(.*\)\s+# -> (.*)$")


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2 and all("import ernie_lab as el" in b for b in BLOCKS)


def test_every_python_block_runs_and_prints_what_it_says():
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(BLOCKS, 1):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        expected = [m.group(1).strip() for line in block.splitlines() if (m := EXPECTED.match(line))]
        printed = [line.strip() for line in out.getvalue().splitlines()]
        assert printed == expected, f"block {number} printed {printed}, the README says {expected}"


@pytest.mark.parametrize("name", ["DESIGN", "ANALYSES", "BENCH"])
def test_nothing_cites_a_document_outside_the_repository(name):
    cited = f"{name}.md"
    suffixes = {".py", ".md", ".ipynb", ".yaml", ".toml", ".txt"}
    files = [p for p in ROOT.rglob("*") if p.suffix in suffixes and ".git" not in p.parts]
    files += [ROOT / ".ci" / "run"]
    hits = [str(p.relative_to(ROOT)) for p in files if cited in p.read_text(encoding="utf-8", errors="replace")]
    if not any(p.name == cited for p in files):
        assert hits == [], f"{cited} is not in the repository but is cited by {hits}"

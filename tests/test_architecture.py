"""The package's shape: no import cycles (imports inside functions included) and wings that depend
one way, ``model <- io <- generation <- bench <- analyses <- report <- commands``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ernie_lab"

# rank of each wing or top-level module: a module may import from its own wing or a lower rank only
RANK = {
    "plots": 0,
    "noise": 0,  # bootstrap intervals, discover/evaluate splits, random controls (numpy only)
    "model": 1,
    "io": 2,
    "steering": 2,
    "distributed": 2.5,  # loads checkpoint slices (io); generation and analyses use its broadcast/split
    "generation": 3,
    "interventions": 3,
    "bench": 3.5,  # measures generation (and tensor parallel, quantization, offload); only commands use it
    "recipes": 2,
    "routing": 4,
    "patching": 5,
    "ablation": 5,
    "lens": 5,
    "experts": 6,
    "toy": 7,
    "report": 8,
    "widgets": 9,
    "commands": 10,
    "cli": 11,
}
# the one edge against the direction that the design allows: ErnieMoE.generate/stream delegate to the
# generation wing at call time (as transformers' GenerationMixin), never at module level
ALLOWED_BACK = {("ernie_lab.model.ernie", "ernie_lab.generation.generate")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported ernie_lab module, at module level?)`` for every import statement in the file,
    including those inside functions; ``from pkg import sub`` counts as importing ``pkg.sub``."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in MODULES:
                found.append((name, id(node) in top_level))
    return found


def edges() -> dict[str, set[str]]:
    """Module -> the ernie_lab modules its import statements execute: the target, and each package
    ``__init__`` on the way to it, except the importing module's own packages (already running)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        own = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)}
        for target, _ in imports(path):
            parts = target.split(".")
            graph[mod] |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} - own
    return graph


def wing(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and not parts[1].startswith("_") else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def without_allowed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out = {m: set(t) for m, t in graph.items()}
    for src, dst in ALLOWED_BACK:
        out[src] -= {dst, dst.rsplit(".", 1)[0]}
    return out


def test_no_import_cycles():
    assert find_cycle(without_allowed(edges())) is None, "import cycle"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_wing_has_a_rank():
    assert {wing(m) for m in MODULES} - {None} <= set(RANK)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_dependencies_run_one_way(mod):
    src = wing(mod)
    if src is None:
        return
    for target, _ in imports(MODULES[mod]):
        dst = wing(target)
        if dst is None or dst == src or (mod, target) in ALLOWED_BACK:
            continue
        assert RANK[dst] < RANK[src], f"{mod} imports {target}: {src} may not depend on {dst}"


def test_allowed_back_edge_is_lazy():
    for src, dst in ALLOWED_BACK:
        found = [top for target, top in imports(MODULES[src]) if target == dst]
        assert found and not any(found), f"{src} must import {dst} only inside a function"


def test_files_stay_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"modules over ~400 lines: {long}"

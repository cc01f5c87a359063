"""A report spec is data: it runs Python from a path only with an explicit opt-in (the caller's flag or
the spec's own ``trust_recipes: true``), and bundled recipe names are never shadowed by files in the
current folder."""

from __future__ import annotations

import pytest

from ernie_lab.interventions import load_recipe, recipe_dir
from ernie_lab.report.spec import SpecError, resolve_spec

EVIL = "import pathlib\npathlib.Path('ran').write_text('code ran')\ndef make_hooks(model, **p):\n    return []\n"


def spec_with(recipe: str) -> dict:
    return {
        "datasets": {"d": {"texts": ["a b"]}},
        "analyses": {"r": {"kind": "recipe_comparison", "dataset": "d", "recipe": recipe}},
    }


def test_a_recipe_path_in_a_spec_needs_trust_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text(EVIL)
    for path in ("./evil.py", str(tmp_path / "evil.py")):
        with pytest.raises(SpecError, match="trust-recipes"):
            resolve_spec(spec_with(path))
    assert not (tmp_path / "ran").exists()
    resolve_spec(spec_with("./evil.py"), trust_recipes=True)  # the caller's explicit opt-in
    assert (tmp_path / "ran").read_text() == "code ran"


def test_a_spec_opts_in_only_with_a_real_boolean(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text("def make_hooks(model, **params):\n    return []\n")
    with pytest.raises(SpecError, match="trust-recipes"):
        resolve_spec({**spec_with("./mine.py"), "trust_recipes": False})
    for not_a_bool in ("yes", 1, "true"):
        with pytest.raises(SpecError, match="trust_recipes: must be true or false"):
            resolve_spec({**spec_with("./mine.py"), "trust_recipes": not_a_bool})
    with caplog.at_level("WARNING"):
        resolved = resolve_spec({**spec_with("./mine.py"), "trust_recipes": True})
    assert resolved["trust_recipes"] is True and "running Python code from ./mine.py" in caplog.text


def test_bundled_recipes_are_not_shadowed_by_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("ablate_experts.py", "ablate_experts"):
        (tmp_path / name).write_text(EVIL)
    for name in ("ablate_experts", "ablate_experts.py"):
        assert load_recipe(name).__file__ == str(recipe_dir() / "ablate_experts.py")
    resolve_spec(spec_with("ablate_experts"))
    assert not (tmp_path / "ran").exists()

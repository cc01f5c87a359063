"""Hook recipes: the files of the top-level ``hooks/`` folder (``ernie_lab._hooks`` when installed),
each exposing ``make_hooks(model, **params) -> [(hook_name, fn), ...]`` built on
:mod:`ernie_lab.interventions`. A bundled recipe is named by its file name; a path to your own file is
Python code that runs when loaded (report specs need the caller's opt-in for that). Also available as
``el.interventions.load_recipe`` and friends."""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from types import ModuleType


class RecipeError(ValueError):
    """A recipe path that is not a Python file, or a recipe file that fails to import."""


def recipe_dir() -> Path:
    """The folder of the recipes: ``hooks/`` in a source checkout, ``ernie_lab/_hooks`` when installed."""
    checkout = Path(__file__).resolve().parents[1] / "hooks"
    if (checkout / "__init__.py").exists():
        return checkout
    return Path(str(importlib.resources.files("ernie_lab._hooks")))


def list_recipes() -> list[str]:
    """Names of the recipes in :func:`recipe_dir` (file names without ``.py``)."""
    folder = recipe_dir()
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")) if folder.is_dir() else []


def load_recipe(name_or_path: str | Path) -> ModuleType:
    """Import a recipe: a bundled one by name (``"ablate_experts"``, always from :func:`recipe_dir`,
    never from the current folder) or your own ``.py`` file by path (``"./mine.py"``, a ``Path``).

    The module exposes ``make_hooks(model, **params) -> [(hook_name, fn), ...]``. Raises
    FileNotFoundError (listing the available recipes), RecipeError for a path that is not a ``.py``
    file or a file that fails to import, AttributeError when ``make_hooks`` is missing.
    """
    if not isinstance(name_or_path, str | Path):
        raise TypeError(f"a recipe is a bundled recipe's name or a path, got {name_or_path!r}")
    path = Path(name_or_path)
    if is_recipe_name(name_or_path):
        path = recipe_dir() / f"{path.stem if path.suffix == '.py' else path.name}.py"
        if not path.is_file():
            raise FileNotFoundError(
                f"no recipe {str(name_or_path)!r} in {recipe_dir()}; available: {', '.join(list_recipes()) or 'none'}"
            )
    elif not path.exists():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    elif not path.is_file() or path.suffix != ".py":
        raise RecipeError(f"recipe {path} is not a Python file: a recipe is a .py file defining make_hooks")
    spec = importlib.util.spec_from_file_location(f"ernie_lab_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the recipe's own code: name the file, keep the cause
        raise RecipeError(f"recipe {path} failed to import: {type(err).__name__}: {err}") from err
    if not callable(getattr(module, "make_hooks", None)):
        raise AttributeError(f"recipe {path} defines no make_hooks(model, **params)")
    return module


def is_recipe_name(name_or_path: str | Path) -> bool:
    """True for a bundled recipe's name (a string without a folder separator), False for a path."""
    return isinstance(name_or_path, str) and not any(sep in name_or_path for sep in ("/", "\\"))

"""Resolve a model/tokenizer source to a local directory.

A source is one of: ``"toy"`` (the embedded checkpoint in ``data/toy``), a local directory in the
Hugging Face layout, or a hub id such as ``"baidu/ERNIE-4.5-21B-A3B-PT"`` (downloaded with
``huggingface_hub`` when the network allows).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

TOY = "toy"


def data_dir() -> Path:
    """The project's data folder: ``data/`` in a source checkout, ``ernie_lab/_data`` when installed."""
    checkout = Path(__file__).resolve().parents[2] / "data"
    if (checkout / "__init__.py").exists():
        return checkout
    return Path(str(importlib.resources.files("ernie_lab._data")))


def toy_dir() -> Path:
    """Directory of the embedded toy checkpoint."""
    return data_dir() / "toy"


class SourceError(RuntimeError):
    """A hub id that cannot be downloaded (no network, unknown or gated repo)."""


SRC_FORMS = (
    '"toy" (the embedded toy model), a Hugging Face layout folder, or a hub id (e.g. baidu/ERNIE-4.5-21B-A3B-PT)'
)


def resolve_source(src: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """Return a local directory for ``src``.

    ``allow_patterns`` restricts what is downloaded for a hub id (e.g. only tokenizer files).
    Raises FileNotFoundError for a path that does not exist and SourceError (a RuntimeError) naming the hub id
    when it cannot be downloaded (no network, unknown repo).
    """
    if not isinstance(src, str | Path) or not str(src):
        raise TypeError(f'a model source must be "toy", a folder or a hub id (a non-empty str or Path), got {src!r}')
    if str(src) == TOY:
        path = toy_dir()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the embedded toy checkpoint is missing from {path}")
        return path
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    looks_like_path = path.is_absolute() or str(src).startswith((".", "~")) or str(src).count("/") != 1
    if looks_like_path:
        raise FileNotFoundError(f"no such model directory: {path}; a model source is {SRC_FORMS}")
    return _download(str(src), allow_patterns)


def _download(repo_id: str, allow_patterns: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as err:  # the hub client raises many types (offline, 404, auth)
        raise SourceError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}); "
            f"a model source is {SRC_FORMS}; pass a local folder when offline"
        ) from err

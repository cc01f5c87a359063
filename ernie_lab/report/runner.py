"""Reproducible reports: run the analyses a spec names and write a self-contained folder.

    from ernie_lab.report.runner import run_report
    run_report(None, "out/report", quick=True)      # the packaged default spec: a tour of the toy model

The folder holds ``index.html`` (one page, figures embedded, readable offline), ``figures/*.png``,
``tables/*.csv`` and ``manifest.json`` (versions, checkpoint sha256, the resolved spec, seeds, a
timestamp and the sha256 of every figure and table). It is written into a temporary folder next to
the destination and moved into place at the end, so a failed run leaves nothing half-written.

Reruns give the same bytes: seeds and deterministic torch algorithms for the run, PNGs saved at a
fixed dpi without the (version-bearing) ``Software`` metadata, CSV floats written with a fixed
format; only the timestamp in ``manifest.json`` and ``index.html`` changes. That holds for the same
library versions, hardware and number of CPU threads (recorded in the manifest; the spec's
``threads`` fixes it): a different thread count changes CPU reductions in the last bits.

Spec format and analysis kinds: :mod:`ernie_lab.report.spec`; runners: :mod:`ernie_lab.report.routing`
and :mod:`ernie_lab.report.causal`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import platform
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ernie_lab.io.atomic import check_destination, destination, replace_dir, staging
from ernie_lab.io.sources import resolve_source
from ernie_lab.io.tokenizer import load_tokenizer
from ernie_lab.io.weights import load_model
from ernie_lab.model.config import ErnieConfig
from ernie_lab.report.causal import RUNNERS as CAUSAL
from ernie_lab.report.context import Context, Section
from ernie_lab.report.data import PairBatch, PairData, TextData, pair_batch, resolve_dataset
from ernie_lab.report.experts import RUNNERS as EXPERTS
from ernie_lab.report.html import render
from ernie_lab.report.options import check_against_config
from ernie_lab.report.routing import RUNNERS as ROUTING
from ernie_lab.report.spec import DEFAULT_SPEC, KINDS, SpecError, load_spec, resolve_spec

__all__ = ["run_report", "load_spec", "resolve_spec", "pair_batch", "PairBatch", "SpecError", "DEFAULT_SPEC"]

DPI = 100
FLOAT_FORMAT = "%.8g"  # CSV floats: 8 significant digits, the same text on every rerun
PNG_METADATA = {"Software": None}  # matplotlib writes its version here by default


def run_report(
    spec: dict | str | Path | None,
    out_dir: str | Path,
    quick: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    trust_recipes: bool = False,
    threads: int | None = None,
) -> Path:
    """Run ``spec`` (a dict, a YAML/TOML path, or None for the default spec) and write the report
    folder ``out_dir``; returns its path. ``threads`` (torch CPU threads) overrides the spec's key.

    ``quick=True`` merges the spec's ``quick`` overrides (smaller datasets, fewer layers) for a fast
    run. An existing ``out_dir`` is replaced only when it is empty or an earlier report (its
    ``.ernie_lab.json`` marker, :mod:`ernie_lab.io.atomic`); anything else raises FileExistsError
    unless ``overwrite=True``. Files the earlier report did not write are kept. Spec problems raise
    :class:`~ernie_lab.report.spec.SpecError` before anything is written. Recipes given as file paths
    run only with ``trust_recipes=True`` (or ``trust_recipes: true`` in the spec).
    """

    runners = {**ROUTING, **CAUSAL, **EXPERTS}
    resolved = resolve_spec(spec, quick=quick, trust_recipes=trust_recipes)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise SpecError(f"threads: must be an integer >= 1, got {threads!r}")
        resolved["threads"] = threads  # recorded in the manifest like the spec's own value
    out_dir = destination(out_dir)
    check_destination(out_dir, "report", overwrite)
    tokenizer = load_tokenizer(resolved["tokenizer"] or resolved["model"])
    datasets = {name: resolve_dataset(name, ds, resolved["seed"]) for name, ds in resolved["datasets"].items()}
    _check_dataset_kinds(resolved["analyses"], datasets)
    config = ErnieConfig.from_hf(resolve_source(resolved["model"], allow_patterns=["config.json"]))
    check_against_config(resolved["analyses"], config)  # layers, expert ids, lengths: before the weights load
    model = load_model(resolved["model"], dtype=resolved["dtype"], device=resolved["device"])

    ctx = Context(model, tokenizer, resolved, datasets)
    with staging(out_dir) as tmp:
        (tmp / "figures").mkdir()
        (tmp / "tables").mkdir()
        written = []
        items = list(resolved["analyses"].items())
        with deterministic(resolved["seed"], resolved["threads"]):
            bar = tqdm(items, desc="report", unit="analysis", disable=not progress)
            for sid, options in bar:
                bar.set_postfix_str(sid)
                torch.manual_seed(resolved["seed"])  # each section starts from the same RNG state
                section = Section(sid, options["kind"], options)
                runners[options["kind"]](ctx, options, section)
                written.append(_write_section(section, tmp))
            threads = torch.get_num_threads()
        manifest = _manifest(resolved, quick, datasets, tmp, threads)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        html = render(resolved["title"], resolved, manifest, _dataset_summaries(datasets), written, tmp)
        (tmp / "index.html").write_text(html, encoding="utf-8")
        replace_dir(tmp, out_dir, "report", overwrite=overwrite)
    return out_dir


# --------------------------------------------------------------------------------------- checks
def _check_dataset_kinds(analyses: dict, datasets: dict) -> None:
    """Patching sections need pairs, the others texts: say which section and dataset do not fit."""
    for sid, opts in analyses.items():
        wants_pairs = KINDS[opts["kind"]].family == "patching"
        data = datasets[opts["dataset"]]
        if wants_pairs and not isinstance(data, PairData):
            raise SpecError(
                f"analyses.{sid}: {opts['kind']} needs clean/corrupt pairs; {opts['dataset']!r} holds texts"
            )
        if not wants_pairs and not isinstance(data, TextData):
            raise SpecError(
                f"analyses.{sid}: {opts['kind']} needs texts; {opts['dataset']!r} holds clean/corrupt pairs"
            )


# --------------------------------------------------------------------------------------- determinism
@contextlib.contextmanager
def deterministic(seed: int, threads: int | None = None):
    """Seed torch, numpy and random, use deterministic torch algorithms and, when given, ``threads``
    CPU threads (the number of threads changes CPU reductions in the last bits); restored on exit."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    # warn_only: an op without a deterministic kernel (some CUDA ones) warns instead of failing the report
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.set_num_threads(previous_threads)


# --------------------------------------------------------------------------------------- writing
def _write_section(section, root: Path) -> dict:
    """Save a section's figures and tables under ``root``; the description the HTML page needs."""
    figures, tables = [], []
    for name, fig, caption in section.figures:
        rel = f"figures/{section.id}_{name}.png"
        fig.savefig(root / rel, format="png", dpi=DPI, metadata=PNG_METADATA)
        figures.append({"file": rel, "caption": caption})
    for name, df, caption in section.tables:
        rel = f"tables/{section.id}_{name}.csv"
        df.to_csv(root / rel, index=False, float_format=FLOAT_FORMAT, na_rep="nan", lineterminator="\n")
        tables.append({"file": rel, "caption": caption, "frame": df})
    options = {k: v for k, v in section.options.items() if k != "kind"}
    return {
        "id": section.id,
        "kind": section.kind,
        "options_text": json.dumps(_jsonable(options)),
        "notes": section.notes,
        "figures": figures,
        "tables": tables,
    }


def _jsonable(value: Any) -> Any:
    """Spec values as JSON: mapping keys as strings (YAML allows int keys), other objects via str."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint(spec: dict) -> dict:

    info: dict[str, Any] = {"source": str(spec["model"]), "files": []}
    if spec["hash_checkpoint"]:
        directory = resolve_source(spec["model"])
        info["files"] = [
            {"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.glob("*.safetensors"))
        ]
    return info


def _versions() -> dict:
    import matplotlib
    import pandas

    import ernie_lab

    return {
        "ernie_lab": ernie_lab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "matplotlib": matplotlib.__version__,
    }


def _manifest(spec: dict, quick: bool, datasets: dict, root: Path, threads: int) -> dict:
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(quick),
        "seeds": {"torch": spec["seed"], "numpy": spec["seed"], "random": spec["seed"]},
        "deterministic_algorithms": True,
        "torch_threads": threads,
        "versions": _versions(),
        "platform": platform.platform(),
        "checkpoint": _checkpoint(spec),
        "spec": _jsonable(spec),
        "datasets": {name: _dataset_summary(d) for name, d in datasets.items()},
        "files": {f: sha256_file(root / f) for f in files},
    }


def _dataset_summary(data: TextData | PairData) -> str:
    if isinstance(data, TextData):
        if data.groups is None:
            return f"{len(data.texts)} texts"
        counts = ", ".join(f"{g}: {n}" for g, n in sorted(Counter(data.groups).items()))
        return f"{len(data.texts)} texts in {len(set(data.groups))} groups ({counts})"
    tasks = Counter(str(r.get("task", "-")) for r in data.rows)
    return f"{len(data.rows)} clean/corrupt pairs ({', '.join(f'{t}: {n}' for t, n in sorted(tasks.items()))})"


def _dataset_summaries(datasets: dict) -> list[dict]:
    return [{"name": name, "summary": _dataset_summary(d)} for name, d in datasets.items()]

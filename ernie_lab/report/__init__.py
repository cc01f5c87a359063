"""Reproducible reports: a spec names datasets and analyses; ``run_report`` writes a self-contained
folder (HTML, PNG, CSV, manifest) with the same bytes on a rerun."""

from ernie_lab.report.data import PairBatch, pair_batch
from ernie_lab.report.runner import run_report
from ernie_lab.report.spec import DEFAULT_SPEC, SpecError, load_spec, resolve_spec

__all__ = ["run_report", "load_spec", "resolve_spec", "pair_batch", "PairBatch", "SpecError", "DEFAULT_SPEC"]

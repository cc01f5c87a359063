"""What the report's analysis runners share: the loaded model and datasets, memoised intermediate
results (one routing collection or patching setup serves several sections), and the :class:`Section`
each runner fills with figures, tables and notes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from ernie_lab.patching.grids import PatchingSetup
from ernie_lab.report.data import PairBatch, PairData, TextData, pair_batch
from ernie_lab.report.spec import KINDS, SpecError
from ernie_lab.routing import collect_routing


@dataclass
class Section:
    """One analysis of the report: what it is, and what it produced (in the order added)."""

    id: str
    kind: str
    options: dict
    figures: list[tuple[str, Figure, str]] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return KINDS[self.kind].title

    @property
    def explain(self) -> str:
        return KINDS[self.kind].explain

    @property
    def family(self) -> str:
        return KINDS[self.kind].family

    def figure(self, name: str, fig: Figure, caption: str = "") -> None:
        self.figures.append((name, fig, caption))

    def table(self, name: str, df: pd.DataFrame, caption: str = "") -> None:
        self.tables.append((name, df.reset_index(drop=True), caption))

    def note(self, text: str) -> None:
        self.notes.append(text)


class Context:
    """The model, tokenizer and datasets of one report run, plus a memo of shared results."""

    def __init__(self, model, tokenizer, spec: dict, datasets: dict[str, TextData | PairData]):
        self.model, self.tokenizer, self.spec, self.datasets = model, tokenizer, spec, datasets
        self.batch_size = spec["batch_size"]
        self._memo: dict[Any, Any] = {}

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per key for the whole report."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def has(self, key: Any) -> bool:
        """Whether ``key`` was computed already."""
        return key in self._memo

    def texts(self, name: str) -> TextData:
        data = self.datasets[name]
        if not isinstance(data, TextData):
            raise SpecError(f"dataset {name!r} holds clean/corrupt pairs, but this analysis needs texts")
        return data

    def pairs(self, name: str) -> PairData:
        data = self.datasets[name]
        if not isinstance(data, PairData):
            raise SpecError(f"dataset {name!r} holds texts, but this analysis needs clean/corrupt pairs")
        return data

    def routing(self, name: str):
        """The un-hooked routing of text dataset ``name`` (collected once)."""

        data = self.texts(name)
        return self.memo(
            ("routing", name),
            lambda: collect_routing(
                self.model, data.texts, self.tokenizer, self.batch_size, groups=data.groups, progress=False
            ),
        )

    def moe_layers(self, layers, where: str) -> list[int]:
        """``layers`` (None = every MoE layer, an int, or a list) checked against the model's MoE layers."""
        moe = list(self.model.config.moe_layers)
        if layers is None:
            return moe
        layers = [int(L) for L in ([layers] if isinstance(layers, int) else layers)]
        bad = [L for L in layers if L not in moe]
        if bad:
            raise SpecError(f"{where}: layers {bad} are not MoE layers of the model; MoE layers: {moe}")
        return layers

    def patching(self, opts: dict):
        """(PatchingSetup, PairBatch) for the pairs a patching section names (built once per choice)."""

        key = ("patching", opts["dataset"], opts["task"], opts["n_pairs"])

        def build():
            batch = pair_batch(self.tokenizer, self.pairs(opts["dataset"]).rows, opts["task"], opts["n_pairs"])
            setup = PatchingSetup(
                self.model, batch.clean, batch.corrupt, batch.metric(), tokenizer=self.tokenizer, progress=False,
                seed=self.spec["seed"],
            )  # fmt: skip
            return setup, batch

        return self.memo(key, build)


def describe_pairs(setup, batch: PairBatch) -> str:
    """A few lines on the pairs a patching section used and how its positions are labelled."""
    return (
        f"{len(batch.rows)} pair(s) of task {batch.task!r}, {batch.clean.shape[1]} tokens each, all with one "
        f"token layout: clean and corrupt differ at position(s) {batch.changed} in every pair, so each "
        "position is averaged over pairs where it plays the same role. "
        f"Mean logit difference clean {setup.m_clean:.4f}, corrupt {setup.m_corrupt:.4f}. "
        f"First pair: {batch.rows[0]['clean']!r} -> {batch.rows[0]['answer']!r} vs "
        f"{batch.rows[0]['corrupt']!r} -> {batch.rows[0]['distractor']!r}. "
        "Position labels: the first pair's tokens (␣ = a space), clean/corrupt where they differ, "
        "… where the token varies across pairs."
    )


def normalise_params(value: Any, tokenizer) -> Any:
    """Recipe params from a spec file as Python values: mapping keys that spell integers become ints
    (TOML keys are strings; ``experts: {"1": [0]}`` means layer 1), ``{text: "..."}`` becomes token ids
    ``[1 pos]`` and ``{texts: [...]}`` left-padded ids ``[batch pos]``."""
    if isinstance(value, dict):
        if set(value) == {"text"}:
            return torch.tensor([tokenizer.encode(str(value["text"]))], dtype=torch.long)
        if set(value) == {"texts"}:
            return tokenizer([str(t) for t in value["texts"]])["input_ids"]
        return {_int_key(k): normalise_params(v, tokenizer) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise_params(v, tokenizer) for v in value]
    return value


def _int_key(key: Any) -> Any:
    if isinstance(key, str) and key.lstrip("-").isdigit():
        return int(key)
    return key

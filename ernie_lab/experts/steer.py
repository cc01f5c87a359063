"""Steering doses: what graded expert steering (``el.interventions.steer_experts(..., strength=)``) does to
routing and loss on a dataset, from off (strength 0) to forced (``math.inf``), beside random-expert controls
and with bootstrap intervals over sequences (README, "Noise floors")."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ernie_lab.ablation.core import run_per_sequence
from ernie_lab.ablation.effects import summarise
from ernie_lab.interventions import steer_experts
from ernie_lab.io.datasets import as_sequences
from ernie_lab.noise import DEFAULT_DRAWS, DEFAULT_LEVEL, DEFAULT_N_BOOT, check_interval, control_draws
from ernie_lab.routing import collect_routing

__all__ = ["DEFAULT_STRENGTHS", "steering_dose"]

DEFAULT_STRENGTHS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, math.inf)


def _rate(r, experts: Mapping[int, Sequence[int]]) -> float:
    """Mean over the (layer, expert) pairs of the share of tokens whose selected set holds the expert."""
    rates = [float((r.idx[r.layer_index(L)] == e).any(-1).double().mean()) for L, es in experts.items() for e in es]
    return float(np.mean(rates)) if rates else float("nan")


def steering_dose(
    model,
    dataset: Any,
    on: Mapping[int, Iterable[int]],
    off: Mapping[int, Iterable[int]] | None = None,
    strengths: Iterable[float] = DEFAULT_STRENGTHS,
    *,
    controls: int = DEFAULT_DRAWS,
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Routing and loss under ``steer_experts(model, on, off, strength)`` for each of ``strengths``.

    Columns: strength, on_rate (mean share of tokens selecting each ``on`` expert), off_rate (the same for
    ``off``), nll_base, nll_steered, delta_loss (steered - plain,
    nats per predicted token), ci_low, ci_high (bootstrap over sequences), n_seq, kl, experts, control.
    Control rows (``control=True``): the same number of random ``on`` experts per layer, drawn from those
    neither on nor off, ``controls`` draws averaged (``off`` unchanged); when ``on`` is empty, random
    ``off`` experts instead (steering experts *out*). Costs two passes per strength and
    draw (one for the routing, one for the loss) plus one base pass.
    """
    check_interval(level, n_boot)
    strengths = [float(s) for s in strengths]
    if not strengths or any(not s >= 0 for s in strengths):
        raise ValueError(f"strengths must be numbers >= 0 (math.inf = force), got {strengths}")
    on = {int(L): sorted(int(e) for e in es) for L, es in on.items()}
    off = {int(L): sorted(int(e) for e in es) for L, es in (off or {}).items()}
    n_expert = model.config.moe_num_experts
    # the control steers random experts the same way: random `on` sets (off unchanged), or random `off`
    # sets when only `off` is steered; drawn per layer from the experts neither on nor off
    steer_on = bool(on)
    picked, other = (on, off) if steer_on else (off, on)
    per_layer = {
        L: control_draws(n_expert, [*es, *other.get(L, ())], controls, seed + L, count=len(es))
        for L, es in picked.items()
    }
    drawn = [{L: d[i] for L, d in per_layer.items()} for i in range(controls)]
    sequences = as_sequences(dataset, tokenizer)
    pairs = [(on, off), *(((d, off) if steer_on else (on, d)) for d in drawn)]
    with warnings.catch_warnings():  # filling all k slots is reported once by the caller's own steer_experts
        warnings.simplefilter("ignore", UserWarning)
        hooks = [[steer_experts(model, a, b, strength) if strength else [] for strength in strengths] for a, b in pairs]
    rates = []
    for (a, b), row in zip(pairs, hooks, strict=True):
        for h in row:
            r = collect_routing(model, sequences, batch_size=batch_size, progress=False, fwd_hooks=h)
            rates.append((_rate(r, a), _rate(r, b)))
    flat = [h for row in hooks for h in row]
    per = run_per_sequence(model, sequences, flat, batch_size, progress)
    n = len(strengths)
    ablated = per.ablated.numpy().reshape(len(pairs), n, -1)
    kl = per.kl.numpy().reshape(len(pairs), n, -1)
    rate = np.asarray(rates).reshape(len(pairs), n, 2)
    label = lambda s: "; ".join(f"L{L}: {es}" for L, es in sorted(s.items()))  # noqa: E731
    rows = [(label(picked) if steer_on else f"off {label(picked)}", ablated[0], kl[0], rate[0], False)]
    if drawn:
        random = f"random: {' | '.join(label(d) for d in drawn)}"
        rows.append((random, ablated[1:].mean(0), kl[1:].mean(0), rate[1:].mean(0), True))
    frames = []
    every = np.arange(len(sequences))
    for name, a, k, rt, is_control in rows:
        s = summarise(per, every, a, k, level=level, n_boot=n_boot, seed=seed)
        frames.append(
            pd.DataFrame(
                {
                    "strength": strengths,
                    "on_rate": rt[:, 0],
                    "off_rate": rt[:, 1],
                    "nll_base": s["nll_base"],
                    "nll_steered": s["nll_ablated"],
                    "delta_loss": s["delta_loss"],
                    "ci_low": s["ci_low"],
                    "ci_high": s["ci_high"],
                    "n_seq": s["n_seq"],
                    "kl": s["kl"],
                    "experts": name,
                    "control": is_control,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)

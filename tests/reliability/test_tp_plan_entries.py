"""A ``tp_plan`` entry that matches no module is a named error before anything is read (torch only
warns and leaves the model unsplit on every process: an out-of-memory crash much later on 300B).
The 2-process checks (the same error through ``load_model``, hook results that differ between
processes) run in the single launch of ``tests/distributed/test_tensor_parallel.py``."""

from __future__ import annotations

import pytest
import torch

from ernie_lab.distributed import ColwiseShard, PlanError, auto_plan
from ernie_lab.distributed.hook_check import check_plan
from ernie_lab.model import ErnieConfig, ErnieMoE


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return ErnieMoE(ErnieConfig.preset("tiny"), init=False)


def test_every_entry_must_match_a_module(meta_model):
    from torch.distributed.tensor.parallel import ParallelStyle

    check_plan(meta_model, auto_plan(meta_model.config, 2), ParallelStyle)  # the automatic plan passes
    for bad in ("model.layers.*.self_atn.q_proj", "model.layers.99.mlp", "layers.*.self_attn.q_proj"):
        with pytest.raises(PlanError, match=rf"tp_plan entry '{bad.replace('.', '[.]').replace('*', '[*]')}'"):
            check_plan(meta_model, {bad: ColwiseShard()}, ParallelStyle)
    with pytest.raises(PlanError, match="must be a ParallelStyle"):
        check_plan(meta_model, {"model.layers.0.self_attn.q_proj": "colwise"}, ParallelStyle)
    assert issubclass(PlanError, ValueError)

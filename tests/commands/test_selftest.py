"""``ernie-lab selftest --gpu`` on a machine without CUDA: a clear message, nothing run."""

from __future__ import annotations

import pytest
import torch

from ernie_lab.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_selftest_gpu_without_cuda_says_so(capsys):
    assert main(["selftest", "--gpu"]) == 0
    assert "no CUDA GPU on this machine" in capsys.readouterr().out

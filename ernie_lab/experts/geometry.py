"""Router geometry: how orthogonal the rows of each MoE router are (ERNIE 4.5 trains with a router
orthogonality loss) and whether experts with similar router rows are selected together.

Axes: layer expert d_model. ``u_e = w_e / ||w_e||``; ``cos[i, j] = u_i . u_j`` for i != j.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ernie_lab.experts.saliency import spearman
from ernie_lab.model.checks import moe_layer
from ernie_lab.routing import Routing, coactivation_matrix


def router_cosines(model, layer: int) -> torch.Tensor:
    """``[expert expert]`` cosines of MoE ``layer``'s router rows (fp32; diagonal 1)."""
    layer = moe_layer(model.config, layer)
    u = model.blocks[layer].mlp.gate.weight.detach().float()
    u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return u @ u.T


def router_geometry(model, routing: Routing | None = None) -> pd.DataFrame:
    """Per MoE layer, over the off-diagonal router-row cosines: ``mean_abs_cos``, ``max_abs_cos``,
    ``mean_cos``; with a ``routing`` record (of this model) also ``coact_rho``, Spearman's rho between
    ``cos[i, j]`` and the co-activation count of (i, j), over pairs i < j.
    Columns: layer, mean_abs_cos, max_abs_cos, mean_cos[, coact_rho].
    """
    rows = []
    for L in model.config.moe_layers:
        cos = router_cosines(model, L).double()
        upper = torch.triu_indices(*cos.shape, offset=1)
        off = cos[upper[0], upper[1]]
        row = {
            "layer": L,
            "mean_abs_cos": float(off.abs().mean()),
            "max_abs_cos": float(off.abs().max()),
            "mean_cos": float(off.mean()),
        }
        if routing is not None:
            counts = coactivation_matrix(routing, L, normalise=False)
            row["coact_rho"] = spearman(off.numpy(), counts[upper[0], upper[1]].numpy())
        rows.append(row)
    return pd.DataFrame(rows).astype({"layer": np.int64})

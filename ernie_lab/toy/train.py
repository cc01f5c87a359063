"""Train the embedded toy ERNIE 4.5 MoE on the synthetic corpus.

The model has ERNIE 4.5's exact architecture at a laptop scale (first layer dense, the rest MoE,
16 routed experts top-2, 1 shared expert). Experts are balanced the way ERNIE 4.5 does it,
aux-loss free: after every step each MoE layer's ``e_score_correction_bias`` moves by ``gamma`` toward
balance, ``bias_e += gamma * sign(mean_load - load_e)`` (Wang et al. 2024, "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts"); the bias only affects selection, not the mixing weights.
An optional Switch-style auxiliary loss ``E * sum_e f_e * P_e`` can be added.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.ernie import ErnieMoE

TOY_SHAPE = dict(
    hidden_size=160,
    # the dense first layer: narrow (64, not 256), so token-level work and domain knowledge live in the
    # experts; at 256 it did layer 1's work and zeroing layer 1's routed experts cost 0.16 nats (README)
    intermediate_size=64,
    # layer 0 dense, 1-3 MoE: with 4-5 MoE layers one of them idled (README, runs A-T)
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    # 16 experts top-2: six domains' pairs need not share an expert (with 8, five of six pairs in run W2's
    # layer 1 shared one with another domain; README); chosen over 76 runs, seeds swing the result
    moe_num_experts=16,
    moe_k=2,
    moe_num_shared_experts=1,  # shared width 128 against 2 x 128 routed per token and 16 x 128 stored
    moe_intermediate_size=128,
    moe_layer_start_index=1,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    initializer_range=0.02,
)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 3000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac over ``steps``
    # then this many more steps with the lr falling linearly from ``anneal_lr`` (None: lr * min_lr_frac, where
    # the cosine ends) to 0: a cool-down that refines what the experts hold without reorganising the routing
    # (the first ``steps`` are unchanged)
    anneal_steps: int = 0
    anneal_lr: float | None = None
    # the cool-down's windows (None: batch_size, seq_len as before it); longer windows hold whole long documents
    anneal_batch_size: int | None = None
    anneal_seq_len: int | None = None
    # > 0: the model already holds this many steps of this schedule (weights without optimiser state, e.g.
    # an earlier ``train-toy`` checkpoint): train() skips their data and dropout draws, fills fresh AdamW
    # moments with ``MOMENT_WARMUP`` updates at lr 0, then goes on from this step
    start_step: int = 0
    warmup: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    bias_gamma: float = 2e-3  # correction-bias step per update (aux-loss-free balancing)
    aux_loss_coef: float = 0.0  # optional auxiliary load-balancing loss on top
    # training only: drop each token's shared-expert output with this probability (inverted dropout), so
    # the routed experts cannot lean on the shared one for what they would otherwise both hold
    # (0.3: zeroing any layer's routed experts then costs >= 0.2 nats, runs U-Z; 0.5: Chinese passes the
    # dissociation in all 3 MoE layers as well, run D5; README)
    shared_dropout: float = 0.5
    # the routers (each MoE layer's gate weights and correction bias) do not train in this run's updates while
    # the experts and attention go on learning, so routing moves only with the hidden states the routers read
    # (a continued run: only its own steps; the checkpoint's are as they were)
    freeze_router: bool = False
    seed: int = 0

    def window_shape(self, step: int) -> tuple[int, int]:
        """(sequences, tokens) of the training windows drawn at ``step``."""
        if step < self.steps:
            return self.batch_size, self.seq_len
        return self.anneal_batch_size or self.batch_size, self.anneal_seq_len or self.seq_len

    def anneal_start(self) -> float:
        """The lr the cool-down starts from."""
        return self.lr * self.min_lr_frac if self.anneal_lr is None else self.anneal_lr

    def __post_init__(self):
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {self.anneal_steps}")
        if self.anneal_lr is not None and not self.anneal_lr > 0:  # also rejects nan
            raise ValueError(f"anneal_lr must be > 0 (or None: lr * min_lr_frac), got {self.anneal_lr}")
        for name, low in (("anneal_batch_size", 1), ("anneal_seq_len", 2)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(
                    f"{name} must be >= {low} (or None: as before the cool-down), got {getattr(self, name)}"
                )
        if not 0 <= self.start_step < self.steps + self.anneal_steps:
            raise ValueError(
                f"start_step must be in [0, steps + anneal_steps) = [0, {self.steps + self.anneal_steps}), "
                f"got {self.start_step}"
            )
        if self.freeze_router and self.aux_loss_coef:
            raise ValueError(
                f"aux_loss_coef={self.aux_loss_coef} balances through the routers, which freeze_router holds fixed: "
                "give one of them"
            )
        if not 0 <= self.shared_dropout < 1:  # also rejects nan, which would otherwise switch it off silently
            raise ValueError(f"shared_dropout must be in [0, 1), got {self.shared_dropout}")


# the cool-down's own window shape, and what a continued run (``start_step`` > 0 from a checkpoint) may choose for
# its own steps; every other setting is the checkpoint's
ANNEAL_WINDOW_FIELDS = ("anneal_batch_size", "anneal_seq_len")
COOLDOWN_FIELDS = ("freeze_router", *ANNEAL_WINDOW_FIELDS)

MOMENT_WARMUP = 50  # lr-0 updates that fill fresh AdamW moments when training resumes from weights alone


@dataclass
class TrainLog:
    step: list[int] = field(default_factory=list)  # the schedule's step (a resumed run's lr-0 updates: < start)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    max_vio: list[float] = field(default_factory=list)  # mean over MoE layers of (max load - 1/E)/(1/E)
    seconds: float = 0.0


def toy_config(vocab_size: int, **overrides) -> ErnieConfig:
    """The toy model's config for a tokenizer of ``vocab_size`` tokens."""
    return ErnieConfig(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **{**TOY_SHAPE, **overrides}
    )


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up, cosine decay to ``lr * min_lr_frac`` at ``s.steps``, then the linear cool-down from
    ``s.anneal_start()`` to 0 over ``s.anneal_steps``."""
    if step >= s.steps:
        return s.anneal_start() * (1 - (step - s.steps) / max(1, s.anneal_steps))
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def window_starts(n_tokens: int, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch]`` random start offsets of training windows in a stream of ``n_tokens``."""
    return torch.randint(0, n_tokens - seq_len - 1, (batch,), generator=gen)


def sample_windows(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch seq_len+1]`` random windows of a 1-D token stream (inputs and shifted targets)."""
    starts = window_starts(stream.numel(), batch, seq_len, gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


class _RouterTap:
    """Hooks that record each MoE layer's selections (and probs for the aux loss) during training."""

    def __init__(self, model: ErnieMoE, keep_probs: bool):
        self.idx: dict[int, torch.Tensor] = {}
        self.probs: dict[int, torch.Tensor] = {}
        self.hooks = [("blocks.*.moe.hook_topk_idx", self._save_idx)]
        if keep_probs:
            self.hooks.append(("blocks.*.moe.hook_router_probs", self._save_probs))

    def _save_idx(self, idx, hook):
        self.idx[hook.layer] = idx.detach()

    def _save_probs(self, probs, hook):
        self.probs[hook.layer] = probs


class _SharedDropout:
    """Hook that zeroes each token's shared-expert output with probability ``p`` (rescaling the rest by
    ``1 / (1 - p)``), drawing from its own seeded generator so training stays deterministic."""

    def __init__(self, p: float, seed: int):
        self.p, self.gen = p, torch.Generator().manual_seed(seed + 1)

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen)

    def __call__(self, out: torch.Tensor, hook) -> torch.Tensor:
        keep = self.draw(out.shape[:-1]) >= self.p
        return out * keep.unsqueeze(-1).to(out.dtype) / (1 - self.p)


def _aux_loss(tap: _RouterTap, n_expert: int) -> torch.Tensor:
    """Switch-style balance loss ``E * sum_e f_e * P_e`` averaged over MoE layers."""
    losses = []
    for layer, probs in tap.probs.items():
        f = torch.bincount(tap.idx[layer].flatten(), minlength=n_expert).float()
        f = f / f.sum()
        losses.append(n_expert * (f * probs.mean(dim=(0, 1))).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def update_correction_bias(model: ErnieMoE, idx_by_layer: dict[int, torch.Tensor], gamma: float) -> float:
    """``bias_e += gamma * sign(mean_load - load_e)`` per MoE layer; returns the mean MaxVio before it."""
    vios = []
    for layer, idx in idx_by_layer.items():
        moe = model.blocks[layer].mlp
        load = torch.bincount(idx.flatten(), minlength=moe.n_expert).float()
        moe.moe_statics.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        vios.append(((load.max() - load.mean()) / load.mean()).item())
    return sum(vios) / max(1, len(vios))


def train(
    model: ErnieMoE,
    stream: torch.Tensor,
    settings: TrainSettings = TrainSettings(),
    progress: bool = True,
) -> TrainLog:
    """Train ``model`` in place on random windows of the token ``stream`` ``[n_tokens]`` for
    ``steps + anneal_steps`` updates (from ``start_step`` on, after ``MOMENT_WARMUP`` lr-0 updates, when
    that is > 0); returns the log.

    Deterministic for a fixed seed, machine and thread count.
    """
    s = settings
    longest = max(s.seq_len, s.anneal_seq_len or 0)
    if stream.numel() <= longest + 1:
        raise ValueError(f"token stream of {stream.numel()} tokens is shorter than seq_len + 2 = {longest + 2}")
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "gate.weight" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "gate.weight" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    tap = _RouterTap(model, keep_probs=s.aux_loss_coef > 0)
    hooks = list(tap.hooks)
    dropout = _SharedDropout(s.shared_dropout, s.seed) if s.shared_dropout > 0 else None
    if dropout:
        hooks.append(("blocks.*.moe.hook_shared_out", dropout))
    for step in range(s.start_step):  # the draws of the steps the model already holds, in their order
        shape = s.window_shape(step)
        window_starts(stream.numel(), *shape, gen)
        for _ in model.config.moe_layers if dropout else ():
            dropout.draw(shape)
    warm = MOMENT_WARMUP if s.start_step else 0
    log = TrainLog()
    start = time.perf_counter()
    frozen = []  # the gates this run freezes (a caller's own frozen parameters stay as they are)
    if s.freeze_router:
        frozen = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight") and p.requires_grad]
    for p in frozen:  # no gradient: AdamW skips them and the clipping norm leaves them out
        p.requires_grad_(False)
    model.train()
    bar = tqdm(range(s.start_step - warm, s.steps + s.anneal_steps), desc="train-toy", disable=not progress)
    try:
        with model.hooks(hooks):
            for step in bar:
                lr = lr_at(step, s) if step >= s.start_step else 0.0
                for group in opt.param_groups:
                    group["lr"] = lr
                # the lr-0 moment warm-up draws the windows of the step it precedes
                window = sample_windows(stream, *s.window_shape(max(step, s.start_step)), gen)
                logits = model(window[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
                total = loss
                if s.aux_loss_coef:
                    total = loss + s.aux_loss_coef * _aux_loss(tap, model.config.moe_num_experts)
                opt.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
                opt.step()
                vio = update_correction_bias(model, tap.idx, 0.0 if s.freeze_router else s.bias_gamma)
                log.step.append(step)
                log.loss.append(loss.item())
                log.lr.append(lr)
                log.max_vio.append(vio)
                bar.set_postfix(loss=f"{loss.item():.3f}", maxvio=f"{vio:.2f}")
    finally:  # the model is the caller's: leave its parameters trainable as they were
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    log.seconds = time.perf_counter() - start
    return log

"""``ernie-lab train-toy --out DIR``: train the embedded toy model from scratch (CPU, ~20 min on 1 thread)."""

from __future__ import annotations

import argparse
import dataclasses

from ernie_lab.commands import add_threads_option, apply_threads
from ernie_lab.toy.train import TrainSettings


def add_parser(sub) -> argparse.ArgumentParser:
    defaults = TrainSettings()
    p = sub.add_parser("train-toy", help="train the toy ERNIE MoE on the synthetic corpus")
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaced atomically)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--bias-gamma", type=float, default=defaults.bias_gamma, help="correction-bias step")
    p.add_argument("--aux-loss-coef", type=float, default=defaults.aux_loss_coef)
    p.add_argument(
        "--shared-dropout",
        type=float,
        default=defaults.shared_dropout,
        help="probability of dropping a token's shared-expert output in training, in [0, 1)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--n-docs", type=int, default=None, help="corpus size in documents")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation and model card")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace --out even when it is not an earlier toy model")
    add_threads_option(p)
    return p


def check_args(args) -> None:
    """Ranges of the numeric options, checked before any work."""
    rules = [
        ("steps", 1),
        ("batch_size", 1),
        ("seq_len", 2),
        ("n_docs", 1),
    ]
    for name, low in rules:
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for name in ("lr", "bias_gamma", "aux_loss_coef"):
        value = getattr(args, name)
        if not value >= 0 or (name == "lr" and value == 0):  # also rejects nan
            raise ValueError(f"--{name.replace('_', '-')} must be {'> 0' if name == 'lr' else '>= 0'}, got {value}")
    if not 0 <= args.shared_dropout < 1:  # also rejects nan
        raise ValueError(f"--shared-dropout must be in [0, 1), got {args.shared_dropout}")


def run(args) -> int:
    from ernie_lab.toy.build import DEFAULT_N_DOCS, build_toy

    check_args(args)

    apply_threads(args.threads, "train-toy")
    settings = dataclasses.replace(
        TrainSettings(),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        bias_gamma=args.bias_gamma,
        aux_loss_coef=args.aux_loss_coef,
        shared_dropout=args.shared_dropout,
        seed=args.seed,
        warmup=min(TrainSettings().warmup, max(1, args.steps // 10)),
    )
    out = build_toy(
        args.out,
        settings,
        n_docs=args.n_docs or DEFAULT_N_DOCS,
        evaluate=not args.no_eval,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0

"""``ernie-lab train-toy --out DIR``: train the embedded toy model from scratch (CPU, ~20 min on 1 thread),
or continue an earlier checkpoint's run with ``--init-from CKPT --anneal-steps N``."""

from __future__ import annotations

import argparse
import dataclasses

from ernie_lab.commands import add_threads_option, apply_threads
from ernie_lab.toy.train import ANNEAL_WINDOW_FIELDS, COOLDOWN_FIELDS, TrainSettings

# options whose values an --init-from checkpoint's metrics.json supplies instead
SCHEDULE_OPTIONS = ("steps", "batch_size", "seq_len", "lr", "bias_gamma", "aux_loss_coef", "shared_dropout", "seed")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train-toy", help="train the toy ERNIE MoE on the synthetic corpus")
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaced atomically)")
    p.add_argument("--steps", type=int, default=None, help="cosine-schedule steps (default 3000)")
    p.add_argument(
        "--anneal-steps",
        type=int,
        default=None,
        help="after --steps, this many steps with the lr falling linearly to 0 (default 0)",
    )
    p.add_argument(
        "--anneal-lr",
        type=float,
        default=None,
        help="lr the --anneal-steps start from (default: where the cosine ends, lr x 0.1)",
    )
    p.add_argument(
        "--anneal-batch-size", type=int, default=None, help="sequences per cool-down step (default: --batch-size)"
    )
    p.add_argument("--anneal-seq-len", type=int, default=None, help="tokens per cool-down window (default: --seq-len)")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="CKPT",
        help="continue an earlier train-toy checkpoint's run (its weights; schedule and corpus from its "
        "metrics.json) through --anneal-steps",
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--bias-gamma", type=float, default=None, help="correction-bias step")
    p.add_argument("--aux-loss-coef", type=float, default=None)
    p.add_argument(
        "--shared-dropout",
        type=float,
        default=None,
        help="probability of dropping a token's shared-expert output in training, in [0, 1)",
    )
    p.add_argument(
        "--freeze-router",
        action="store_true",
        help="the routers (gate weights, correction bias) do not train in this run's steps (with --init-from: "
        "the continued steps); experts and attention go on learning",
    )
    p.add_argument("--seed", type=int, default=None)
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
        ("anneal_steps", 0),
        ("batch_size", 1),
        ("seq_len", 2),
        ("anneal_batch_size", 1),
        ("anneal_seq_len", 2),
        ("n_docs", 1),
    ]
    if args.init_from is not None:
        given = [name for name in (*SCHEDULE_OPTIONS, "n_docs") if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(
                f"{flags} cannot be combined with --init-from: the continued run keeps its checkpoint's "
                "settings (metrics.json); give only --anneal-steps (and --anneal-lr, --anneal-batch-size, "
                "--anneal-seq-len, --freeze-router)"
            )
        if not args.anneal_steps:
            raise ValueError("--init-from needs --anneal-steps >= 1: the steps to train past the checkpoint")
    shaped = [f"--{n.replace('_', '-')}" for n in ANNEAL_WINDOW_FIELDS if getattr(args, n) is not None]
    if shaped and not args.anneal_steps:
        raise ValueError(f"{', '.join(shaped)} shape the cool-down's windows: give --anneal-steps >= 1 with it")
    if args.freeze_router:
        clash = [f"--{n.replace('_', '-')}" for n in ("bias_gamma", "aux_loss_coef") if getattr(args, n) is not None]
        if clash:
            raise ValueError(
                f"{', '.join(clash)} cannot be combined with --freeze-router: both act on the routers, which "
                "--freeze-router holds fixed"
            )
    for name, low in rules:
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for name, positive in (("lr", True), ("anneal_lr", True), ("bias_gamma", False), ("aux_loss_coef", False)):
        value = getattr(args, name)
        if value is not None and not (value > 0 if positive else value >= 0):  # also rejects nan
            raise ValueError(f"--{name.replace('_', '-')} must be {'> 0' if positive else '>= 0'}, got {value}")
    if args.shared_dropout is not None and not 0 <= args.shared_dropout < 1:  # also rejects nan
        raise ValueError(f"--shared-dropout must be in [0, 1), got {args.shared_dropout}")


def settings_from_args(args) -> TrainSettings:
    """The training settings the parsed options ask for (TrainSettings' defaults where none is given)."""
    given = {name: getattr(args, name) for name in (*SCHEDULE_OPTIONS, "anneal_steps", "anneal_lr", *COOLDOWN_FIELDS)}
    settings = dataclasses.replace(TrainSettings(), **{k: v for k, v in given.items() if v is not None})
    return dataclasses.replace(settings, warmup=min(TrainSettings().warmup, max(1, settings.steps // 10)))


def run(args) -> int:
    from ernie_lab.toy.build import DEFAULT_N_DOCS, build_toy, continued_run

    check_args(args)
    if args.init_from is not None:
        # a bad checkpoint is named before any work
        cooldown = {name: getattr(args, name) for name in COOLDOWN_FIELDS}
        continued_run(args.init_from, args.anneal_steps, args.anneal_lr, **cooldown)

    apply_threads(args.threads, "train-toy")
    settings = settings_from_args(args)
    out = build_toy(
        args.out,
        settings,
        init_from=args.init_from,
        n_docs=args.n_docs or DEFAULT_N_DOCS,
        evaluate=not args.no_eval,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0

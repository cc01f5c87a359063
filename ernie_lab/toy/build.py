"""``ernie-lab train-toy``: corpus -> tokenizer -> trained model -> evaluated checkpoint with a model card.

Everything is written into a temporary folder next to the destination and moved into place at the
end, so an interrupted run leaves no half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from pathlib import Path

import pandas as pd
import torch

from ernie_lab.io.atomic import check_destination, destination, replace_dir, staging
from ernie_lab.io.sources import toy_dir
from ernie_lab.io.tokenizer import load_tokenizer
from ernie_lab.io.weights import load_model as load_model_dir
from ernie_lab.io.weights import save_model
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.plots import new_figure
from ernie_lab.routing import plot_specialisation
from ernie_lab.toy.causal import CRITERIA, dissociation
from ernie_lab.toy.chat import document_pieces
from ernie_lab.toy.corpus import DEFAULT_N_DOCS as TOKENIZER_N_DOCS
from ernie_lab.toy.corpus import training_corpus
from ernie_lab.toy.evaluate import heldout_nll, routing_report, shared_expert_effect, summary_line, task_accuracy
from ernie_lab.toy.prompts import load_prompt_set
from ernie_lab.toy.tokenizer_train import save_tokenizer, train_tokenizer
from ernie_lab.toy.train import (
    ANNEAL_WINDOW_FIELDS,
    COOLDOWN_FIELDS,
    MOMENT_WARMUP,
    TrainSettings,
    toy_config,
    train,
)

DEFAULT_N_DOCS = 30000
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 4], "pad_token_id": 0, "do_sample": False}


def token_stream(tokenizer, docs: list[dict]) -> torch.Tensor:
    """All documents encoded and joined by ``</s>`` into one 1-D stream ``[n_tokens]``.

    Chats are encoded segment by segment (``document_pieces``), exactly as ``chat()`` encodes them.
    """
    eos = tokenizer.eos_token_id
    segments = [document_pieces(d) for d in docs]
    flat = tokenizer.tokenizer.encode_batch([s for doc in segments for s in doc], add_special_tokens=False)
    ids: list[int] = []
    at = 0
    for doc in segments:
        for enc in flat[at : at + len(doc)]:
            ids.extend(enc.ids)
        at += len(doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_toy(
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    n_docs: int = DEFAULT_N_DOCS,
    evaluate: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    init_from: str | Path | None = None,
) -> Path:
    """Train the toy model from scratch and write a complete checkpoint folder to ``out_dir``.

    ``init_from``: an earlier ``build_toy`` checkpoint whose run to continue instead: its weights, and
    the settings and corpus size its metrics.json records, through ``settings.anneal_steps`` (of the
    other fields only ``anneal_lr`` and ``COOLDOWN_FIELDS`` are used); the data and dropout draws of the
    steps it holds are skipped (:func:`~ernie_lab.toy.train.train`'s ``start_step``). ``out_dir`` must be
    absent, empty or an earlier ``build_toy`` output (``overwrite=True`` replaces any folder); it is
    checked before training and again at the final swap (:mod:`ernie_lab.io.atomic`).
    """
    settings = settings or TrainSettings()
    out = destination(out_dir)
    check_destination(out, "toy", overwrite)
    start = None
    if init_from is not None:
        cooldown = {name: getattr(settings, name) for name in COOLDOWN_FIELDS}
        start = continued_run(init_from, settings.anneal_steps, settings.anneal_lr, **cooldown)
    if start is not None:
        settings, n_docs = start["settings"], start["n_docs"]
    with staging(out) as tmp:
        docs = training_corpus(seed=settings.seed, n_docs=n_docs)
        ckpt = tmp / "toy"
        # The tokenizer always comes from the standard corpus, so it equals the shipped one.
        bpe = train_tokenizer(training_corpus(seed=0, n_docs=TOKENIZER_N_DOCS))
        tokenizer = load_tokenizer(save_tokenizer(bpe, tmp / "tokenizer"))
        stream = token_stream(tokenizer, docs)
        if start is None:
            torch.manual_seed(settings.seed)
            model = ErnieMoE(toy_config(tokenizer.vocab_size))
        else:
            if load_tokenizer(start["path"]).tokenizer.get_vocab() != tokenizer.tokenizer.get_vocab():
                raise ValueError(f"{start['path']}'s tokenizer is not the toy corpus tokenizer; cannot continue it")
            model = load_model_dir(start["path"])
            digest = hashlib.sha256((start["path"] / "model.safetensors").read_bytes()).hexdigest()
            start["facts"] = {"sha256": digest, **start["facts"]}
        log = train(model, stream, settings, progress=progress)
        save_model(model, ckpt)
        save_tokenizer(bpe, ckpt)
        (ckpt / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        history = pd.DataFrame({"step": log.step, "loss": log.loss, "lr": log.lr, "max_vio": log.max_vio})
        history.to_csv(ckpt / "training_log.csv", index=False, float_format="%.5f")
        _plot_loss(history).savefig(ckpt / "loss_curve.png", dpi=90)
        facts = {"n_docs": n_docs, "n_tokens": int(stream.numel()), "seconds": round(log.seconds, 1)}
        if start is not None:
            facts["init_from"] = start["facts"]
        if evaluate:
            _write_card(ckpt, model, tokenizer, settings, facts)
        replace_dir(ckpt, out, "toy", overwrite=overwrite)
    return out


def continued_run(init_from: str | Path, anneal_steps: int, anneal_lr: float | None = None, **cooldown) -> dict:
    """What continuing ``init_from`` means: its path, the settings of the continued run, its corpus size
    and the facts the new card records about it (steps it holds, minutes it took; build_toy adds the
    weights' sha256 when it loads them). ``cooldown``: settings of the continued steps (``COOLDOWN_FIELDS``).
    Reads only its metrics.json: cheap enough to check before any work."""
    unknown = set(cooldown) - set(COOLDOWN_FIELDS)
    if unknown:
        raise TypeError(f"continued_run: {sorted(unknown)} are not settings of the continued steps {COOLDOWN_FIELDS}")
    path = toy_dir() if str(init_from) == "toy" else Path(init_from).expanduser().resolve()
    try:
        metrics = json.loads((path / "metrics.json").read_text())
        recorded, n_docs = TrainSettings(**metrics["settings"]), int(metrics["n_docs"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"--init-from {init_from}: not a train-toy checkpoint with a readable metrics.json ({err})"
        ) from err
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"--init-from {init_from}: no model.safetensors there")
    held = recorded.steps + recorded.anneal_steps
    if anneal_steps <= recorded.anneal_steps:
        raise ValueError(
            f"--init-from {init_from} already holds {held} steps ({recorded.anneal_steps} of them annealing); "
            f"--anneal-steps must be > {recorded.anneal_steps} to train past them"
        )
    defaults = {name: getattr(TrainSettings(), name) for name in COOLDOWN_FIELDS}
    if recorded.anneal_steps:  # its cool-down's steps drew windows of its shape: the continued ones do too
        for name in ANNEAL_WINDOW_FIELDS:
            given, held_shape = cooldown.get(name), getattr(recorded, name)
            if given is not None and given != held_shape:
                raise ValueError(
                    f"--init-from {init_from} annealed with {name}={held_shape}; a continued cool-down keeps its "
                    f"window shape (got {given})"
                )
            cooldown[name] = held_shape
    settings = dataclasses.replace(
        recorded, anneal_steps=anneal_steps, anneal_lr=anneal_lr, start_step=held, **{**defaults, **cooldown}
    )
    facts = {"steps": held, "seconds": metrics.get("seconds")}
    return {"path": path, "settings": settings, "n_docs": n_docs, "facts": facts}


def _plot_loss(history: pd.DataFrame):
    fig, ax = new_figure(figsize=(6, 3.2))
    ax.plot(history["step"], history["loss"], lw=0.6, alpha=0.5, label="step")
    ax.plot(history["step"], history["loss"].rolling(25, min_periods=1).mean(), lw=1.5, label="25-step mean")
    title = "toy model training loss"
    if history["step"].iloc[0] != 0:  # a continued run: its lr-0 moment warm-up precedes its first step
        moving = history.loc[history["lr"] > 0, "step"]
        title += f" (continued: steps {moving.iloc[0]}-{moving.iloc[-1]})"
    ax.set(xlabel="step", ylabel="train loss (nats)", title=title)
    ax.legend()
    return fig


def _md(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub markdown table (floats rounded)."""
    cells = [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def _dissociation_section(dis: pd.DataFrame, config, shared: pd.DataFrame, shared_dropout: float) -> str:
    """The card's causal evidence: the dissociation table with intervals, controls and the other domains,
    and what the shared experts carry."""
    c = CRITERIA
    shown = dis.assign(
        experts=dis.experts.map(lambda es: ", ".join(map(str, es))),
        ci=[f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(dis.ci_low, dis.ci_high)],
        passes=dis.passes.map({True: "yes", False: "no"}),
    )[["layer", "domain", "experts", "lift", "delta", "ci", "other", "other_domain", "control", "passes"]]
    zero_all = dis.groupby("layer").zero_all.first()
    missing = _failing(dis, zero_all, shared, shared_dropout)
    return f"""## Do the specialised experts matter? (held-out dissociation)
`el.toy.dissociation(model, tok)`: per MoE layer and domain, the 2 experts with the highest domain lift on
one half of each domain's held-out texts are zero-ablated and measured on the other half. `delta`: the
domain's NLL rise (nats) with its 95% bootstrap interval over texts (`ci`); `other`: the largest rise on
another domain; `control`: the mean rise on the domain when random pairs of the layer's other experts
are zeroed (4 draws). A row passes when delta >= {c["min_delta"]:.2f}, >= {c["other_ratio"]:.0f}x other
and >= {c["control_ratio"]:.0f}x control.

{_md(shown)}

Zeroing every routed expert of a layer raises the overall held-out NLL by
{", ".join(f"L{L} {v:+.3f}" for L, v in zero_all.items())} nats.
{_shared_line(shared)}

## What the toy shows, and what it does not
- Shows: routed experts that carry domain knowledge causally where a row above passes —
  {_passing(dis)}. The Chinese corpus states facts of a fixed table of people (job, city, hobby, age,
  favourite colour, and their friend's city, job and hobby) that only memory can supply.
- Does not show: {missing}. Its {config.moe_num_experts} experts top-{config.moe_k} are not
  ERNIE-4.5's 64 top-6/top-8, and its corpus is synthetic: use it to learn and test the tools, not to make
  claims about ERNIE 4.5.
"""


def _schedule(s: TrainSettings) -> str:
    """The card's words for the optimisation schedule."""
    cool = ""
    if s.anneal_steps:
        shape = s.window_shape(s.steps)
        windows = f" of {shape[0]} x {shape[1]} tokens" if shape != (s.batch_size, s.seq_len) else ""
        cool = f",\n  then {s.anneal_steps} steps{windows} falling linearly from {s.anneal_start():g} to 0"
    return (
        f"{s.steps + s.anneal_steps} steps x {s.batch_size} x {s.seq_len} tokens, AdamW, cosine lr {s.lr} to "
        f"{s.lr * s.min_lr_frac:g} over {s.steps} steps{cool}"
    )


def _anneal_flags(s: TrainSettings) -> str:
    flags = ""
    if s.anneal_steps:
        flags = f" --anneal-steps {s.anneal_steps}"
        flags += f" --anneal-lr {s.anneal_lr:g}" if s.anneal_lr is not None else ""
        flags += f" --anneal-batch-size {s.anneal_batch_size}" if s.anneal_batch_size else ""
        flags += f" --anneal-seq-len {s.anneal_seq_len}" if s.anneal_seq_len else ""
    return flags + (" --freeze-router" if s.freeze_router else "")


def _steps_flags(s: TrainSettings) -> str:
    return f"--steps {s.steps}{_anneal_flags(s)}"


def _training_lines(s: TrainSettings, facts: dict, machine: str, threads: int) -> str:
    """The card's Training and Reproduce bullets; a continued run names the checkpoint it continued."""
    done = f"{facts['seconds'] / 60:.1f} min on {machine}"
    command = f"--out DIR {_steps_flags(s)}\n  --shared-dropout {s.shared_dropout} --seed {s.seed} --threads {threads}"
    init = facts.get("init_from")
    if init:
        before = f" (the checkpoint took {init['seconds'] / 60:.1f} min)" if init.get("seconds") else ""
        done = (
            f"steps {s.start_step}-{s.steps + s.anneal_steps - 1} continue a checkpoint of {init['steps']} steps\n"
            f"  (CKPT: its model.safetensors has sha256 {init['sha256']}) with fresh AdamW moments,\n"
            f"  filled by {MOMENT_WARMUP} lr-0 updates first; {done}{before}"
        )
        command = f"--out DIR --init-from CKPT{_anneal_flags(s)} --threads {threads}"
    balancing = f"aux-loss-free balancing (bias step {s.bias_gamma})"
    if s.freeze_router:
        held = f"steps {s.start_step}-{s.steps + s.anneal_steps - 1}" if s.start_step else "all steps"
        balancing += f";\n  routers (gate weights, correction bias) frozen in {held}"
    return f"""- Training: {_schedule(s)},
  {balancing}, shared-expert dropout {s.shared_dropout},
  seed {s.seed}; corpus {facts["n_docs"]} documents, {facts["n_tokens"]:,} tokens; {done}.
- Reproduce: `ernie-lab train-toy {command}`
  (the same figures with the same CPU kind and thread count: float sums depend on both; on another CPU
  the run drifts from about step 30 and ends as a different draw)"""


def _passing(dis: pd.DataFrame) -> str:
    hits = dis[dis.passes].groupby("domain").layer.apply(lambda ls: "/".join(f"L{L}" for L in sorted(ls)))
    return "; ".join(f"{d} at {ls}" for d, ls in hits.items()) or "no row passes"


def _shared_line(shared: pd.DataFrame) -> str:
    if shared.empty:
        return "The model has no shared experts."
    rises = ", ".join(f"{r.domain} {r.delta:+.4f}" for r in shared.itertuples())
    return f"Zeroing the shared expert of every MoE layer changes the held-out NLL (nats per token) by: {rises}."


def _failing(dis: pd.DataFrame, zero_all: pd.Series, shared: pd.DataFrame, shared_dropout: float) -> str:
    weak = [f"L{L} ({v:+.3f})" for L, v in zero_all.items() if v < 0.2]
    quiet = sorted(set(dis.domain) - set(dis[dis.passes].domain))
    parts = []
    if weak:
        parts.append(f"zeroing all routed experts of {', '.join(weak)} costs less than 0.2 nats overall")
    if quiet:
        parts.append(f"no layer's top-lift pair is causal for {', '.join(quiet)}")
    narrow = dis[dis.passes & (dis.ci_low < CRITERIA["min_delta"])]
    if len(narrow):  # passes on the point estimate, but the interval reaches below the bar
        rows = [
            f"{r.domain} at L{r.layer} ({r.delta:+.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}])" for r in narrow.itertuples()
        ]
        bar = f"{CRITERIA['min_delta']:.2f}"
        parts.append(f"passes whose interval reaches below {bar} nats are narrow: {', '.join(rows)}")
    zh = dis[dis.domain == "chinese"]
    misses = zh[~zh.passes]
    if 0 < len(misses) < len(zh):  # the Chinese story's gaps, with their reason
        gaps = [f"L{r.layer} ({r.delta:+.3f}, with {r.other:+.3f} on {r.other_domain})" for r in misses.itertuples()]
        parts.append(f"the Chinese pair misses at {', '.join(gaps)}")
    if not shared.empty and shared.delta.abs().max() < CRITERIA["min_delta"] / 2:
        why = f" (training dropped its output with probability {shared_dropout}, so the routed experts took its work)"
        parts.append(
            f"a working shared expert: zeroing it in every MoE layer moves any domain's held-out NLL by at most "
            f"{shared.delta.abs().max():.4f} nats{why if shared_dropout else ''}, so the toy is no model for "
            "studying what shared experts do"
        )
    return "; ".join(parts) or "every MoE layer matters and every domain has a causal pair"


def _write_card(ckpt: Path, model, tokenizer, settings: TrainSettings, facts: dict) -> None:
    """Evaluate on the held-out prompt sets and write README.md, metrics.json and figures."""
    domains = load_prompt_set("domains")
    nll = heldout_nll(model, tokenizer, domains)
    shuffled = heldout_nll(model, tokenizer, domains, shuffle_seed=0)
    acc = task_accuracy(model, tokenizer, load_prompt_set("tasks"))
    rep = routing_report(model, tokenizer, domains)
    dis = dissociation(model, tokenizer, domains)
    shared = shared_expert_effect(model, tokenizer, domains, intact=nll)
    top = rep["specialisation"].sort_values("lift", ascending=False).head(8)
    fig = plot_specialisation(rep["specialisation"], layer=model.config.moe_layers[-1])
    fig.savefig(ckpt / "domain_load.png", dpi=90)
    n_params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    bal = rep["balance"].groupby("bias")[["cv", "max_vio"]].mean()
    metrics = {
        **facts,
        "n_params": n_params,
        "heldout_nll": dict(zip(nll["domain"], nll["nll"].round(4))),
        "shuffled_nll": dict(zip(shuffled["domain"], shuffled["nll"].round(4))),
        "heldout_nats_per_char": dict(zip(nll["domain"], nll["nats_per_char"].round(4))),
        "task_accuracy": dict(zip(acc["task"], acc["accuracy"].round(4))),
        "balance_with_bias": bal.loc["with"].round(4).to_dict(),
        "balance_without_bias": bal.loc["without"].round(4).to_dict(),
        "domain_tv_mean": round(float(rep["tv"]["tv"].mean()), 4),
        "zero_all_routed": {int(k): round(v, 4) for k, v in dis.groupby("layer").zero_all.first().items()},
        "zero_shared_delta": dict(zip(shared["domain"], shared["delta"].astype(float).round(4))),
        "dissociation_passes": {d: int(n) for d, n in dis[dis.passes].groupby("domain").layer.nunique().items()},
        "settings": settings.__dict__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {threads} thread{'s' if threads > 1 else ''}",
    }
    (ckpt / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    cfg = model.config
    card = f"""# ernie_lab toy model

An ERNIE 4.5 MoE with the released architecture at laptop scale, trained by `ernie-lab train-toy`
on ernie_lab's own synthetic bilingual corpus (English facts about invented entities, Chinese
sentences, arithmetic, Python-like code, JSON-like records, ERNIE-format chats). Made entirely by
this project; not derived from Baidu's weights.

- Shape: {cfg.num_hidden_layers} layers (layer 0 dense, {cfg.moe_layers[0]}-{cfg.moe_layers[-1]} MoE),
  d_model {cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads,
  {cfg.moe_num_experts} routed experts top-{cfg.moe_k} + {cfg.moe_num_shared_experts} shared
  (d_expert {cfg.moe_intermediate_size}), vocab {cfg.vocab_size}; {n_params:,} parameters.
{_training_lines(settings, facts, metrics["machine"], threads)}

![loss](loss_curve.png)

## Held-out next-token NLL (nats), data/prompts/domains.jsonl
{summary_line(nll, shuffled)}. `nll` is per predicted token; `nats_per_char`, the same sum over the texts'
characters, compares models whose tokenizers differ.

{_md(nll.merge(shuffled.drop(columns="nats_per_char"), on=["domain", "n_tokens"], suffixes=("", "_shuffled")), 4)}

## Task accuracy (greedy, exact answer), data/prompts/tasks.jsonl
`recall` and `chat` ask trained facts in phrasings training never used; `ioi` uses places training
never used; `arithmetic` asks one-digit sums and differences and the times table, which the corpus
teaches like facts; `arithmetic_2digit` asks two-digit problems training never shows, i.e. whether the
model learned to add rather than to recall.

{_md(acc)}

## Expert balance (mean over MoE layers)
{_md(bal.reset_index())}

## Domain specialisation
Mean total-variation distance between per-domain expert-load distributions: {metrics["domain_tv_mean"]:.3f}.
Most specialised (layer, expert, domain) by lift = spec / (k/E):

{_md(top[["layer", "expert", "group", "spec", "lift"]], 2)}

![domain load](domain_load.png)

{_dissociation_section(dis, model.config, shared, settings.shared_dropout)}
"""
    (ckpt / "README.md").write_text(card)


def rewrite_card(ckpt: str | Path) -> None:
    """Evaluate a ``build_toy`` checkpoint again and rewrite its card (README.md, metrics.json, figures),
    keeping the training facts and settings its metrics.json recorded. Run it with the thread count the
    card names, so the figures are the ones ``train-toy`` wrote."""
    ckpt = Path(ckpt)
    metrics = json.loads((ckpt / "metrics.json").read_text())
    facts = {key: metrics[key] for key in ("n_docs", "n_tokens", "seconds", "init_from") if key in metrics}
    model, tokenizer = load_model_dir(ckpt), load_tokenizer(ckpt)
    # the new card is written beside the checkpoint first, so a failed evaluation leaves the old card whole
    with staging(ckpt) as tmp:
        _write_card(tmp, model, tokenizer, TrainSettings(**metrics["settings"]), facts)
        for name in sorted(os.listdir(tmp)):
            os.replace(tmp / name, ckpt / name)

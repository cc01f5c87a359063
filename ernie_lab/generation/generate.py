"""Autoregressive generation with a static KV cache: prefill once, then one-token decode steps.

Axes: batch pos vocab. ``prompt`` = prompt length (padding included), ``new`` = generated tokens.

The loop (``_decode_loop``) is shared by :func:`generate` (returns the sequences), :func:`stream`
(yields each step's tokens) and :func:`chat` (renders a chat template, returns the reply text).

Hooks fire at every step: hooks passed as ``fwd_hooks`` or attached with ``model.hooks()`` see the
prefill with all prompt positions (``[batch prompt ...]``) and then every decode step with the new
position only (``[batch 1 ...]``; attention scores/pattern ``[batch head 1 kv_pos]``). A hook that
edits an activation therefore steers the whole generation.

Batches are left padded (as ``tokenizer(texts)`` returns them): every row's last prompt token sits in
the last column, positions come from the attention mask, and each row's tokens equal a run on that
prompt alone. A row that has finished (eos or stop string) keeps running in the batch but its
outputs are fixed to the pad token and it is no longer checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ernie_lab.distributed.group import broadcast_from_first
from ernie_lab.generation.cuda_graph import GraphedDecodeStep, compile_refusal, graph_refusal
from ernie_lab.generation.options import check_options
from ernie_lab.generation.sampling import apply_repetition_penalty, make_generator, sample_next, token_presence
from ernie_lab.model.checks import as_ints
from ernie_lab.model.hook_points import ActivationCache, HookPoint, NamesFilter
from ernie_lab.model.kv_cache import KVCache

logger = logging.getLogger(__name__)

# hook points whose activations are [batch head pos kv_pos]: pos is axis 2 and kv_pos grows per step
_SQUARE_POINTS = {"hook_attn_scores": float("-inf"), "hook_pattern": 0.0}


def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    fwd_hooks: Iterable[tuple[Any, Callable]] = (),
    cache_names: NamesFilter | bool = None,
    progress: bool = False,
    pad_token_id: int | None = None,
    compile: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ActivationCache]:
    """Continue ``input_ids`` ``[batch prompt]`` (1-D = batch 1); returns ``[batch prompt+new]``.

    Sampling: ``temperature == 0`` is greedy; otherwise logits are divided by ``temperature``, then
    filtered by ``top_k`` / ``top_p`` (nucleus) / ``min_p`` when set, and sampled with a
    ``torch.Generator`` seeded by ``seed`` (None: torch's global RNG). ``repetition_penalty`` (> 1
    discourages repeats) applies to every token seen in the prompt or generated so far, greedy too.

    Stopping: a row ends after producing one of ``eos_token_id`` (an id or a list; None: the model's
    ``generation_config.eos_token_id``, read from the checkpoint's ``generation_config.json`` as
    transformers does; ``()``: never on eos) or once its generated text contains one of
    ``stop_strings`` (needs ``tokenizer``). Ended rows are filled with ``pad_token_id`` (default: the
    tokenizer's pad id, else the config's, else the first eos id). The loop stops early when every
    row has ended, so ``new <= max_new_tokens``.

    ``attention_mask`` ``[batch prompt]`` marks real tokens (1) and left padding (0). Hooks in
    ``fwd_hooks`` or attached via ``model.hooks()`` fire at every step: prefill with all prompt
    positions, decode with the new position only.

    ``cache_names`` (a names filter as in ``run_with_cache``; True = every point) additionally returns
    ``(sequences, ActivationCache)`` whose entries are the prefill and every decode step concatenated
    along pos: ``[batch prompt+new-1 ...]`` (the last token is sampled, never fed back). Attention
    scores/pattern are ``[batch head pos kv_pos]``, earlier steps padded on kv_pos with what the
    causal mask gives (-inf scores, 0 pattern), so the cache lines up with ``run_with_cache`` on the
    final sequence. ``progress=True`` shows a tqdm bar. ``compile=True`` speeds up the decode step
    while no hook is attached (with hooks the steps stay eager, and a log line says so): on a CUDA
    device it replays one captured CUDA graph per step over a static KV cache; on the CPU it wraps
    the step in ``torch.compile`` (needs a C++ compiler, applies to batch 1, the first call compiles
    for about a minute).

    The steps run under ``torch.inference_mode`` (no autograd, cheaper dispatch): a tensor a hook keeps
    is an inference tensor; ``.clone()`` it after the call to use it with autograd. The returned
    sequences and cache are ordinary tensors.
    """
    input_ids, attention_mask = model._check_inputs(input_ids, attention_mask, None)
    check_options(
        model,
        input_ids,
        max_new_tokens,
        attention_mask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        seed=seed,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        fwd_hooks=fwd_hooks,
    )
    store: dict[str, list[torch.Tensor]] = {}
    saves = [] if cache_names is None or cache_names is False else _save_hooks(model, cache_names, store)
    steps = _decode_loop(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        seed=seed,
        fwd_hooks=[*fwd_hooks, *saves],
        progress=progress,
        pad_token_id=pad_token_id,
        compile=compile,
    )
    new = list(steps)
    out = torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids
    if not saves:
        return out
    return out, ActivationCache({name: _concat_steps(name, parts) for name, parts in store.items()}, model)


def stream(model, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs: Any) -> Iterator[torch.Tensor]:
    """Yield the new token ids ``[batch]`` of each step as soon as they are chosen.

    Takes the keyword arguments of :func:`generate` except ``cache_names``. Rows that have ended
    yield the pad id. The hooks (``fwd_hooks``) are attached at the first step and stay attached while
    the generator is suspended, so forward passes run between two steps see them too; they are
    removed when it finishes or is closed. Hooks fire at every step: prefill with all positions,
    decode with the new one only.
    """
    if kwargs.get("cache_names") is not None:
        raise TypeError("stream() does not take cache_names; use generate(..., cache_names=...)")
    attention_mask = kwargs.pop("attention_mask", None)
    input_ids, attention_mask = model._check_inputs(input_ids, attention_mask, None)
    check_options(model, input_ids, max_new_tokens, attention_mask, **kwargs)
    steps = _decode_loop(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)
    return (ids.clone() for ids in steps)  # normal tensors: the loop's own are inference tensors


def chat(
    model,
    tokenizer,
    messages: str | list[dict[str, Any]],
    max_new_tokens: int = 256,
    special_tokens_in_content: bool = False,
    **kwargs: Any,
) -> str:
    """Reply to a conversation: renders the chat template with the generation prompt, generates until
    one of the tokenizer's eos ids (``eos_token_ids``) and returns the reply without special tokens.

    ``messages`` is ``[{"role": "user", "content": ...}, ...]`` or a string (one user turn). Message
    content is data: special-token strings in it are encoded as plain text, so a message cannot end
    its turn (``special_tokens_in_content=True`` parses them, see ``apply_chat_template``). Other
    keyword arguments go to :func:`generate` (``temperature``, ``seed``, ``fwd_hooks``...).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError(f"chat needs a tokenizer (el.load_tokenizer(...)), got {type(tokenizer).__name__}")
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, special_tokens_in_content=special_tokens_in_content
    )
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_ids)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    ids = torch.tensor([prompt], dtype=torch.long)
    out = generate(model, ids, max_new_tokens=max_new_tokens, tokenizer=tokenizer, **kwargs)
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------- the loop
@torch.inference_mode()  # on a generator function torch enters it per step, never across a yield
def _decode_loop(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    fwd_hooks: Iterable[tuple[Any, Callable]] = (),
    progress: bool = False,
    pad_token_id: int | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Prefill ``input_ids`` (validated ``[batch prompt]``) and yield ``[batch]`` ids per step."""
    if max_new_tokens == 0:
        return
    batch, prompt = input_ids.shape
    device = input_ids.device
    eos_ids = model.generation_config.eos_token_ids if eos_token_id is None else _id_list(eos_token_id)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    pad = _pad_id(model, tokenizer, pad_token_id, eos)
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    generator = make_generator(seed, device) if temperature > 0 else None
    seen = None
    if repetition_penalty is not None:
        seen = token_presence(input_ids, model.config.vocab_size, attention_mask)
    cache = KVCache.for_model(model, batch, prompt + max_new_tokens)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    can_finish = bool(eos.numel() or stops)  # without eos ids or stop strings no row ever ends
    texts: list[list[int]] = [[] for _ in range(batch)]  # generated ids per row, for stop strings
    with model.hooks(fwd_hooks), tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not progress) as bar:
        step_fn = _decode_step(model, compile, batch)
        logits = model.forward_unchecked(input_ids, attention_mask, cache)[:, -1]
        for step in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            ids = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator
            )
            # tensor parallel: every process continues with the first one's token (sampling may differ)
            ids = broadcast_from_first(ids, getattr(model, "tp_mesh", None))
            if can_finish:
                ids = torch.where(finished, pad, ids)
            if seen is not None:
                seen[torch.arange(batch, device=device), ids] = True
            if eos.numel():
                finished = finished | torch.isin(ids, eos)
            if stops:
                finished = finished | _hit_stop_strings(ids, finished, texts, tokenizer, stops)
            bar.update(1)
            yield ids
            # the only host sync of a step, and only when rows can end: is another forward needed?
            if step + 1 == max_new_tokens or (can_finish and bool(finished.all())):
                return
            logits = step_fn(ids.view(batch, 1), cache)[:, -1]


def _decode_step(model, compile: bool, batch: int = 1) -> Callable[[torch.Tensor, KVCache], torch.Tensor]:
    """The one-token forward: ``ids [batch 1]`` -> logits ``[batch 1 vocab]``, no input validation.

    ``compile`` (used only while no hook is attached: an active hook point forces the eager step, so
    hooks see every step) compiles it once per model dtype and device, with dynamic shapes since the
    filled cache prefix grows by one each step. On the CPU the generated kernels get a C++ wrapper,
    which takes the Python interpreter out of the step (1.25x faster again on the bench config), and
    only batch 1 is compiled there: batched steps sort tokens by expert, which ran slower compiled
    than eager (146 vs 167 tokens/s at batch 8). On one CUDA device the step is a CUDA graph over
    a static KV cache (:class:`~ernie_lab.generation.cuda_graph.GraphedDecodeStep`: one replay per
    step instead of one launch per kernel); hooks attached later make single steps eager. Models that
    cannot be captured (:func:`~ernie_lab.generation.cuda_graph.graph_refusal`) decode eagerly there,
    and models that cannot be compiled (offloaded or expert-parallel experts, tensor parallel:
    :func:`~ernie_lab.generation.cuda_graph.compile_refusal`) on the CPU, with a log warning saying why.
    """
    weight = model.model.embed_tokens.weight
    on_cpu_batched = weight.device.type == "cpu" and batch > 1
    hooked = any(hp.active for hp in model.hook_dict.values())
    if compile and hooked:
        logger.info("compile=True: hooks are attached, so decode steps run eagerly (hooks see every step)")
    eager = lambda ids, cache: model.forward_unchecked(ids, None, cache)  # noqa: E731
    if not compile or hooked:
        return eager
    if _on_one_cuda_device(model):
        why = graph_refusal(model, batch)
        if why is None:
            return GraphedDecodeStep(model)
        logger.warning("compile=True: no CUDA graph, decode steps run eagerly: %s", why)
        return eager
    if on_cpu_batched:
        return eager
    why = compile_refusal(model)
    if why is not None:
        logger.warning("compile=True: decode steps run eagerly, not compiled: %s", why)
        return eager
    compiled_by = model.__dict__.setdefault("_compiled_decode", {})
    key = (weight.dtype, weight.device)
    if key not in compiled_by:
        options = {"cpp_wrapper": True} if weight.device.type == "cpu" else {}
        compiled_by[key] = torch.compile(model.forward_unchecked, dynamic=True, options=options)
    compiled = compiled_by[key]

    def step(ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # expert ids read on the host (the CPU decode path) stay in the graph as symbolic ints, so a
        # step is one graph that indexes the selected experts' weights without copying them
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return compiled(ids, None, cache)

    return step


def _on_one_cuda_device(model) -> bool:
    weight = model.model.embed_tokens.weight
    return weight.device.type == "cuda" and all(p.device == weight.device for p in model.parameters())


def _hit_stop_strings(ids, finished, texts, tokenizer, stops) -> torch.Tensor:
    """Append this step's ids to each live row's text; True where a stop string now appears."""
    hit = torch.zeros_like(finished)
    for row, (token, done) in enumerate(zip(ids.tolist(), finished.tolist(), strict=True)):
        if done:
            continue
        texts[row].append(token)
        text = tokenizer.decode(texts[row])
        hit[row] = any(s in text for s in stops)
    return hit


# ---------------------------------------------------------------------------------------- helpers
def _id_list(ids: int | Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten()
    return as_ints(ids, "eos_token_id", 0, scalar=True)  # ranges checked by check_options


def _pad_id(model, tokenizer, pad_token_id: int | None, eos: torch.Tensor) -> int:
    """The id written into rows that have ended."""
    for candidate in (
        pad_token_id,
        getattr(tokenizer, "pad_token_id", None),
        model.config.pad_token_id,
        int(eos[0]) if eos.numel() else None,
    ):
        if candidate is not None:
            return int(candidate)
    return 0


def _save_hooks(model, names_filter, store: dict[str, list[torch.Tensor]]) -> list[tuple[str, Callable]]:
    """Hooks appending each step's activation (detached) to ``store[name]``."""

    def save(x: torch.Tensor, hook: HookPoint) -> None:
        store.setdefault(hook.name, []).append(x.detach().clone())

    names = model.resolve_names(None if names_filter is True else names_filter)
    return [(n, save) for n in names]


def _concat_steps(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate one hook's per-step activations along pos (kv_pos padded for square points)."""
    suffix = name.rsplit(".", 1)[-1]
    if suffix not in _SQUARE_POINTS:
        return torch.cat(parts, dim=1)
    width = parts[-1].shape[-1]
    fill = _SQUARE_POINTS[suffix]
    padded = [torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=fill) for p in parts]
    return torch.cat(padded, dim=2)

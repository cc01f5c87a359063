"""Load and save ERNIE 4.5 MoE checkpoints in the Hugging Face layout (single file or sharded).

Loading builds the model on the meta device (no random init), allocates each tensor once in its target
dtype and on its target device, and reads the stored bytes straight into it (plain file reads, no
memory map): peak host memory stays near the model's size in the target dtype, with no fp32 copy of a
bf16 checkpoint and no second copy in the page-cache mapping.
Key mapping (stacked experts <-> per-expert hub keys) lives in :mod:`ernie_lab.io.checkpoint`,
device planning in :mod:`ernie_lab.model.placement`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ernie_lab.io.atomic import check_destination, destination, replace_dir, staging
from ernie_lab.io.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    Shard,
    Slot,
    TensorReader,
    by_file,
    checkpoint_files,
    hub_layout,
    is_mtp_key,
    open_file,
    parse_size,
    tensor_dtype,
    write_checkpoint,
)
from ernie_lab.io.sources import resolve_source
from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.model.offload import check_offload, offload_experts
from ernie_lab.model.placement import Placement, make_placement
from ernie_lab.model.quant import (
    quantization_of,
    quantization_skip,
    quantize_modules,
    quantized_target,
    resolve_quantization,
    store_quantized,
)

__all__ = ["CheckpointError", "load_model", "save_model", "parse_dtype"]

logger = logging.getLogger(__name__)

# what a hub download needs for the weights (tokenizer files are fetched by load_tokenizer)
HUB_PATTERNS = ["*.json", "*.safetensors"]

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a dtype or a name (``"bfloat16"``, ``"bf16"``, ``"torch.float32"``...)."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        if name not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}")
        dtype = _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


# ------------------------------------------------------------------------------------------ loading
def load_model(
    src: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    quantization: str | None = None,
    quantization_config=None,
    offload: str | None = None,
    expert_slots: int | None = None,
    shard: Callable[[ErnieMoE], dict[str, Shard]] | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: str | torch.device | None = None,
) -> ErnieMoE:
    """Load ``src`` into an :class:`ErnieMoE` in eval mode.

    src: ``"toy"``, a local directory in the Hugging Face layout (``config.json`` plus
        ``model.safetensors`` or shards with ``model.safetensors.index.json``), or a hub id.
    dtype: parameter dtype; default the checkpoint's (config ``dtype``/``torch_dtype``, else the
        stored tensors'). The router weight and correction bias always stay fp32.
    device: a device (default CPU) or ``"auto"``: layers spread over the visible GPUs by free memory
        (embedding on the first, final norm and LM head after the last layer), then the CPU.
    quantization: ``"nf4"`` | ``"fp4"`` | ``"int8"`` (bitsandbytes, ``pip install 'ernie-lab[quant]'``):
        routed experts (one quantization state each), attention, dense-MLP and shared-expert weights
        are quantized tensor by tensor while reading, so memory peaks near the quantized size;
        router and correction bias stay fp32, norms, embedding and LM head in ``dtype``. See
        :mod:`ernie_lab.model.quant`. ``quantization_config``: the same from a transformers
        ``BitsAndBytesConfig`` (its ``bnb_4bit_compute_dtype`` is the default ``dtype``; modules its
        ``llm_int8_skip_modules`` match stay in full precision; fields it cannot honour raise).
    offload: ``"experts"`` keeps the routed experts in host memory and computes through
        ``expert_slots`` device slots per layer (LRU); results equal the resident model's, and
        ``model.offload_stats()`` counts hits, misses and bytes copied (:mod:`ernie_lab.model.offload`).
    torch_dtype, device_map: transformers' spellings of ``dtype`` and ``device`` (``device_map="auto"``
        is ``device="auto"``), so a model card's ``from_pretrained(name, device_map="auto",
        torch_dtype=torch.bfloat16)`` ports by renaming the function; giving both spellings is an error.

    ``mtp*`` (multi-token-prediction) tensors are ignored with one log note. Any other unexpected,
    missing or wrong-shaped key raises :class:`CheckpointError` naming it; the correction bias may be
    absent only when the config says ``moe_use_aux_free: false`` (it is then zero). With tied
    embeddings a stored ``lm_head.weight`` equal to the embedding is skipped; one that differs is used
    (untied, with a warning), as transformers does.

    shard: the seam for a parallel plan (``ernie_lab.distributed``). Called on the meta model after
        the checkpoint's keys and shapes are checked, it may shrink parameters to this process's part
        and returns state name -> :class:`Shard`; only those parts are then read (``get_slice``), and
        a stacked expert tensor's shard reads only its experts' keys.
    """
    dtype = _alias("dtype", dtype, "torch_dtype", torch_dtype)
    device = _alias("device", device, "device_map", device_map)
    fmt, compute_dtype = resolve_quantization(quantization, quantization_config)
    check_offload(offload, expert_slots)
    if shard is not None and (fmt or offload):
        raise ValueError("quantization and offload do not combine with tp_plan yet: load the full-precision model")
    directory = resolve_source(src, allow_patterns=HUB_PATTERNS)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face-layout checkpoint")
    config = ErnieConfig.from_hf(directory)
    files = checkpoint_files(directory)
    if config.tie_word_embeddings and {"lm_head.weight", "model.embed_tokens.weight"} <= set(files):
        config = _resolve_stored_head(config, files)
    with torch.device("meta"):
        model = ErnieMoE(config, init=False)
    layout = hub_layout(model)
    keys, optional_missing = _check_keys(config, layout, files, directory)
    _check_shapes(layout, files, keys)
    if offload is not None:
        check_offload(offload, expert_slots, config.moe_num_experts)
    dtype = parse_dtype(dtype) if dtype is not None else compute_dtype or _checkpoint_dtype(config, files)
    shards = shard(model) if shard is not None else {}
    with torch.device("meta"):
        swapped = quantize_modules(model, fmt, dtype, quantization_skip(quantization_config)) if fmt else {}
    placement = make_placement(model, dtype, device)
    if offload is not None:  # experts are read into host memory; offload_experts adds the device slots
        placement = _experts_on_host(placement)
    kept = {f"{path}.{name}" for path, m in swapped.items() for name, _ in m.named_buffers()}
    state = _allocate(model, layout, dtype, placement, zero=optional_missing, keep_dtype=kept)
    _copy_tensors(layout, files, keys, state, swapped, dtype, shards)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign=True wrapped each key in its own Parameter: share one again
        model.lm_head.weight = model.model.embed_tokens.weight
    if offload is not None:
        offload_experts(model, expert_slots, None if str(device) == "auto" else device)
    model.generation_config = model.generation_config.updated_from(directory / "generation_config.json")
    return model.eval()


def _experts_on_host(placement: Placement) -> Placement:
    cpu = torch.device("cpu")
    return lambda key: cpu if ".mlp.experts." in key else placement(key)


def _alias(name: str, value, alias: str, alias_value):
    """``value``, or ``alias_value`` when the transformers spelling was used instead."""
    if alias_value is None:
        return value
    if value is not None:
        raise TypeError(f"give {name}= or its alias {alias}=, not both")
    if isinstance(alias_value, dict):
        raise ValueError(f'{alias} must be a device or "auto"; per-module maps are not supported')
    return alias_value


def _resolve_stored_head(config: ErnieConfig, files: dict[str, Path]) -> ErnieConfig:
    """Some hub repos store ``lm_head.weight`` although the config ties it to the embedding. Equal ->
    keep the tie and skip the duplicate. Different -> untie and use the stored head, which is what
    transformers (the parity reference) does; ``model.config.tie_word_embeddings`` is then False."""
    if _stored_head_matches(files, "model.embed_tokens.weight", "lm_head.weight"):
        logger.info("lm_head.weight is stored but equals the tied embedding; the duplicate is skipped")
        return config
    logger.warning(
        "lm_head.weight differs from model.embed_tokens.weight although tie_word_embeddings=True; "
        "untying them and using the stored lm_head.weight, as transformers does"
    )
    return config.replace(tie_word_embeddings=False)


def _check_keys(config: ErnieConfig, layout: dict[str, Slot], files: dict[str, Path], directory: Path):
    """Keys to load; raise on unexpected or missing ones. Returns (keys, state names to zero-fill)."""
    mtp = [k for k in files if is_mtp_key(k)]
    if mtp:
        logger.info("ignoring %d multi-token-prediction (mtp*) tensors of %s", len(mtp), directory)
    present = set(files) - set(mtp)
    allowed = set(layout) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unexpected = sorted(present - allowed)
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} unexpected key(s) in {directory} (no such tensor in the model for this "
            f"config.json): {_listing(unexpected)}"
        )
    missing = [k for k in layout if k not in present]
    # hub configs with aux-loss-free balancing off may omit the correction bias: it is zero then
    aux_free_off = config.extra.get("moe_use_aux_free") is False
    optional = [k for k in missing if aux_free_off and k.endswith("moe_statics.e_score_correction_bias")]
    required = [k for k in missing if k not in optional]
    if required:
        hint = (
            " (moe_statics may be absent only when config.json sets moe_use_aux_free: false)"
            if all(k.endswith("e_score_correction_bias") for k in required)
            else ""
        )
        raise CheckpointError(f"{len(required)} key(s) missing from {directory}: {_listing(required)}{hint}")
    keys = [k for k in layout if k in present]
    return keys, {layout[k].name for k in optional}


def _check_shapes(layout: dict[str, Slot], files: dict[str, Path], keys: list[str]) -> None:
    """Compare every stored shape with the model's before any data is read (headers only)."""
    for path, group in by_file(files, keys).items():
        with open_file(path) as f:
            stored = set(f.keys())
            for key in group:
                if key not in stored:
                    raise CheckpointError(f"{key} is listed in {INDEX_FILE} under {path.name} but is not in that file")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != layout[key].shape:
                    raise CheckpointError(
                        f"{key} in {path.name}: checkpoint shape {shape} != model shape {layout[key].shape}"
                    )


def _checkpoint_dtype(config: ErnieConfig, files: dict[str, Path]) -> torch.dtype:
    """The config's ``dtype`` / ``torch_dtype``, else the stored embedding's dtype."""
    for field in ("dtype", "torch_dtype"):
        name = config.extra.get(field)
        if isinstance(name, str):
            try:
                return parse_dtype(name)
            except ValueError:
                logger.warning("config.json %s=%r is not a float dtype; using the stored tensors' dtype", field, name)
    return tensor_dtype(files, "model.embed_tokens.weight")


def _allocate(
    model: ErnieMoE,
    layout: dict[str, Slot],
    dtype: torch.dtype,
    placement: Placement,
    zero: set[str],
    keep_dtype: set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Uninitialised tensors for every state entry, in their final dtype and device (``keep_dtype``:
    entries allocated in the meta model's dtype, the quantized storage). Tied weights share one
    tensor, so ``load_state_dict(assign=True)`` keeps them tied."""
    fp32 = {slot.name for slot in layout.values() if slot.fp32}
    state: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        make = torch.zeros if name in zero else torch.empty
        kind = meta.dtype if name in keep_dtype else torch.float32 if name in fp32 else dtype
        state[name] = make(meta.shape, dtype=kind, device=placement(name))
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _copy_tensors(
    layout: dict[str, Slot],
    files: dict[str, Path],
    keys: list[str],
    state: dict[str, torch.Tensor],
    swapped: dict[str, torch.nn.Module],
    dtype: torch.dtype,
    shards: dict[str, Shard],
) -> None:
    """Read each stored tensor into its slot, file by file: straight into the model's memory when
    the dtype matches, else through one temporary tensor at a time; a tensor of a quantized module
    (``swapped``) is read in ``dtype`` and quantized into its storage. A sharded tensor gets only its
    part: a slice read through ``get_slice``, or for stacked experts only the experts it holds."""
    local = {}
    for key in keys:
        slot, part = layout[key], shards.get(layout[key].name)
        if part is None or slot.expert is None:
            local[key] = (slot, part)
        elif part.start <= slot.expert < part.stop:  # an expert of this shard, at its local index
            local[key] = (Slot(slot.name, slot.expert - part.start, slot.rows, slot.shape), None)
    with torch.no_grad(), tqdm(total=len(local), desc="loading", unit="tensor", disable=None, leave=False) as bar:
        for path, group in by_file(files, list(local)).items():
            any_sliced = any(local[key][1] is not None for key in group)
            with TensorReader(path) as reader, open_file(path) if any_sliced else contextlib.nullcontext() as sliced:
                for key in group:
                    slot, part = local[key]
                    target = quantized_target(swapped, slot.name)
                    if part is not None:
                        slot.view(state[slot.name]).copy_(part.read(sliced.get_slice(key)))
                    elif target is None:
                        reader.read_into(key, slot.view(state[slot.name]))
                    else:
                        w = torch.empty(slot.shape, dtype=dtype)
                        reader.read_into(key, w)
                        store_quantized(state, target, slot.name, w, slot.expert, slot.rows)
                    bar.update(1)


def _stored_head_matches(files: dict[str, Path], embed_key: str, head_key: str, rows: int = 4096) -> bool:
    """Whether the stored LM head equals the stored embedding, compared in row chunks so neither is
    held whole. A shape mismatch is an error: with tied embeddings the two must agree."""
    with open_file(files[embed_key]) as fe, open_file(files[head_key]) as fh:
        embed, head = fe.get_slice(embed_key), fh.get_slice(head_key)
        e_shape, h_shape = tuple(embed.get_shape()), tuple(head.get_shape())
        if e_shape != h_shape:
            raise CheckpointError(f"{head_key}: checkpoint shape {h_shape} != model shape {e_shape} (tied embeddings)")
        return all(torch.equal(embed[i : i + rows], head[i : i + rows]) for i in range(0, e_shape[0], rows))


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------------- saving
def save_model(
    model: ErnieMoE,
    out_dir: str | Path,
    max_shard_size: int | str | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint that transformers and :func:`load_model` read.

    Writes ``config.json`` (``model.config.to_hf_dict()`` with ``dtype`` set to what is stored),
    ``generation_config.json`` (``model.generation_config``) and
    safetensors in the hub key layout (per-expert keys; no ``lm_head.weight`` when tied), split into
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` when ``max_shard_size``
    (bytes, or ``"500MB"``/``"2GiB"``) needs more than one file. ``dtype`` defaults to the model's;
    the router stays fp32. Host memory holds at most one shard at a time.

    Everything is written to a temporary folder next to ``out_dir`` and moved into place
    (:mod:`ernie_lab.io.atomic`), so ``out_dir`` never holds a half-written checkpoint. ``out_dir``
    must be absent, empty or an earlier ``save_model`` output (its ``.ernie_lab.json`` marker); that
    one loses only the files the marker lists, every other file (tokenizer, README, adapters) is kept.
    ``overwrite=True`` also replaces a foreign checkpoint: its ``config.json``, ``model.safetensors``,
    index and the shards the index lists; other files are kept. A symlink is followed. Returns the path.
    """
    if not isinstance(model, ErnieMoE):
        raise TypeError(f"save_model needs an ErnieMoE, got {type(model).__name__}")
    fmt = quantization_of(model)
    if fmt is not None:
        raise ValueError(
            f"save_model writes full-precision Hugging Face checkpoints and this model is quantized ({fmt}); "
            f"save the full-precision model and load it with quantization={fmt!r}"
        )
    out = destination(out_dir)
    check_destination(out, "checkpoint", overwrite)
    dtype = parse_dtype(dtype) if dtype is not None else model.model.embed_tokens.weight.dtype
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    layout = hub_layout(model)
    state = model.state_dict(keep_vars=True)
    tensors = {key: (torch.Size(slot.shape), torch.float32 if slot.fp32 else dtype) for key, slot in layout.items()}

    def materialise(key: str) -> torch.Tensor:
        slot = layout[key]
        # copy=True: a view would share storage with the model (and with its sibling experts)
        return slot.view(state[slot.name].detach()).to(device="cpu", dtype=tensors[key][1], copy=True).contiguous()

    with staging(out) as tmp:
        config = model.config.to_hf_dict()
        for stale in ("torch_dtype", "transformers_version"):  # not true of this file any more
            config.pop(stale, None)
        config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = dataclasses.asdict(model.generation_config)  # the eos ids generate stops at
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        with tqdm(total=len(tensors), desc="saving", unit="tensor", disable=None, leave=False) as bar:
            write_checkpoint(tensors, materialise, tmp, limit, progress=bar)
        replace_dir(tmp, out, "checkpoint", overwrite=overwrite, replaceable=_checkpoint_files)
    return out


def _checkpoint_files(folder: Path) -> set[str]:
    """What a foreign checkpoint gives up to ``save_model(..., overwrite=True)``: config.json, the
    single file, the index and the shards it lists (other ``*.safetensors`` such as adapters stay)."""
    names = {"config.json", "generation_config.json", SINGLE_FILE, INDEX_FILE}
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        names |= {str(f) for f in index.get("weight_map", {}).values()}
    except (OSError, ValueError, AttributeError):
        pass
    return {n for n in names if (folder / n).is_file()}

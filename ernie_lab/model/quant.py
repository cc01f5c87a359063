"""Weight quantization: nf4 / fp4 (4-bit, blockwise) and int8 (per output row), experts included.

transformers' ``BitsAndBytesConfig`` quantizes ``nn.Linear`` only and leaves the stacked routed
experts (~93% of ERNIE-4.5-21B) in full precision; here every routed expert is quantized on its own
(one quantization state per expert slice of the stacked tensors) and dequantized on the fly for the
selected experts only. Attention, dense-MLP and shared-expert linears are quantized too; the router
weight and correction bias stay fp32, norms, embedding and LM head stay in the model dtype.

Storage of one weight ``[rows cols]`` (a stack of experts adds a leading ``expert`` axis):

    nf4 / fp4   qweight uint8 [rows*cols/2] (two codes per byte), absmax fp32 [rows*cols/64]:
                bitsandbytes ``quantize_4bit``, blocks of 64 consecutive elements
    int8        qweight int8 [rows cols], scale fp32 [rows]: ``w ~= qweight * scale`` (symmetric,
                row absmax / 127, bitsandbytes' ``int8_vectorwise_quant`` formula, see :func:`int8_rows`)

Every block lies inside one expert and one gate/up half, so quantizing hub tensors one by one while
loading gives the same bytes as quantizing the stack. bitsandbytes is imported on first use only.

int8 stores plain codes rather than torchao tensors: measured on a [1536 2560] weight, both give the
same error (per-row absmax), but torchao's ``Int8WeightOnlyConfig`` makes an ``Int8Tensor`` subclass
that only applies to ``nn.Linear`` (not the stacked experts) and has no ``aten.mm`` for the CPU decode
kernel of :func:`~ernie_lab.model.layers.linear`; plain int8 codes with fp32 row scales serve the
linears, the per-expert slices and the offload slots alike. The codes follow bitsandbytes'
``int8_vectorwise_quant`` formula, computed in torch (:func:`int8_rows`: its CUDA kernel takes fp16
only); the ``quant`` extra is required for every format all the same.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.layers import Linear, linear
from ernie_lab.model.moe import Experts

FORMATS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # elements per 4-bit absmax block
EXTRA_HINT = "pip install 'ernie-lab[quant]'"


def bitsandbytes_functional():
    """``bitsandbytes.functional``, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module("bitsandbytes.functional")
    except ImportError as err:
        raise ImportError(f"quantization needs bitsandbytes, which is not installed: {EXTRA_HINT}") from err


# ------------------------------------------------------------------------------------------ codecs
@dataclass(frozen=True)
class Codec:
    """How one weight ``[rows cols]`` is stored, filled and multiplied. ``fmt`` is one of FORMATS."""

    fmt: str

    @property
    def parts(self) -> tuple[str, str]:
        return ("qweight", "absmax") if self.fmt != "int8" else ("qweight", "scale")

    def layout(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Part name -> (shape, dtype) of the storage of one ``[rows cols]`` weight."""
        if self.fmt == "int8":
            return {"qweight": ((rows, cols), torch.int8), "scale": ((rows,), torch.float32)}
        n = rows * cols
        if n % BLOCKSIZE:
            raise ValueError(
                f"{self.fmt}: a [{rows} {cols}] weight is not a whole number of {BLOCKSIZE}-element blocks"
            )
        return {"qweight": ((n // 2,), torch.uint8), "absmax": ((n // BLOCKSIZE,), torch.float32)}

    def encode_into(self, parts: dict[str, torch.Tensor], w: torch.Tensor, first_row: int = 0) -> None:
        """Quantize ``w [n cols]`` (rows ``first_row:first_row+n`` of the weight) into ``parts``."""
        w = w.detach().to(parts["qweight"].device).contiguous()
        if self.fmt == "int8":
            q, absmax = int8_rows(w)
            rows = slice(first_row, first_row + w.shape[0])
            parts["qweight"][rows] = q
            parts["scale"][rows] = absmax / 127
            return
        bnb = bitsandbytes_functional()
        start, n = first_row * w.shape[-1], w.numel()
        if start % BLOCKSIZE or n % BLOCKSIZE:
            raise ValueError(f"{self.fmt}: rows from {first_row} of width {w.shape[-1]} cross a {BLOCKSIZE}-block")
        q, state = bnb.quantize_4bit(w.float(), blocksize=BLOCKSIZE, quant_type=self.fmt)
        parts["qweight"][start // 2 : (start + n) // 2] = q.view(-1)
        parts["absmax"][start // BLOCKSIZE : (start + n) // BLOCKSIZE] = state.absmax

    def dense(self, parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Dequantized weights ``[... rows cols]`` in ``dtype`` from parts with leading dims ``[...]``."""
        q = parts["qweight"]
        lead = tuple(q.shape[:-2] if self.fmt == "int8" else q.shape[:-1])
        if self.fmt == "int8":
            return (q.float() * parts["scale"][..., None]).to(dtype)
        bnb = bitsandbytes_functional()
        state = bnb.QuantState(
            parts["absmax"].reshape(-1), shape=lead + shape, dtype=dtype, blocksize=BLOCKSIZE, quant_type=self.fmt
        )
        return bnb.dequantize_4bit(q.reshape(-1, 1), state)

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], shape: tuple[int, int], bias=None):
        """``x [... cols] -> [... rows]`` with the weight stored in ``parts``. int8 multiplies by the
        integer weight and scales the output rows (no dequantized copy of the weight)."""
        if self.fmt == "int8":
            out = linear(x, parts["qweight"].to(x.dtype)) * parts["scale"].to(x.dtype)
            return out if bias is None else out + bias
        return linear(x, self.dense(parts, shape, x.dtype), bias)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes of ``w [rows cols]`` and each row's absmax ``[rows]`` (fp32).

    bitsandbytes' ``int8_vectorwise_quant`` formula (``round(w * 127 / row absmax)``, the same codes as
    its CPU kernel on fp32 input), computed here in fp32 on any device: its CUDA kernel takes fp16
    only, which would round fp32 weights, overflow beyond 65504 and make the codes depend on the
    device. An all-zero row gets codes 0 (the formula divides by 0 there).
    """
    w = w.float()
    absmax = w.abs().amax(dim=-1)
    q = torch.round(w * (127.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)).unsqueeze(-1))
    return q.to(torch.int8), absmax


def resolve_quantization(quantization=None, quantization_config=None) -> tuple[str | None, torch.dtype | None]:
    """``(format or None, compute dtype or None)`` from ``quantization`` (``"nf4"``, ``"fp4"``,
    ``"int8"``) or a transformers ``BitsAndBytesConfig`` (read by attribute, so transformers is
    never imported here): ``load_in_4bit`` -> its ``bnb_4bit_quant_type``, ``load_in_8bit`` ->
    int8, ``bnb_4bit_compute_dtype`` -> the model dtype unless ``dtype=`` says otherwise
    (``llm_int8_skip_modules``: :func:`quantization_skip`; any other field set to something this
    loader does not do is a ValueError naming it). Checks that bitsandbytes is importable, so a
    missing extra fails before any loading."""
    if quantization is not None and quantization_config is not None:
        raise ValueError("pass quantization= or quantization_config=, not both")
    dtype = None
    if isinstance(quantization_config, str):
        quantization = quantization_config
    elif quantization_config is not None:
        _check_config_fields(quantization_config)
        if getattr(quantization_config, "load_in_4bit", False):
            quantization = getattr(quantization_config, "bnb_4bit_quant_type", "nf4")
            dtype = getattr(quantization_config, "bnb_4bit_compute_dtype", None)
        elif getattr(quantization_config, "load_in_8bit", False):
            quantization = "int8"
        else:
            raise TypeError(
                f"quantization_config={quantization_config!r}: expected a BitsAndBytesConfig with load_in_4bit "
                f"or load_in_8bit, or one of {FORMATS}"
            )
    if quantization is None:
        return None, None
    if not isinstance(quantization, str) or quantization.lower() not in FORMATS:
        raise ValueError(f"quantization={quantization!r}: use one of {FORMATS} or None")
    bitsandbytes_functional()
    return quantization.lower(), dtype if isinstance(dtype, torch.dtype) else None


# BitsAndBytesConfig fields this loader does not implement, with the value that means "off" (their
# transformers defaults): any other value is refused by name rather than accepted and ignored
_UNSUPPORTED = {
    "bnb_4bit_use_double_quant": (False, "double quantisation of the 4-bit absmax states is not implemented"),
    "llm_int8_threshold": (6.0, "int8 here is weight-only (per-row absmax), without LLM.int8's outlier split"),
    "llm_int8_enable_fp32_cpu_offload": (False, 'use offload="experts" (experts in host memory) instead'),
    "llm_int8_has_fp16_weight": (False, "weights are stored quantized; there is no fp16 master copy"),
    "bnb_4bit_quant_storage": ("uint8", "4-bit codes are stored two per uint8"),
}
_HANDLED = {"quant_method", "load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit", "bnb_4bit_quant_type"}
_HANDLED |= {"bnb_4bit_compute_dtype", "llm_int8_skip_modules"}


def _check_config_fields(config) -> None:
    """Refuse, by name, every set field of a ``BitsAndBytesConfig`` this loader would not honour; a
    field this module does not know passes only at its class default (newer transformers fields)."""
    fields = config.to_dict() if hasattr(config, "to_dict") else getattr(config, "__dict__", {})
    try:
        defaults = type(config)().to_dict()
    except Exception:  # not constructible without arguments: every unknown field must be unset
        defaults = {}
    for name, value in fields.items():
        if name in _HANDLED:
            continue
        off, why = _UNSUPPORTED.get(name, (defaults.get(name), "this loader does not implement it"))
        if str(value).removeprefix("torch.") != str(off).removeprefix("torch."):
            raise ValueError(f"BitsAndBytesConfig.{name}={value!r} is not supported: {why} (leave it at {off!r})")
    if getattr(config, "load_in_4bit", False) and getattr(config, "load_in_8bit", False):
        raise ValueError("BitsAndBytesConfig: load_in_4bit and load_in_8bit are exclusive")


def quantization_skip(quantization_config=None) -> tuple[str, ...]:
    """The module path patterns of ``BitsAndBytesConfig.llm_int8_skip_modules`` (empty without one):
    the modules they match stay in full precision (:func:`quantize_modules`)."""
    patterns = getattr(quantization_config, "llm_int8_skip_modules", None) if quantization_config else None
    if patterns is None:
        return ()
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"llm_int8_skip_modules must be a list of module path patterns, got {patterns!r}")
    return tuple(patterns)


def matches_module(path: str, pattern: str) -> bool:
    """Whether module ``path`` matches a skip pattern: a run of whole path components (``self_attn``,
    ``mlp.experts``, ``model.layers.3`` - not ``model.layers.30``), a glob over a path prefix
    (``model.layers.*.self_attn``), or transformers' rule (a regex from the start up to a module
    boundary, or a suffix). A match also covers every module below it."""
    prefixes = [".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 2)]
    if f".{pattern}." in f".{path}." or any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
        return True
    try:
        return bool(re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", path)) or path.endswith(pattern)
    except re.error:
        return path.endswith(pattern)


def quantization_of(model: nn.Module) -> str | None:
    """The format a model's weights are quantized in, or None."""
    for m in model.modules():
        codec = getattr(m, "codec", None)
        if isinstance(codec, Codec):
            return codec.fmt
    return None


def codec_for(fmt: str) -> Codec:
    if fmt not in FORMATS:
        raise ValueError(f"quantization={fmt!r}: use one of {FORMATS} or None")
    return Codec(fmt)


# ----------------------------------------------------------------------------------------- modules
class _QuantModule(nn.Module):
    """Keeps its fp32 quantization states (absmax, scale) in fp32 through ``model.to(bfloat16)``;
    device moves still apply. ``compute_dtype`` (the model dtype) follows dtype conversions."""

    codec: Codec
    compute_dtype: torch.dtype

    def _apply(self, fn, recurse=True):
        states = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        super()._apply(fn, recurse)
        for name, old in states.items():
            new = self._buffers[name]
            self._buffers[name] = new.float() if old.is_meta or new.is_meta else old.to(new.device)
        return self

    def _register_parts(self, prefix: str, lead: tuple[int, ...], shape: tuple[int, int]) -> None:
        for part, (pshape, pdtype) in self.codec.layout(*shape).items():
            self.register_buffer(f"{prefix}_{part}", torch.empty(*lead, *pshape, dtype=pdtype))

    def _parts(self, prefix: str, index=None) -> dict[str, torch.Tensor]:
        tensors = {p: getattr(self, f"{prefix}_{p}") for p in self.codec.parts}
        return tensors if index is None else {p: t[index] for p, t in tensors.items()}


class QuantLinear(_QuantModule):
    """A quantized :class:`~ernie_lab.model.layers.Linear` (same module path, so hook names and the
    ``.bias`` key are unchanged): buffers ``weight_qweight`` and ``weight_absmax`` / ``weight_scale``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, codec: Codec, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.codec, self.compute_dtype = codec, dtype
        self._register_parts("weight", (), (out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.linear(x, self._parts("weight"), (self.out_features, self.in_features), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.codec.fmt}, bias={self.bias is not None}"


class QuantExperts(_QuantModule):
    """Routed experts with one quantization state per expert: the :class:`~ernie_lab.model.moe.Experts`
    interface (``post``, ``down``, ``gather``) over buffers ``gate_up_proj_qweight [expert ...]``, ..."""

    def __init__(self, cfg: ErnieConfig, codec: Codec, dtype: torch.dtype):
        super().__init__()
        e, d, f = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.codec, self.compute_dtype = codec, dtype
        self.shapes = {"gate_up_proj": (2 * f, d), "down_proj": (d, f)}
        if codec.fmt != "int8" and (f * d) % BLOCKSIZE:
            raise ValueError(f"{codec.fmt}: an expert's gate ([{f} {d}]) is not a whole number of {BLOCKSIZE}-blocks")
        for proj, shape in self.shapes.items():
            self._register_parts(proj, (e,), shape)

    def post(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate(x)) * up(x)`` of expert ``e`` on ``x [n d_model]``."""
        gate, up = self.codec.linear(x, self._parts("gate_up_proj", e), self.shapes["gate_up_proj"]).chunk(2, dim=-1)
        return F.silu(gate) * up

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return self.codec.linear(h, self._parts("down_proj", e), self.shapes["down_proj"])

    def gather(self, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``gate_up [*idx d_model 2*d_expert]`` and ``down [*idx d_expert d_model]`` (the
        dense experts' layout; each expert is quantized as the hub's ``[d_out d_in]``)."""
        dense = [self.codec.dense(self._parts(p, idx), self.shapes[p], dtype) for p in self.shapes]
        return tuple(w.transpose(-1, -2) for w in dense)

    def extra_repr(self) -> str:
        return f"{self.codec.fmt}, experts={self.gate_up_proj_qweight.shape[0]}"


# ------------------------------------------------------------------------------ model conversion
def quantize_modules(
    model: nn.Module, fmt: str, dtype: torch.dtype, skip: tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """Swap, in place, every attention / dense-MLP / shared-expert ``Linear`` for a :class:`QuantLinear`
    and every ``Experts`` for a :class:`QuantExperts`, at the same module paths; the new modules are
    created on the current default device (the loader uses meta and allocates them itself).
    Returns ``{module path: new module}``. The LM head (tied to the embedding in most checkpoints)
    stays dense, and so does every module a ``skip`` pattern matches (:func:`matches_module`; a pattern
    that matches no module of the model is a ValueError naming it)."""
    paths = [path for path, _ in model.named_modules() if path]
    unmatched = [p for p in skip if not any(matches_module(path, p) for path in paths)]
    if unmatched:
        raise ValueError(f"llm_int8_skip_modules {unmatched} match no module of the model (e.g. {paths[-1]!r})")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantized models compute in float32, bfloat16 or float16, not {dtype}")
    codec = codec_for(fmt)
    swapped: dict[str, nn.Module] = {}
    for path, module in list(model.named_modules()):
        if path == "lm_head" or any(matches_module(path, p) for p in skip):
            continue
        if type(module) is Linear:
            new = QuantLinear(module.in_features, module.out_features, module.bias is not None, codec, dtype)
        elif type(module) is Experts:
            new = QuantExperts(model.config, codec, dtype)
        else:
            continue
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, new)
        swapped[path] = new
    return swapped


def quantize_model(model: nn.Module, fmt: str, skip: tuple = ()) -> nn.Module:
    """Quantize a loaded model in place (module by module); :func:`ernie_lab.load_model` with
    ``quantization=`` does the same while reading the checkpoint, without a full-precision copy.
    ``skip``: module path patterns kept in full precision (as ``llm_int8_skip_modules``)."""
    dense = {path: m for path, m in model.named_modules() if type(m) in (Linear, Experts) and path != "lm_head"}
    dtype = model.model.embed_tokens.weight.dtype
    swapped = quantize_modules(model, fmt, dtype, skip)
    with torch.no_grad():
        for path, new in swapped.items():
            old = dense.pop(path)  # freed once converted: peak memory ~ one module above the result
            new.to(device=next(old.parameters()).device)
            if isinstance(new, QuantLinear):
                new.codec.encode_into(new._parts("weight"), old.weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
                continue
            for proj in new.shapes:
                stack = getattr(old, proj)
                for e in range(stack.shape[0]):  # dense experts are stored [d_in d_out]
                    new.codec.encode_into(new._parts(proj, e), stack[e].t())
    return model


def quantized_target(swapped: dict[str, nn.Module], name: str) -> _QuantModule | None:
    """The quantized module that dense state key ``name`` (``...q_proj.weight``,
    ``...experts.gate_up_proj``) now lives in, or None when ``name`` is not quantized."""
    path, _, _ = name.rpartition(".")
    return swapped.get(path)


def store_quantized(state: dict[str, torch.Tensor], module: _QuantModule, name: str, w: torch.Tensor, expert, rows):
    """Quantize one checkpoint tensor ``w`` into the loader's ``state`` (the allocated buffers of
    ``module``): ``name`` is the dense state key it belongs to, ``expert``/``rows`` the slice of it
    (see :class:`ernie_lab.io.checkpoint.Slot`)."""
    prefix, _, proj = name.rpartition(".")
    parts = {p: state[f"{prefix}.{proj}_{p}"] for p in module.codec.parts}
    if expert is not None:
        parts = {p: t[expert] for p, t in parts.items()}
    module.codec.encode_into(parts, w, 0 if rows is None else rows.start)

"""Hook points and the hook registry of a model (the cache they fill: :mod:`ernie_lab.model.cache`).

A :class:`HookPoint` is an identity on an activation until a hook is attached. It is a plain object,
not an ``nn.Module``: an unhooked point costs one attribute test, so the plain forward pass stays as
fast as a model without hook points. Points are named by the TransformerLens-style path of
the README's hook table (``blocks.3.moe.hook_topk_idx``), independent of the checkpoint's module names.

A hook is ``fn(tensor, hook) -> Tensor | None``; returning a tensor replaces the activation (same
shape, dtype and device, else an error names the point). A backward hook is
``fn(grad, hook) -> Tensor | None`` and may replace the gradient flowing into the activation.

Edits propagate: each point receives the value its predecessor returned. In particular the router
(``MoE.route``) selects experts from the possibly edited ``hook_router_logits``/``hook_router_probs``,
and an edited ``hook_topk_idx`` makes it re-gather the probs of the new experts (renormalised) before
``hook_topk_weights``.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from ernie_lab.model.cache import ActivationCache

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameSpec = str | Callable[[str], bool]
NamesFilter = None | str | Sequence[str] | Callable[[str], bool]


class HookError(RuntimeError):
    """A hook returned something that cannot replace the activation."""


class HookPoint:
    """A named place in the forward pass where hooks can read or replace an activation."""

    __slots__ = ("name", "layer", "fwd", "bwd", "wrap", "check")

    def __init__(self, name: str, layer: int | None = None):
        self.name = name
        self.layer = layer
        self.fwd: list[HookFn] = []
        self.bwd: list[HookFn] = []
        # set by a parallel plan (ernie_lab.distributed) where this process holds part of the
        # activation: wrap(x, point) makes it whole, calls point.run and returns this process's part
        self.wrap: Callable[[torch.Tensor, HookPoint], torch.Tensor] | None = None
        # set by a parallel plan: check(result, point) sees each activation a hook replaced
        self.check: Callable[[torch.Tensor, HookPoint], None] | None = None

    @property
    def active(self) -> bool:
        return bool(self.fwd or self.bwd)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.wrap is not None:
            return self.wrap(x, self)
        if not (self.fwd or self.bwd):
            return x
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the attached hooks to the whole activation ``x``; returns the (possibly replaced) value."""
        replaced = False
        for fn in list(self.fwd):
            out = fn(x, self)
            if out is not None:
                self._check(out, x, fn)
                x, replaced = out, True
        if replaced and self.check is not None:
            self.check(x, self)
        if self.bwd and x.requires_grad:
            # bind the hooks attached now: run_with_hooks detaches them before the caller's backward()
            fns = list(self.bwd)
            x.register_hook(lambda grad: self._backward(grad, fns))
        return x

    def _backward(self, grad: torch.Tensor, fns: list[HookFn]) -> torch.Tensor:
        for fn in fns:
            out = fn(grad, self)
            if out is not None:
                self._check(out, grad, fn)
                grad = out
        return grad

    def _check(self, out: Any, ref: torch.Tensor, fn: HookFn) -> None:
        fn_name = getattr(fn, "__name__", repr(fn))
        if not isinstance(out, torch.Tensor):
            raise HookError(f"hook {fn_name} at {self.name} returned {type(out).__name__}, not a Tensor")
        if out.shape != ref.shape or out.dtype != ref.dtype or out.device != ref.device:
            raise HookError(
                f"hook {fn_name} at {self.name} returned shape {tuple(out.shape)} {out.dtype} on "
                f"{out.device}; expected {tuple(ref.shape)} {ref.dtype} on {ref.device}"
            )

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, fwd={len(self.fwd)}, bwd={len(self.bwd)})"


class HookHandle:
    """Returned by ``add_hook``; ``remove()`` detaches every hook it stands for (idempotent)."""

    def __init__(self, entries: list[tuple[list[HookFn], HookFn]]):
        self._entries = entries

    def remove(self) -> None:
        for fns, fn in self._entries:
            for i, f in enumerate(fns):
                if f is fn:
                    del fns[i]
                    break
        self._entries = []


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


class HookRegistry:
    """Hook management mixed into the model: ``add_hook``, ``hooks()``, ``run_with_hooks``, caches.

    The host class must set ``self.hook_dict`` (name -> HookPoint, in forward order) and define
    ``forward`` and ``hook_shape(name, batch, pos)``.
    """

    hook_dict: dict[str, HookPoint]

    def hook_names(self) -> list[str]:
        """Every hook point name, in forward order."""
        return list(self.hook_dict)

    def resolve_names(self, spec: NamesFilter) -> list[str]:
        """Names selected by a name, glob (``"blocks.*.moe.hook_router_probs"``), list or predicate;
        None selects every point (``run_with_cache``'s default; hooks never take None)."""
        if spec is None:
            return self.hook_names()
        if callable(spec):
            return [n for n in self.hook_dict if spec(n)]
        if isinstance(spec, str):
            spec = [spec]
        if not isinstance(spec, list | tuple | set) or not all(isinstance(s, str) for s in spec):
            raise TypeError(
                f"hook names must be a name, a glob, a list of them or a predicate fn(name) -> bool, got {spec!r}"
            )
        chosen: set[str] = set()
        for s in spec:
            if _is_glob(s):
                hits = fnmatch.filter(self.hook_dict, s)
                if not hits:
                    raise KeyError(f"no hook point matches {s!r}")
                chosen.update(hits)
            elif s in self.hook_dict:
                chosen.add(s)
            else:
                close = difflib.get_close_matches(s, self.hook_dict, n=5, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KeyError(f"no hook point named {s!r}{hint}")
        return [n for n in self.hook_dict if n in chosen]

    def add_hook(self, name: NameSpec, fn: HookFn, dir: str = "fwd") -> HookHandle:
        """Attach ``fn`` to every point ``name`` selects; returns a handle with ``.remove()``."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        if name is None or (isinstance(name, list | tuple) and not name):
            raise TypeError(f"a hook needs hook names (a name, glob, list or predicate), got {name!r}")
        if not callable(fn):
            raise TypeError(f"a hook function must be callable fn(tensor, hook), got {fn!r} for {name!r}")
        entries = []
        for n in self.resolve_names(name):
            fns = getattr(self.hook_dict[n], dir)
            fns.append(fn)
            entries.append((fns, fn))
        return HookHandle(entries)

    def reset_hooks(self) -> None:
        """Remove every hook from every point."""
        for hp in self.hook_dict.values():
            hp.fwd.clear()
            hp.bwd.clear()

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Iterable[tuple[NameSpec, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NameSpec, HookFn]] = (),
    ) -> Iterator[Any]:
        """Attach hooks for the body of a ``with`` block; they are removed on exit, also on errors.

        Hooks attached here also fire during ``generate`` (prefill: all positions, decode: the new one).
        """
        handles: list[HookHandle] = []
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for pair in pairs:
                    if not isinstance(pair, list | tuple) or len(pair) != 2:
                        raise TypeError(f"{direction}_hooks must hold (name, fn) pairs, got {pair!r}")
                    handles.append(self.add_hook(pair[0], pair[1], direction))
            yield self
        finally:
            for h in reversed(handles):
                h.remove()

    def run_with_hooks(self, input_ids: torch.Tensor, fwd_hooks=(), bwd_hooks=(), **kwargs) -> torch.Tensor:
        """Forward pass with temporary hooks; returns logits ``[batch pos vocab]``.

        Backward hooks fire when the caller runs ``.backward()`` on something computed from the logits
        inside the call; pass ``bwd_hooks`` and backpropagate through the returned logits.
        """
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(input_ids, **kwargs)

    def run_with_cache(
        self,
        input_ids: torch.Tensor,
        names_filter: NamesFilter = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        fwd_hooks: Iterable[tuple[NameSpec, HookFn]] = (),
        incl_bwd: bool = False,
        metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Forward pass storing the activations ``names_filter`` selects (all when None).

        Runs without autograd. ``fwd_hooks`` run before caching, so the cache sees edited values.
        ``device``/``dtype`` move and cast what is stored (e.g. ``device="cpu"`` to spare GPU memory).
        Returns ``(logits, cache)``; ``cache.model`` is this model. Only the selected points are
        stored, and costly points (attention scores/pattern, per-expert activations) are computed
        only when selected.

        ``incl_bwd=True`` also backpropagates ``metric(logits)`` (a scalar; default the mean
        next-token cross-entropy, TransformerLens' ``return_type="loss"``) and stores the gradient
        of each selected floating activation under ``<name>_grad``. The gradients are taken with
        ``torch.autograd.grad``: no parameter's ``.grad`` is touched. The logits then carry no graph.
        """
        if incl_bwd:
            return self._run_with_grads(input_ids, names_filter, device, dtype, fwd_hooks, metric, **kwargs)
        if metric is not None:
            raise ValueError("metric is the scalar that incl_bwd=True backpropagates; pass incl_bwd=True with it")
        store: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            store[hook.name] = _stored(x, device, dtype)

        names = self.resolve_names(names_filter)
        with torch.no_grad(), self.hooks(list(fwd_hooks) + [(n, save) for n in names]):
            logits = self(input_ids, **kwargs)
        return logits, ActivationCache({n: store[n] for n in names if n in store}, self)

    def _run_with_grads(self, input_ids, names_filter, device, dtype, fwd_hooks, metric, **kwargs):
        """``run_with_cache(incl_bwd=True)``: forward with autograd, then the gradient of the metric
        with respect to every selected floating activation (as the forward pass used it)."""
        live: dict[str, torch.Tensor] = {}

        def leaf(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            # frozen parameters give an embedding without a graph: start one so the gradients exist
            return None if x.requires_grad else x.detach().requires_grad_(True)

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            live[hook.name] = x

        names = self.resolve_names(names_filter)
        hooks = [("hook_embed", leaf), *fwd_hooks, *[(n, save) for n in names]]
        with torch.enable_grad(), self.hooks(hooks):
            logits = self(input_ids, **kwargs)
            if metric is None:
                value = _next_token_loss(logits, input_ids, kwargs.get("attention_mask"))
            else:
                value = metric(logits)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"metric(logits) must return a scalar tensor, got {value!r}")
            wanted = [n for n in names if n in live and live[n].is_floating_point() and live[n].requires_grad]
            grads = torch.autograd.grad(value.reshape(()), [live[n] for n in wanted], allow_unused=True)
        store = {n: _stored(live[n], device, dtype) for n in names if n in live}
        for n, g in zip(wanted, grads, strict=True):
            store[f"{n}_grad"] = _stored(torch.zeros_like(live[n]) if g is None else g, device, dtype)
        return logits.detach(), ActivationCache(store, self)

    def cache_size(self, input_ids: torch.Tensor, names_filter: NamesFilter = None) -> int:
        """Bytes ``run_with_cache(input_ids, names_filter)`` will store, computed without running."""
        batch, pos = input_ids.shape if input_ids.ndim == 2 else (1, input_ids.shape[0])
        total = 0
        for n in self.resolve_names(names_filter):
            shape, dtype = self.hook_shape(n, batch, pos)
            numel = 1
            for s in shape:
                numel *= s
            total += numel * torch.empty((), dtype=dtype).element_size()
        return total


def _stored(x: torch.Tensor, device, dtype) -> torch.Tensor:
    """What a cache keeps of ``x``: detached, moved to ``device``, floating values cast to ``dtype``
    (``topk_idx`` stays int64)."""
    cast = dtype if dtype is not None and x.is_floating_point() else x.dtype
    return x.detach().to(device=device or x.device, dtype=cast)


def _next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Mean cross-entropy of each position's logits on the next input token (padding left out)."""
    ids = (input_ids if input_ids.ndim == 2 else input_ids[None]).to(logits.device)
    if ids.shape[1] < 2:
        raise ValueError("the default metric (next-token loss) needs at least 2 positions; pass metric=fn(logits)")
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    )
    if attention_mask is None:
        return losses.mean()
    keep = attention_mask.reshape(ids.shape)[:, 1:].flatten().to(losses.device, losses.dtype)
    return (losses * keep).sum() / keep.sum()


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def first_edited_layer(model, hook_sets: Sequence[list]) -> int:
    """The first block any of ``hook_sets`` touches (its hook names say so), or 0 when a hook is named
    by a predicate or sits before the blocks, or the model cannot start mid-way (tensor parallel)."""
    if not hasattr(model, "forward_from") or getattr(model, "tp_mesh", None) is not None:
        return 0
    layers = []
    for name, _ in (pair for hooks in hook_sets for pair in hooks):
        found = _BLOCK.match(name) if isinstance(name, str) else None
        if found is None:
            return 0
        layers.append(int(found.group(1)))
    return min(layers, default=0)

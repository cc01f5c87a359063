"""Generation: the decode loop (``generate``, ``stream``, ``chat``), sampling, and the speed bench
(``ernie_lab.generation.bench``, imported on demand: it needs transformers)."""

from ernie_lab.generation.generate import chat, generate, stream

__all__ = ["generate", "stream", "chat"]

"""Generation: the decode loop (``generate``, ``stream``, ``chat``), sampling and the CUDA-graph decode
step. The speed benches that measure it live in their own wing, :mod:`ernie_lab.bench`."""

from ernie_lab.generation.generate import chat, generate, stream

__all__ = ["generate", "stream", "chat"]

"""Reading and writing: checkpoints (safetensors, hub sources, atomic folder swaps), tokenizers
(with SentencePiece conversion) and datasets given as texts or token ids."""

from ernie_lab.io.chat_template import ChatMessageError
from ernie_lab.io.datasets import as_sequences, iter_batches
from ernie_lab.io.tokenizer import TokenizerError, load_tokenizer
from ernie_lab.io.weights import CheckpointError, load_model, parse_dtype, save_model

__all__ = [
    "CheckpointError",
    "ChatMessageError",
    "TokenizerError",
    "load_model",
    "save_model",
    "parse_dtype",
    "load_tokenizer",
    "as_sequences",
    "iter_batches",
]

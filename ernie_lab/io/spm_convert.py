"""Convert a SentencePiece BPE ``tokenizer.model`` into a ``tokenizers.Tokenizer``.

ERNIE 4.5's hub repos ship only the SentencePiece model (a Llama-style BPE with byte fallback).
Encoding through the Rust ``tokenizers`` library is faster and gives one code path for every
checkpoint, so we translate the model once and cache the resulting ``tokenizer.json`` in the user
cache (never in the model's folder), keyed by the model file's hash.

How SentencePiece BPE maps onto ``tokenizers`` (the conversion must give SentencePiece's own ids):
- SentencePiece merges, at each step, the adjacent pair whose concatenation is the highest-scoring
  piece. A ``tokenizers`` BPE merges the lowest-ranked pair. Listing every split ``(left, right)`` of
  every normal piece whose halves are both pieces, ranked by the merged piece's score, makes the two
  procedures pick the same pair at every step.
- Characters outside the vocabulary become ``<0xNN>`` byte pieces (byte fallback), else ``<unk>``
  with runs of unknowns fused, as SentencePiece does.
- The normalizer spec is honoured in SentencePiece's order: the precompiled character map, removal of
  extra spaces, the dummy ``▁`` prefix, and spaces escaped as ``▁``. The whole text is one "word"
  (no pre-tokenizer), as in SentencePiece.
- Control pieces (``<s>``, ``</s>``, ...) and ``<unk>`` become special added tokens; user-defined
  pieces become added tokens matched on the normalized text, as SentencePiece matches them. With a
  dummy prefix that cannot work (the prefix would be normalized into the token too), so they split
  the text first and each part is encoded on its own, gaining its own ``▁`` prefix: the behaviour of
  a transformers slow tokenizer around special tokens, but not SentencePiece's on such text.

Not reproduced: SentencePiece's re-segmentation of ``UNUSED`` pieces (they are simply not merge
targets) and Unigram models (a clear error; ERNIE uses BPE).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

from ernie_lab.io.tokenizer_files import TokenizerError

INSTALL_HINT = "pip install 'ernie-lab[sentencepiece]'"

# SentencePiece piece types and model types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2
SPACE = "▁"  # U+2581, SentencePiece's escaped space


# bump when the conversion changes, so cached conversions are rebuilt
CONVERTER_VERSION = 1


def cache_root() -> Path:
    """The user cache of converted tokenizers.

    ``$ERNIE_LAB_CACHE`` if set, else ``~/.cache/ernie_lab``.
    """
    return Path(os.environ.get("ERNIE_LAB_CACHE", Path.home() / ".cache" / "ernie_lab"))


def read_model_proto(model_file: Path):
    """Parse a SentencePiece ``.model`` file into its ``ModelProto`` (needs the sentencepiece extra)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise ImportError(
            f"{model_file} is a SentencePiece model and converting it needs the optional "
            f"sentencepiece and protobuf packages: {INSTALL_HINT}"
        ) from err
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as err:  # protobuf's DecodeError and friends: the bytes are not a ModelProto
        raise TokenizerError(f"{model_file} is not a SentencePiece model ({type(err).__name__}: {err})") from err
    if not proto.pieces:  # protobuf parses many byte strings as an empty message
        raise TokenizerError(f"{model_file} is not a SentencePiece model (it holds no pieces)")
    return proto


def spm_to_tokenizer(proto) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` that encodes exactly like the SentencePiece BPE ``proto``."""
    if proto.trainer_spec.model_type != BPE_MODEL:
        raise ValueError(
            f"only SentencePiece BPE models can be converted (ERNIE 4.5 uses BPE); this model has "
            f"model_type={proto.trainer_spec.model_type}"
        )
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = next((p.piece for p in pieces if p.type == UNKNOWN), None)
    bpe = models.BPE(
        vocab=vocab,
        merges=_merges(pieces),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )
    tokenizer = Tokenizer(bpe)
    spec = proto.normalizer_spec
    tokenizer.normalizer = normalizers.Sequence(_normalizer_steps(spec))
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in (UNKNOWN, CONTROL)]
    )
    tokenizer.add_tokens(
        [
            AddedToken(p.piece, special=False, normalized=not spec.add_dummy_prefix)
            for p in pieces
            if p.type == USER_DEFINED
        ]
    )
    return tokenizer


def _merges(pieces) -> list[tuple[str, str]]:
    """Every ``(left, right)`` split of a normal piece into two mergeable pieces, best score first."""
    mergeable = {p.piece for p in pieces if p.type in (NORMAL, USER_DEFINED)}
    ranked = []
    for idx, p in enumerate(pieces):
        if p.type != NORMAL:
            continue
        text = p.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-p.score, idx, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer_steps(spec) -> list:
    """SentencePiece's normalization as ``tokenizers`` normalizers, in SentencePiece's order."""
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # SentencePiece drops leading/trailing spaces and collapses runs; only U+0020 counts.
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
        steps.append(normalizers.Replace(Regex(r"\A | \z"), ""))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return steps


def converted_tokenizer_json(model_file: Path) -> Path:
    """Path of the ``tokenizer.json`` converted from ``model_file``, converting on first use.

    The conversion lives in the user cache, ``cache_root()/tokenizers/<key>/tokenizer.json``, keyed by
    the sha256 of the model file and :data:`CONVERTER_VERSION`, never in the model's folder: a changed
    ``tokenizer.model`` (or converter) gets a fresh conversion, and a shared or read-only checkpoint is
    never written to. The file is written atomically (temp file + ``os.replace``, so concurrent loads
    never see half of it) and readable by everyone (0644), like the checkpoint it comes from.
    """
    model_file = Path(model_file)
    digest = hashlib.sha256(model_file.read_bytes() + f"\0converter {CONVERTER_VERSION}".encode()).hexdigest()
    cached = cache_root() / "tokenizers" / digest / "tokenizer.json"
    if cached.is_file():
        return cached
    text = spm_to_tokenizer(read_model_proto(model_file)).to_str(pretty=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(cached, text)
    return cached


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""A tokenizer converted from ``tokenizer.model`` is cached in the user cache, keyed by the model
file's content: never written into the (possibly shared) model folder, readable by others, and
rebuilt when the model file changes."""

from __future__ import annotations

import json

from ernie_lab.io import spm_convert


class FakeConversion:
    def __init__(self, source: bytes):
        self.source = source

    def to_str(self, pretty: bool = False) -> str:
        return json.dumps({"converted from": self.source.decode()})


def test_conversion_cache_is_keyed_by_content_and_outside_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_LAB_CACHE", str(tmp_path / "cache"))
    conversions = []
    monkeypatch.setattr(spm_convert, "read_model_proto", lambda path: path.read_bytes())
    convert = lambda proto: conversions.append(proto) or FakeConversion(proto)  # noqa: E731
    monkeypatch.setattr(spm_convert, "spm_to_tokenizer", convert)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    source = model_dir / "tokenizer.model"
    source.write_bytes(b"v1")
    first = spm_convert.converted_tokenizer_json(source)
    assert spm_convert.converted_tokenizer_json(source) == first and conversions == [b"v1"]  # reused
    assert "v1" in first.read_text() and first.is_relative_to(tmp_path / "cache")
    assert sorted(p.name for p in model_dir.iterdir()) == ["tokenizer.model"]  # nothing beside it
    assert first.stat().st_mode & 0o777 == 0o644
    source.write_bytes(b"v2")  # the model file changed: a new conversion, not the stale one
    second = spm_convert.converted_tokenizer_json(source)
    assert second != first and "v2" in second.read_text() and conversions == [b"v1", b"v2"]

"""The streaming safetensors writer: files safetensors itself reads, sharded by bytes, hashed on
the way out, in plan order only, and failing loudly (not hanging) when the disk does."""

import errno
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from btx_core.model import tensor_io
from btx_core.model.tensor_io import CheckpointReader, ShardedWriter, TensorMeta


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(64, 32, generator=g).to(torch.bfloat16), "b": torch.randn(100, generator=g),
            "c": torch.arange(12, dtype=torch.int64).reshape(3, 4), "d": torch.randn(7, 5, generator=g).half()}


def plan(ts):
    return [(k, TensorMeta(v.dtype, tuple(v.shape))) for k, v in ts.items()]


def test_shards_are_plain_safetensors_with_an_index_and_true_hashes(tmp_path):
    ts = tensors()
    writer = ShardedWriter(tmp_path, plan(ts), max_bytes=4500)
    for k, v in ts.items():
        writer.write(k, v)
    files = writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    loaded = {}
    for name in set(index["weight_map"].values()):
        loaded |= load_file(tmp_path / name)
    assert all(torch.equal(loaded[k], v) for k, v in ts.items())
    for name, entry in files.items():
        data = (tmp_path / name).read_bytes()
        assert entry.size == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    reader = CheckpointReader(tmp_path)
    assert reader.meta["a"] == TensorMeta(torch.bfloat16, (64, 32)) and torch.equal(reader.get("d"), ts["d"])


def test_tensors_out_of_plan_are_refused(tmp_path):
    ts = tensors()
    writer = ShardedWriter(tmp_path, plan(ts), max_bytes=1 << 20)
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", ts["b"])
    writer.abort()
    writer = ShardedWriter(tmp_path, plan(ts), max_bytes=1 << 20)
    writer.write("a", ts["a"])
    with pytest.raises(ValueError, match="closed before every planned tensor"):
        writer.close()
    writer.abort()


def test_a_full_disk_surfaces_as_the_error(tmp_path, monkeypatch):
    class Full:
        def __init__(self, *args):
            self.written = 0

        def write(self, data):
            self.written += len(memoryview(data).cast("B"))
            if self.written > 3000:
                raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(tensor_io, "open", Full, raising=False)
    ts = tensors()
    writer = ShardedWriter(tmp_path, plan(ts), max_bytes=1 << 20)
    with pytest.raises(OSError, match="No space left"):
        for k, v in ts.items():
            writer.write(k, v)
        writer.close()
    writer.abort()


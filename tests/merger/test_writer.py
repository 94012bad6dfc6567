"""The streaming shard writer: bytes, header and sha256 of what it wrote, including tensors large
enough to be hashed in the writer's second thread while they are written."""

from __future__ import annotations

import hashlib

import numpy as np
from safetensors.numpy import load_file

from merger.io.writer import _PARALLEL_HASH_BYTES, OutTensor, StreamingShardWriter, plan_shards


def test_written_shards_load_and_their_recorded_sha256_is_the_files(tmp_path):
    rng = np.random.default_rng(0)
    big = _PARALLEL_HASH_BYTES // 4 * 3  # float32 elements: 3x the threshold
    arrays = {"a": rng.standard_normal(big, dtype=np.float32).reshape(3, -1),
              "b": rng.standard_normal(17, dtype=np.float32),
              "c": rng.standard_normal(big, dtype=np.float32).reshape(-1, 4),
              "d": rng.standard_normal(big // 2, dtype=np.float32)}
    tensors = [OutTensor(n, "F32", a.shape) for n, a in arrays.items()]
    plans = plan_shards(tensors, max_shard_bytes=big * 4 + 100)  # a, b | c | d
    assert len(plans) == 3
    writer = StreamingShardWriter(tmp_path, plans)
    buf = np.empty(big, dtype=np.float32)
    for name, a in arrays.items():
        view = buf[: a.size]
        view[:] = a.reshape(-1)
        writer.write(name, view)  # one reused buffer, as the merge executor does
    writer.close()
    loaded = {}
    for plan in plans:
        data = (tmp_path / plan.filename).read_bytes()
        assert writer.sha256[plan.filename] == hashlib.sha256(data).hexdigest()
        header_len = 8 + int.from_bytes(data[:8], "little")
        assert header_len % 4096 == 0 and data[header_len - 1:header_len] == b" "  # data page-aligned
        loaded |= load_file(tmp_path / plan.filename)
    assert loaded.keys() == arrays.keys()
    for name, a in arrays.items():
        np.testing.assert_array_equal(loaded[name], a)

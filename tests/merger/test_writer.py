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


def _best_max(sizes, n):
    """The smallest possible largest shard over every split of `sizes`, in order, into n shards (brute force)."""
    from itertools import combinations

    best = None
    for cuts in combinations(range(1, len(sizes)), n - 1):
        bounds = (0, *cuts, len(sizes))
        worst = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_shards_as_few_as_the_limit_allows_and_balanced():
    """Greedy packing's count, each shard under the limit (a larger tensor alone), and the largest
    shard as small as that count allows: a 2.0 GB + 0.2 GB split of 2.2 GB becomes ~1.1 + 1.1."""
    rng = np.random.default_rng(1)
    for trial in range(200):
        sizes = [int(x) for x in rng.integers(1, 50, rng.integers(1, 9))]
        limit = int(rng.integers(max(sizes) if trial % 5 else 1, sum(sizes) + 2))
        tensors = [OutTensor(f"t{i}", "U8", (s,)) for i, s in enumerate(sizes)]
        plans = plan_shards(tensors, limit)
        greedy = 1
        size = 0
        for s in sizes:  # the greedy count, for reference
            if size and size + s > limit:
                greedy, size = greedy + 1, 0
            size += s
        assert len(plans) == greedy
        assert [t.name for p in plans for t in p.tensors] == [t.name for t in tensors]  # in order
        shard_bytes = [sum(t.nbytes for t in p.tensors) for p in plans]
        assert all(b <= limit or len(p.tensors) == 1 for b, p in zip(shard_bytes, plans))
        if all(s <= limit for s in sizes):
            assert max(shard_bytes) == _best_max(sizes, len(plans))
    mb = 1 << 20
    llama = [OutTensor(f"t{i}", "U8", (23 * mb,)) for i in range(95)]  # 2.2 GB in 23 MB tensors
    assert [p.size // 10**8 for p in plan_shards(llama, 2 * 10**9)] == [11, 11]


def test_two_shards_written_side_by_side_from_two_threads(tmp_path):
    """What merger/ordered.py does: each shard's tensors in order from a thread of its own, the shards'
    writes interleaved; the files and hashes are those of writing one after the other."""
    import threading

    rng = np.random.default_rng(2)
    arrays = {f"t{i}": rng.standard_normal(3000 + 997 * i, dtype=np.float32) for i in range(8)}
    plans = plan_shards([OutTensor(n, "F32", a.shape) for n, a in arrays.items()], 4 * 30000)
    assert len(plans) >= 2
    (tmp_path / "seq").mkdir()
    seq = StreamingShardWriter(tmp_path / "seq", plans)
    for name, a in arrays.items():
        seq.write(name, a)
    seq.close()
    (tmp_path / "par").mkdir()
    par = StreamingShardWriter(tmp_path / "par", plans)
    turn = threading.Semaphore(1)

    def shard(plan):
        for t in plan.tensors:
            with turn:  # tensor by tensor, alternating with the other thread where it can
                par.write(t.name, arrays[t.name])

    threads = [threading.Thread(target=shard, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    par.close()
    assert par.sha256 == seq.sha256
    for plan in plans:
        data = (tmp_path / "par" / plan.filename).read_bytes()
        assert data == (tmp_path / "seq" / plan.filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == par.sha256[plan.filename]


def test_a_tensor_out_of_its_shards_order_or_a_shard_left_short_is_refused(tmp_path):
    import pytest

    tensors = [OutTensor(n, "F32", (10,)) for n in "abcd"]
    plans = plan_shards(tensors, 80)  # a, b | c, d
    assert [len(p.tensors) for p in plans] == [2, 2]
    w = StreamingShardWriter(tmp_path, plans)
    w.write("c", np.zeros(10, dtype=np.float32))  # the second shard first: allowed
    with pytest.raises(AssertionError, match="expected a in model-00001-of-00002.safetensors, got b"):
        w.write("b", np.zeros(10, dtype=np.float32))
    w.write("a", np.zeros(10, dtype=np.float32))
    w.write("b", np.zeros(10, dtype=np.float32))
    with pytest.raises(AssertionError, match=r"model-00002-of-00002.safetensors'\] incomplete"):
        w.close()
    w.abort()

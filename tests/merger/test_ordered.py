"""The torch-free path's ordered pass (merger/ordered.py): each chunk hashed by its merge worker, in file
order, through merger/native's hash_in_turn and libcrypto's SHA-256 (merger/io/sha256_ctx.py). Same files
and digests as the writer's hashing, every byte in order, failures that stop every thread."""

from __future__ import annotations

import ctypes
import hashlib
import threading
import time

import numpy as np
import pytest
import torch

from merger import native
from merger.api import MergeOptions, merge
from merger.core.plan import AddLora, TensorTask
from merger.errors import NonFiniteError, OutputError
from merger.io import sha256_ctx
from merger.io.writer import OutTensor, StreamingShardWriter, plan_shards
from merger import ordered
from tests.merger.common import make_adapter, tiny_model


@pytest.fixture
def sha():
    lib = sha256_ctx.load()
    if lib is None:
        pytest.skip(f"no libcrypto here: {sha256_ctx.last_error}")
    return lib


@pytest.fixture
def in_turn(kernel):
    return native.hash_in_turn()


def _files_sha256(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("isa", [2, 0])  # merge and hash in one call where the turn is ours; GEMM, then hash
@pytest.mark.parametrize("shard_size,chunk", [("2GB", 1 << 19), ("8KB", 1 << 19), ("2GB", 100), ("20KB", 100)])
def test_same_files_and_digests_as_the_writers_hash(tmp_path, monkeypatch, kernel, sha, shard_size, chunk, isa):
    """One shard; many, some holding one tensor; one row a chunk (many chunks per tensor), in one
    shard (the workers share it turn by turn) and in many (side by side)."""
    monkeypatch.setattr(ordered.fast, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(ctypes.c_int.in_dll(native.library(), "merge_lora_isa"), "value", isa)
    assert isa != 0 or native.merge_lora_bf16_in_turn() is None
    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=12, target_modules="all-linear")
    opts = MergeOptions(shard_size=shard_size)
    fast = merge(base, [adapter], tmp_path / "ordered", opts)
    monkeypatch.setenv("SWITCHYARD_ORDERED", "0")
    plain = merge(base, [adapter], tmp_path / "plain", opts)
    res = fast.provenance["resources"]
    assert res["output_sha256"].startswith("by the merge workers") and res["torch"].startswith("not used")
    assert plain.provenance["resources"]["output_sha256"] == "by the writer's hash thread"
    digests = fast.provenance["output"]["shards_sha256"]
    assert len(digests) == (1 if shard_size == "2GB" else len(_files_sha256(tmp_path / "plain")))
    assert shard_size == "2GB" or len(digests) > 2
    assert digests == _files_sha256(tmp_path / "ordered") == _files_sha256(tmp_path / "plain")
    assert digests == plain.provenance["output"]["shards_sha256"]
    assert fast.rounding == plain.rounding  # every chunk's sums counted


def _task(name, shape, steps=()):
    return TensorTask(name, name, "BF16", "BF16", shape, steps)


def test_units_cover_every_row_and_byte_in_file_order():
    lora = (AddLora(None, "a"),)  # units() looks only at whether there are steps
    tasks = [_task("embed", (300, 64)), _task("q", (1000, 1000), lora), _task("norm", (64,)), _task("e", (0, 64), lora)]
    nbytes = [300 * 64 * 2, 1000 * 1000 * 2, 128, 0]
    shards = plan_shards([OutTensor(t.name, "BF16", t.shape) for t in tasks], 1 << 20)
    steps = ordered.units(tasks, nbytes, shards)
    assert [s for s in range(len(shards))] == [u.shard for u in steps if u.task == -1]
    assert [u.task for u in steps if u.task >= 0] == sorted(u.task for u in steps if u.task >= 0)  # file order
    assert steps[0] == ordered.Unit(0, -1, 0, 0)
    for i, task in enumerate(tasks):
        mine = [u for u in steps if u.task == i]
        end = task.shape[0] if task.steps else nbytes[i]
        assert mine[0].lo == 0 and mine[-1].hi == end
        assert all(a.hi == b.lo for a, b in zip(mine, mine[1:]))  # contiguous, no overlap
    assert len([u for u in steps if u.task == 1]) == -(-1000 // (ordered.fast.CHUNK_ELEMENTS // 1000))
    with pytest.raises(AssertionError, match="shard plan has"):
        ordered.units(list(reversed(tasks)), nbytes[::-1], shards)


def test_depth_follows_the_largest_tensor():
    mb = 1 << 20
    assert ordered.depth_for(22 * mb, 125 * mb) == ordered.MAX_DEPTH  # 1.1B: 22 MiB MLP, 125 MiB embedding
    assert ordered.depth_for(22 * mb, 55 * mb) == 3  # 3 + 2 tensors of 22 MiB in 2 x 55 MiB
    assert ordered.depth_for(112 * mb, 1002 * mb) == 4  # 8B shape: IN_FLIGHT_BYTES
    assert ordered.depth_for(200 * mb, 2000 * mb) == ordered.MIN_DEPTH
    assert ordered.depth_for(22 * mb, 22 * mb) == ordered.MIN_DEPTH  # no larger tensor: two, as ever


def test_sha256_ctx_matches_hashlib(sha):
    for parts in ([], [b""], [b"abc"], [b"x" * 1000, b"", b"y" * (1 << 20) + b"z"]):
        ctx = sha.new(b"head")
        for p in parts:
            ctx.update(p)
        assert ctx.hexdigest() == hashlib.sha256(b"head" + b"".join(parts)).hexdigest()


def test_hash_in_turn_hashes_in_turn_order_whatever_the_call_order(sha, in_turn):
    chunks = [bytes([i]) * (1000 + i) for i in range(6)]
    turn = np.zeros(2, dtype=np.int64)
    ctx = sha.new()

    def hash_step(k):
        buf = np.frombuffer(chunks[k], dtype=np.uint8)
        assert in_turn(buf.ctypes.data, buf.nbytes, turn.ctypes.data, k, sha.update_address, ctx.address) == 0

    threads = [threading.Thread(target=hash_step, args=(k,)) for k in (5, 3, 4, 1, 2, 0)]  # waiters first
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert turn[0] == 6
    assert ctx.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_hash_in_turn_gives_up_when_told(sha, in_turn):
    turn = np.array([0, 0], dtype=np.int64)
    ctx = sha.new()
    buf = np.zeros(8, dtype=np.uint8)
    result = []
    t = threading.Thread(target=lambda: result.append(
        in_turn(buf.ctypes.data, 8, turn.ctypes.data, 3, sha.update_address, ctx.address)))
    t.start()
    t.join(timeout=0.2)
    assert t.is_alive()  # step 3 waits for steps 0-2
    turn[1] = 1
    t.join(timeout=30)
    assert result == [-1] and turn[0] == 0


def test_nan_in_a_copied_base_tensor_stops_the_pass(tmp_path, kernel, sha):
    from safetensors.torch import load_file, save_file

    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    f = next(base.glob("*.safetensors"))
    t = load_file(f)
    t["model.embed_tokens.weight"][3, 1] = float("nan")  # copied unchanged: checked by a worker
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="model.embed_tokens.weight has NaN/Inf"):
        merge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_worker_that_fails_releases_the_one_waiting_for_its_turn(tmp_path, monkeypatch, kernel, sha):
    """Step 4 fails after step 5 is computed and waiting in hash_in_turn for it: the pass must tell
    that worker to give up (turn[1]), or it would spin for ever."""
    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules="all-linear")
    real = ordered._Pass._step

    def step(self, k, u, t, s, scratch):
        if k == 4:
            time.sleep(0.5)
            raise NonFiniteError("merged tensor x has NaN/Inf values", "test")
        return real(self, k, u, t, s, scratch)

    monkeypatch.setattr(ordered._Pass, "_step", step)
    errors = []
    run = threading.Thread(target=lambda: errors.append(_raises(lambda: merge(base, [adapter], tmp_path / "out"))),
                           daemon=True)
    run.start()
    run.join(timeout=60)
    assert not run.is_alive(), "a merge worker is still waiting for its turn"
    assert isinstance(errors[0], NonFiniteError)
    assert not (tmp_path / "out").exists()


def _raises(fn):
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


def test_a_failed_write_stops_the_workers_and_leaves_nothing(tmp_path, monkeypatch, kernel, sha):
    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules="all-linear")
    real = StreamingShardWriter.write
    calls = []

    def failing(self, name, data):
        calls.append(name)
        if len(calls) == 3:
            raise OutputError("disk full while writing model.safetensors", "free space")
        return real(self, name, data)

    monkeypatch.setattr(StreamingShardWriter, "write", failing)
    before = threading.active_count()
    with pytest.raises(OutputError, match="disk full"):
        merge(base, [adapter], tmp_path / "out", MergeOptions(shard_size="8KB"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert threading.active_count() <= before  # the merge workers ended (no one left spinning)


def test_without_libcrypto_the_writer_hashes(tmp_path, monkeypatch, kernel):
    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj", "v_proj"])
    monkeypatch.setattr(sha256_ctx, "load", lambda: None)
    r = merge(base, [adapter], tmp_path / "out")
    assert r.provenance["resources"]["output_sha256"] == "by the writer's hash thread"
    assert r.provenance["resources"]["torch"].startswith("not used")
    assert r.provenance["output"]["shards_sha256"] == _files_sha256(tmp_path / "out")


def test_libcrypto_that_disagrees_with_hashlib_is_not_used(monkeypatch):
    monkeypatch.setattr(sha256_ctx, "_loaded", {})
    monkeypatch.setattr(sha256_ctx.hashlib, "sha256", lambda data=b"": hashlib.md5(data))  # a "different" digest
    assert sha256_ctx.load() is None
    assert "disagrees with hashlib" in sha256_ctx.last_error
    monkeypatch.setattr(sha256_ctx, "_loaded", {})
    monkeypatch.setattr(sha256_ctx.ctypes.util, "find_library", lambda name: None)
    assert sha256_ctx.load() is None and "libcrypto not found" in sha256_ctx.last_error


@pytest.mark.parametrize("rows,cols", [(97, 1000), (64, 256), (3, 7), (0, 16)])
def test_merge_and_hash_in_one_call_same_bits_sums_and_digest(sha, lora_kernel, rows, cols):
    """merge_lora_bf16_in_turn, whether the turn is already the caller's (rows hashed as computed,
    ~every 32 KiB: several updates for 97 x 1000) or passed on later by another thread (computed,
    then hashed in turn): the output and sums of merge_lora_bf16, and the digest of exactly those bytes."""
    fused = native.merge_lora_bf16_in_turn()
    if fused is None:
        pytest.skip("no vector routine for merge_lora_bf16 here")
    g = np.random.default_rng(rows + cols)
    rank = 8
    L = g.standard_normal((rows, rank), dtype=np.float32) * 0.05
    R = g.standard_normal((rank, cols), dtype=np.float32) * 0.02
    base = g.integers(0x3000, 0x3f00, (rows, cols), dtype=np.uint16)
    work = np.empty(4 * max(cols, 1), dtype=np.float32)
    want = np.empty_like(base)
    want_sums, want_same = np.zeros(2), np.zeros(1, dtype=np.int64)
    lora_kernel(base.ctypes.data, L.ctypes.data, R.ctypes.data, rank, rows, cols, work.ctypes.data, want.ctypes.data,
                want_sums.ctypes.data, want_same.ctypes.data)
    header = b"previous step"
    for ours in (True, False):
        out = np.full_like(base, 0xFFFF)
        sums, same = np.zeros(2), np.zeros(1, dtype=np.int64)
        turn = np.array([0 if ours else -1, 0], dtype=np.int64)  # not ours: step -1 is still hashing
        ctx = sha.new(header)
        result = []
        t = threading.Thread(target=lambda: result.append(fused(
            base.ctypes.data, L.ctypes.data, R.ctypes.data, rank, rows, cols, work.ctypes.data, out.ctypes.data,
            sums.ctypes.data, same.ctypes.data, turn.ctypes.data, 0, sha.update_address, ctx.address)))
        t.start()
        if not ours:
            t.join(timeout=0.3)
            assert t.is_alive() and turn[0] == -1  # computed, waiting for its turn
            turn[0] = 0
        t.join(timeout=30)
        assert result == [0] and turn[0] == 1
        assert np.array_equal(out, want)
        assert np.array_equal(sums, want_sums) and same[0] == want_same[0]
        assert ctx.hexdigest() == hashlib.sha256(header + want.tobytes()).hexdigest()


def test_merge_and_hash_in_one_call_gives_up_when_told(sha, lora_kernel):
    fused = native.merge_lora_bf16_in_turn()
    if fused is None:
        pytest.skip("no vector routine for merge_lora_bf16 here")
    L, R = np.zeros((4, 2), dtype=np.float32), np.zeros((2, 8), dtype=np.float32)
    base, out, work = np.zeros((4, 8), dtype=np.uint16), np.zeros((4, 8), dtype=np.uint16), np.zeros(32, dtype=np.float32)
    sums, same = np.zeros(2), np.zeros(1, dtype=np.int64)
    ctx = sha.new()
    for turn in (np.array([0, 1], dtype=np.int64), np.array([5, 1], dtype=np.int64)):  # ours or not: aborted
        assert fused(base.ctypes.data, L.ctypes.data, R.ctypes.data, 2, 4, 8, work.ctypes.data, out.ctypes.data,
                     sums.ctypes.data, same.ctypes.data, turn.ctypes.data, 0, sha.update_address, ctx.address) == -1
        assert turn[0] in (0, 5)  # not passed on


def _bare_pass(nexts, ends, on):
    p = object.__new__(ordered._Pass)
    p.next, p.end, p.on = list(nexts), list(ends), list(on)
    return p


def test_a_worker_keeps_its_shard_then_takes_one_nobody_hashes_then_shares():
    """Shards are hashed side by side (one sha256 stream each): a worker stays on its shard while it
    has steps; then takes the first shard no worker is on; then joins the one with most steps left."""
    p = _bare_pass(nexts=[3, 10, 20, 30], ends=[10, 20, 30, 40], on=[1, 1, 0, 0])
    assert p._lane(0) == 0 and p._lane(1) == 1
    assert p._lane(None) == 2  # a new worker: the first shard nobody is on
    p = _bare_pass(nexts=[10, 12, 20, 30], ends=[10, 20, 30, 40], on=[1, 1, 0, 0])
    assert p._lane(0) == 2  # shard 0 done: not shard 1 (another worker's), shard 2
    p = _bare_pass(nexts=[10, 12, 25, 40], ends=[10, 20, 30, 40], on=[1, 1, 0, 0])
    assert p._lane(0) == 2  # no worker on shard 2 (steps left), though shard 1 has more
    p = _bare_pass(nexts=[10, 12, 25, 40], ends=[10, 20, 30, 40], on=[1, 1, 1, 0])
    assert p._lane(0) == 1  # every shard with steps has a worker: the one with most left (8 > 5)
    p = _bare_pass(nexts=[10, 20], ends=[10, 20], on=[1, 1])
    assert p._lane(0) is None and p._lane(None) is None


def test_hashed_but_unwritten_bytes_stay_within_the_budget_when_the_disk_is_slow(tmp_path, monkeypatch, kernel, sha):
    """Workers may run ahead of slow writers only by the budget: merged outputs and copied slices
    alike (copied slices once ran ahead unbounded: 155 MB more for a 400 MB model, test_memory_bound)."""
    monkeypatch.setattr(ordered, "SLICE_BYTES", 4096)  # many copied slices
    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])  # the rest is copied
    lock, state, totals = threading.Lock(), {"now": 0, "max": 0, "request": 0}, []

    def add(n):
        with lock:
            state["now"] += n
            state["max"] = max(state["max"], state["now"])
            state["request"] = max(state["request"], n)

    real_init, real_step, real_slice, real_write = (ordered._Memory.__init__, ordered._Pass._step,
                                                     ordered._Pass._write_slice, ordered._Pass.write)

    def init(self, total):
        totals.append(total)
        real_init(self, total)

    def step(self, k, u, t, s, scratch):
        rc = real_step(self, k, u, t, s, scratch)
        if u.task >= 0 and (not self.tasks[u.task].steps or k == self.first[u.task]):
            add(u.hi - u.lo if not self.tasks[u.task].steps else self.infos[u.task].nbytes)
        return rc

    def write_slice(self, k, i):
        done = real_slice(self, k, i)
        add(-(self.steps[k].hi - self.steps[k].lo))
        return done

    def write(self, i):
        st = real_write(self, i)
        add(-self.infos[i].nbytes)
        return st

    real_io = StreamingShardWriter._write

    def slow(self, shard, data):
        time.sleep(0.002)
        real_io(self, shard, data)

    monkeypatch.setattr(ordered._Memory, "__init__", init)
    monkeypatch.setattr(ordered._Pass, "_step", step)
    monkeypatch.setattr(ordered._Pass, "_write_slice", write_slice)
    monkeypatch.setattr(ordered._Pass, "write", write)
    monkeypatch.setattr(StreamingShardWriter, "_write", slow)
    res = merge(base, [adapter], tmp_path / "out", MergeOptions(shard_size="40KB"))
    assert res.provenance["resources"]["output_sha256"].startswith("by the merge workers")
    assert state["now"] == 0 and len(totals) == 1
    # counted just after the budget's take and give: one request more may show
    assert 0 < state["max"] <= totals[0] + state["request"], (state["max"], totals[0], state["request"])


def test_memory_keeps_written_outputs_for_reuse_within_its_total():
    """Written outputs are kept for the next tensor of their size (fresh pages cost a fault and a
    zeroing each), but counted: what is kept, in flight or not, stays within the total; kept buffers
    in the way of a request are let go; one request larger than the total passes when nothing is held."""
    mem = ordered._Memory(100)
    a = mem.buffer(40)
    b = mem.buffer(40)
    assert a is not None and b is not None and mem.used == 80
    assert a.ctypes.data % 4096 == 0  # page-aligned, for O_DIRECT
    assert mem.buffer(40) is None and not mem.take(30)  # in flight: no room
    assert mem.take(20) and mem.used == 100
    mem.give(20)
    mem.keep(a)
    assert mem.used == 80  # kept, still counted
    assert mem.buffer(40) is a and mem.used == 80  # reused, not counted twice
    mem.keep(a)
    mem.keep(b)
    c = mem.buffer(60)  # a new size: kept buffers make room (one goes: 40 + 60 fits)
    assert c is not None and mem.used == 100
    assert mem.take(1) and mem.used == 61  # the other kept one goes
    mem.give(1)
    mem.keep(c)
    assert mem.used == 60 and mem.take(90) and mem.used == 90  # kept buffers go until it fits
    mem.give(90)
    assert mem.used == 0
    big = ordered._Memory(10)
    assert big.buffer(50) is not None and big.used == 50  # alone: let through
    assert not big.take(1)

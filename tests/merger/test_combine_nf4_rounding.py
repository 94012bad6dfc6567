"""Multi-adapter combine methods on full deltas, NF4 base, and the rounding-loss report."""

from __future__ import annotations

import pytest
import torch

from merger.api import MergeOptions, merge
from merger.core.combine import combine, elect_and_merge, magnitude_trim
from merger.core.nf4 import NF4_CODE, dequantize_nf4, nf4_roundtrip, quantize_nf4
from tests.merger.common import load_output, make_adapter, tiny_model


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    base = tiny_model(root / "base", "llama")
    a = make_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_adapter(base, root / "b", seed=2, r=2, lora_alpha=2, target_modules=["v_proj", "o_proj"])
    return base, a, b


def _full_deltas(adapter_dir):
    """Reference deltas straight from the files: scale * B @ A per base tensor, float64."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for k in t:
        if k.endswith("lora_A.weight"):
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            B = t[k.replace("lora_A", "lora_B")].double()
            out[mod + ".weight"] = B @ t[k].double() * (cfg["lora_alpha"] / cfg["r"])
    return out


def test_linear_is_weighted_sum_of_full_deltas(two, tmp_path):
    base, a, b = two
    out = merge(base, [a, b], tmp_path / "out", MergeOptions(combine="linear", weights=(0.7, 0.3), precise=True)).out
    got, w0 = load_output(out), load_output(base)
    da, db = _full_deltas(a), _full_deltas(b)
    for name in set(da) | set(db):
        want = w0[name].double() + 0.7 * da.get(name, 0) + 0.3 * db.get(name, 0)
        torch.testing.assert_close(got[name].double(), want, rtol=2e-7, atol=1e-7)
    # exact, unlike factor-space averaging: v_proj (both adapters) is not (sum B)(sum A)
    assert not torch.allclose(got["model.layers.0.self_attn.v_proj.weight"], w0["model.layers.0.self_attn.v_proj.weight"])


def test_ties_matches_peft_merge_utils_on_full_deltas(two, tmp_path):
    from peft.utils.merge_utils import ties

    base, a, b = two
    out = merge(base, [a, b], tmp_path / "out",
                MergeOptions(combine="ties", weights=(1.0, 0.5), density=0.5, precise=True)).out
    got, w0 = load_output(out), load_output(base)
    da, db = _full_deltas(a), _full_deltas(b)
    name = "model.layers.1.self_attn.v_proj.weight"
    want = w0[name].double() + ties([da[name], db[name]], torch.tensor([1.0, 0.5], dtype=torch.float64), 0.5)
    torch.testing.assert_close(got[name].double(), want, rtol=2e-7, atol=1e-7)


def test_ties_sign_election_and_disjoint_mean():
    d1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    d2 = torch.tensor([-3.0, -1.0, 1.0, 2.0])
    merged = elect_and_merge([d1, d2], [1.0, 1.0])
    # signs: -2 -> -, -3 -> -, 4 -> +, 2 -> +; means over agreeing entries only
    assert merged.tolist() == [-3.0, -1.5, 2.0, 2.0]
    assert magnitude_trim(torch.tensor([0.1, -5.0, 2.0, -0.2]), 0.5).tolist() == [0.0, -5.0, 2.0, -0.0]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_with_seed(method):
    ds = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    one = combine(method, ds, [1.0, 1.0], 0.3, seed=7, name="x")
    assert torch.equal(one, combine(method, ds, [1.0, 1.0], 0.3, seed=7, name="x"))
    assert not torch.equal(one, combine(method, ds, [1.0, 1.0], 0.3, seed=8, name="x"))
    if method == "dare_linear":  # kept entries are rescaled by 1/density: unbiased in expectation
        big = [torch.ones(200_000)]
        assert abs(combine(method, big, [1.0], 0.3, seed=1, name="y").mean().item() - 1.0) < 0.02


def test_combine_refuses_dora(two, tmp_path):
    from merger.errors import UnsupportedAdapterError

    base, a, _ = two
    d = make_adapter(base, tmp_path / "d", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="sequential"):
        merge(base, [a, d], tmp_path / "out", MergeOptions(combine="ties"))


def test_nf4_roundtrip_uses_codebook_and_blocks():
    w = torch.randn(8, 64 * 3, generator=torch.Generator().manual_seed(0))
    codes, absmax = quantize_nf4(w)
    assert absmax.shape == (8 * 3,) and codes.max() <= 15
    rt = dequantize_nf4(codes, absmax, w.shape, w.dtype)
    blocks, rblocks = w.reshape(-1, 64), rt.reshape(-1, 64)
    code = torch.tensor(NF4_CODE)
    # every value is a code point times its block's absmax, and the nearest one
    scaled = rblocks / blocks.abs().amax(1, keepdim=True)
    assert torch.allclose(scaled.unsqueeze(-1).sub(code).abs().min(-1).values, torch.zeros(()), atol=1e-6)
    nearest = code[(blocks / blocks.abs().amax(1, keepdim=True)).unsqueeze(-1).sub(code).abs().argmin(-1)]
    assert torch.allclose(scaled, nearest, atol=1e-6)
    assert torch.equal(blocks.abs().amax(1), rblocks.abs().amax(1))  # the absmax value is exact


def test_qlora_nf4_base_and_report(two, tmp_path):
    base, a, _ = two
    res = merge(base, [a], tmp_path / "out", MergeOptions(qlora_base="nf4", precise=True))
    got, w0 = load_output(res.out), load_output(base)
    da = _full_deltas(a)
    name = "model.layers.0.self_attn.q_proj.weight"
    want = nf4_roundtrip(w0[name]).double() + da[name]
    torch.testing.assert_close(got[name].double(), want, rtol=2e-7, atol=1e-7)
    ratios = res.rounding["nf4_quant_error_over_delta"]
    assert ratios[name] > 0
    # untargeted linear layers are the dequantized weights too; embeddings and norms are untouched
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], nf4_roundtrip(w0["model.layers.0.mlp.up_proj.weight"]))
    assert torch.equal(got["model.embed_tokens.weight"], w0["model.embed_tokens.weight"])


def test_rounding_loss_report_in_bf16(tmp_path):
    base = tiny_model(tmp_path / "base", "llama", dtype=torch.bfloat16)
    ad = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=0.002, target_modules=["q_proj"])  # tiny deltas
    res = merge(base, [ad], tmp_path / "out")
    r = res.rounding
    assert r["tensors_merged"] == 2 and r["delta_entries"] > 0
    assert 0.2 < r["vanished_share"] <= 1.0  # |dW| << |w|/256 mostly rounds away in bf16
    prov = res.provenance
    assert prov["rounding"]["vanished_share"] == r["vanished_share"]
    big = make_adapter(base, tmp_path / "big", r=2, lora_alpha=64, target_modules=["q_proj"])
    assert merge(base, [big], tmp_path / "out2").rounding["vanished_share"] < r["vanished_share"]


def test_provenance_and_output_files(two, tmp_path):
    import hashlib
    import json

    base, a, _ = two
    res = merge(base, [a], tmp_path / "out", MergeOptions(dtype="bfloat16", shard_size="10KB"))
    prov = json.loads((res.out / "switchyard.json").read_text())
    shards = sorted(p.name for p in res.out.glob("*.safetensors"))
    assert len(shards) > 1 and (res.out / "model.safetensors.index.json").exists()
    for s in shards:
        assert prov["output"]["shards_sha256"][s] == hashlib.sha256((res.out / s).read_bytes()).hexdigest()
    assert prov["base"]["shards_sha256"]["model.safetensors"] == hashlib.sha256(
        (base / "model.safetensors").read_bytes()).hexdigest()
    assert prov["adapters"][0]["sha256"] == hashlib.sha256((a / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert prov["adapters"][0]["config"]["r"] == 4 and prov["options"]["dtype"] == "bfloat16"
    assert json.loads((res.out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (res.out / "README.md").exists() and prov["started"] <= prov["finished"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(res.out).dtype == torch.bfloat16

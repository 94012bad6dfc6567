"""Adapter folders are judged before vLLM sees them: root, files, safetensors header, rank, modules, shapes."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from gateway.adapters import inspect_adapter, load_base_shapes, read_safetensors_header
from gateway.core.adapter_checks import header_length, parse_header
from gateway.core.errors import AdapterRejected
from tests.gateway.tiny import HIDDEN, write_adapter, write_base


@pytest.fixture()
def base(tmp_path):
    return load_base_shapes(write_base(tmp_path / "base"))


def check(path, root, base, max_rank=8):
    return inspect_adapter(path, root=root, base=base, max_lora_rank=max_rank)


def test_a_good_adapter_passes_and_reports_what_it_changes(tmp_path, base):
    root = tmp_path / "adapters"
    write_adapter(root / "good", r=4)
    folder, summary = check("good", root, base)  # relative paths resolve under the root
    assert folder == (root / "good").resolve()
    assert summary.rank == 4 and len(summary.modules) == 4 and summary.tensors == 8
    assert "model.layers.0.self_attn.q_proj" in summary.modules


def test_paths_outside_the_root_are_refused_even_through_symlinks(tmp_path, base):
    root = tmp_path / "adapters"
    outside = write_adapter(tmp_path / "elsewhere" / "a")
    root.mkdir()
    os.symlink(outside, root / "sneaky")
    for path in (outside, root / "sneaky", root / ".." / "elsewhere" / "a", "../elsewhere/a"):
        with pytest.raises(AdapterRejected, match="outside the adapters root"):
            check(path, root, base)
    _, trusted = check(outside, None, base)  # root=None: a trusted caller (the deployment file)
    assert trusted.rank == 2


@pytest.mark.parametrize("case, needle", [
    ("pickle", "pickle"), ("no_config", "adapter_config.json"), ("no_weights", "adapter_model.safetensors"),
    ("rank", "max_lora_rank"), ("config_rank", "max_lora_rank"), ("targets", "match no module"),
    ("shape", "do not fit"), ("unpaired", "without its pair"), ("foreign", "does not have"),
    ("dora", "DoRA"), ("not_file", "not a folder"),
])
def test_bad_adapters_are_refused_with_the_reason(tmp_path, base, case, needle):
    root = tmp_path / "adapters"
    a = root / "a"
    if case == "not_file":
        root.mkdir()
        (root / "a").write_text("x")
    elif case == "rank":
        write_adapter(a, r=16)
    elif case == "config_rank":
        write_adapter(a, r=2, config_r=64)
    elif case == "targets":
        write_adapter(a, targets=("c_attn",), extra_tensors={})  # GPT-2 style names: nothing in a Llama
    elif case == "shape":
        write_adapter(a, r=2, shapes={"q_proj": ((2, HIDDEN + 1), (HIDDEN, 2))})
    elif case == "unpaired":
        write_adapter(a, extra_tensors={"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight":
                                        np.zeros((2, HIDDEN), np.float32)})
    elif case == "foreign":
        write_adapter(a, extra_tensors={
            "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": np.zeros((2, HIDDEN), np.float32),
            "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": np.zeros((HIDDEN, 2), np.float32)})
    else:
        write_adapter(a)
        if case == "pickle":
            (a / "adapter_model.bin").write_bytes(b"\x80\x04N.")
        elif case == "no_config":
            (a / "adapter_config.json").unlink()
        elif case == "no_weights":
            (a / "adapter_model.safetensors").unlink()
        elif case == "dora":
            cfg = json.loads((a / "adapter_config.json").read_text())
            (a / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterRejected) as e:
        check("a", root, base)
    assert needle in e.value.one_line()
    assert e.value.status == 422


def test_corrupt_safetensors_headers_are_refused(tmp_path):
    good = write_adapter(tmp_path / "a") / "adapter_model.safetensors"
    data = good.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    assert read_safetensors_header(good)  # the untouched file parses
    with pytest.raises(AdapterRejected, match="does not fit"):
        header_length(struct.pack("<Q", 10**12), len(data))
    with pytest.raises(AdapterRejected, match="shorter than 8"):
        header_length(b"\x01", 1)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    start, end = header[name]["data_offsets"]
    for bad in ({**header, name: {**header[name], "data_offsets": [start, end + 4]}},      # length != shape
                {**header, name: {**header[name], "data_offsets": [start, len(data) * 2]}},  # past the end
                {**header, name: {**header[name], "dtype": "PICKLE"}}):
        with pytest.raises(AdapterRejected):
            parse_header(json.dumps(bad).encode(), len(data) - 8 - n)
    other = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"  # same shape as `name`
    overlap = {**header, other: {**header[other], "data_offsets": [start, end]}}
    with pytest.raises(AdapterRejected, match="overlap"):
        parse_header(json.dumps(overlap).encode(), len(data) - 8 - n)
    with pytest.raises(AdapterRejected, match="not valid JSON"):
        parse_header(b"{not json", 100)

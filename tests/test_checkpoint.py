"""fastdiff.models.checkpoint: weight files, model folders, state_dict matching and its errors."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from fastdiff.models.checkpoint import (
    CheckpointError,
    find_weights,
    match_state_dict,
    read_model_folder,
    read_state_dict,
    resolve_model_folder,
)


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
            "blocks.0.proj.weight": torch.randn(8, 4, generator=g)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt", ".pth", ".ckpt"])
def test_read_state_dict_formats(tmp_path, state, suffix):
    path = tmp_path / f"weights{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    assert_same(read_state_dict(path), state)


def test_read_state_dict_unwraps_training_checkpoints(tmp_path, state):
    torch.save({"state_dict": state, "epoch": 7, "optimizer_name": "adam"}, tmp_path / "ckpt.pt")
    assert_same(read_state_dict(tmp_path / "ckpt.pt"), state)


def test_read_state_dict_sharded_index(tmp_path, state):
    names = sorted(state)
    save_file({k: state[k] for k in names[:2]}, tmp_path / "m-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[2:]}, tmp_path / "m-00002-of-00002.safetensors")
    weight_map = {k: "m-00001-of-00002.safetensors" if k in names[:2] else "m-00002-of-00002.safetensors" for k in names}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same(read_state_dict(tmp_path / "m.safetensors.index.json"), state)


class NotATensor:
    pass


def test_pickles_are_read_weights_only(tmp_path, state):
    torch.save({**state, "hook": NotATensor()}, tmp_path / "evil.pt")  # a full unpickle would build NotATensor
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(tmp_path / "evil.pt")


def test_non_tensor_entries_are_refused(tmp_path, state):
    torch.save({**state, "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="1 entries are not tensors.*step"):
        read_state_dict(tmp_path / "mixed.pt")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.safetensors"):
        read_state_dict(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_file_error_names_the_file(tmp_path, state, suffix, damage):
    good = tmp_path / f"good{suffix}"
    save_file(state, good) if suffix == ".safetensors" else torch.save(state, good)
    data = {"garbage": b"\x00\x17 not a weight file " * 40, "truncated": good.read_bytes()[: good.stat().st_size // 2], "empty": b""}[damage]
    bad = tmp_path / f"diffusion_pytorch_model{suffix}"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        read_state_dict(bad)


def test_corrupt_shard_index_and_shard_are_named(tmp_path, state):
    index = tmp_path / "m.safetensors.index.json"
    for text in ("{not json", "[1, 2]"):
        index.write_text(text)
        with pytest.raises(CheckpointError, match=re.escape(str(index))):
            read_state_dict(index)
    shard = tmp_path / "m-00001-of-00001.safetensors"
    shard.write_bytes(b"garbage" * 10)
    index.write_text(json.dumps({"weight_map": {k: shard.name for k in state}}))
    with pytest.raises(CheckpointError, match=re.escape(str(shard))):
        read_state_dict(index)


def write_model_folder(folder, state, fmt):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "Tiny", "width": 4}))
    if fmt in ("safetensors", "both"):
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
    if fmt in ("bin", "both"):
        torch.save({k: torch.zeros_like(v) for k, v in state.items()} if fmt == "both" else state,
                   folder / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "both"])
def test_read_model_folder(tmp_path, state, fmt):
    write_model_folder(tmp_path, state, fmt)
    config, loaded = read_model_folder(tmp_path)
    assert config == {"_class_name": "Tiny", "width": 4}
    assert_same(loaded, state)  # with both present, safetensors wins (the .bin holds zeros)


def test_pipeline_folder_resolves_to_its_subfolder(tmp_path, state):
    write_model_folder(tmp_path / "unet", state, "safetensors")
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_model_folder(tmp_path, "unet") == tmp_path / "unet"
    assert_same(read_model_folder(tmp_path, "unet")[1], state)


def test_folder_errors_name_what_is_missing(tmp_path, state):
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_model_folder(tmp_path, "unet")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(CheckpointError, match=r"no diffusion_pytorch_model.safetensors.*notes.txt"):
        find_weights(tmp_path)


@pytest.mark.parametrize("prefix", ["module.", "unet.", "module.unet."])
def test_match_strips_wrapper_prefixes(state, prefix):
    wrapped = {prefix + k: v for k, v in state.items()}
    assert_same(match_state_dict(wrapped, state), state)


def test_match_keeps_prefixes_the_model_expects(state):
    expected = {"model." + k: v for k, v in state.items()}
    assert_same(match_state_dict(expected, expected), expected)


def test_match_lists_missing_unexpected_and_misshapen(state):
    given = dict(state)
    del given["conv.bias"]
    given["stray.weight"] = torch.zeros(2)
    given["blocks.0.proj.weight"] = torch.zeros(4, 8)
    with pytest.raises(CheckpointError) as info:
        match_state_dict(given, state, owner="Tiny")
    message = str(info.value)
    assert "state_dict does not fit Tiny" in message
    assert "1 missing keys: conv.bias" in message
    assert "1 unexpected keys: stray.weight" in message
    assert "1 shape mismatches: blocks.0.proj.weight (checkpoint (4, 8), Tiny (8, 4))" in message


def test_match_non_strict_still_checks_shapes(state):
    partial = {"conv.weight": state["conv.weight"]}
    assert_same(match_state_dict(partial, state, strict=False), partial)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        match_state_dict({"conv.weight": torch.zeros(1)}, state, strict=False)


def test_match_truncates_long_listings(state):
    expected = {f"layer.{i}.weight": torch.zeros(1) for i in range(25)}
    with pytest.raises(CheckpointError, match=r"25 missing keys: (layer\.\d+\.weight, ){10}\.\.\. \(15 more\)"):
        match_state_dict({}, expected)

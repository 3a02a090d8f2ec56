"""Weight-file I/O for fastdiff models, without diffusers.

Reads diffusers model folders (config.json + diffusion_pytorch_model.{safetensors,bin}, single
or sharded, or a pipeline folder's model subfolder) and plain state_dict files (.safetensors,
or pickles such as MGIE's unet.pt, read with torch.load(weights_only=True)); matches a state_dict
to a model's parameters, stripping wrapper prefixes ("module.", "unet.", ...), and reports every
mismatch at once in a CheckpointError.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Iterable, Mapping

import torch

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "resolve_model_folder",
    "read_config",
    "find_weights",
    "read_model_folder",
    "match_state_dict",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
# Keys that wrap a state_dict inside a checkpoint dict, and prefixes that wrappers add to keys.
WRAPPER_KEYS = ("state_dict", "model", "module", "unet")
WRAPPER_PREFIXES = ("module.", "unet.", "model.")
LISTED = 10  # how many missing / unexpected / mismatched names an error spells out


class CheckpointError(ValueError):
    """A weight file or state_dict that does not fit the model (missing, unexpected or misshapen
    parameters, unreadable or absent files). `field`: the argument at fault when the error names
    one (None when the detail starts with the file's path); str() is "field: detail"."""

    def __init__(self, field: str | None, detail: str):
        super().__init__(field, detail)
        self.field, self.detail = field, detail

    def __str__(self):
        return self.detail if self.field is None else f"{self.field}: {self.detail}"


def _as_state_dict(obj, source: str) -> dict[str, torch.Tensor]:
    """Unwrap {"state_dict": {...}}-style containers; insist on a flat name -> tensor mapping."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(inner) != 1:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, Mapping):
        raise CheckpointError(None, f"{source}: expected a state_dict (name -> tensor), got {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            None, f"{source}: expected a state_dict (name -> tensor); {len(not_tensors)} entries are not tensors, "
            f"e.g. {not_tensors[:LISTED]}"
        )
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weight file, on the CPU: .safetensors, a sharded *.index.json, or a pickle
    (.bin / .pt / .pth / .ckpt) read with weights_only=True (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("path", f"no weight file at {path}")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text()).get("weight_map")
        except (ValueError, AttributeError) as exc:  # not JSON, or JSON but not an object
            raise CheckpointError(None, f"{path}: cannot read as a shard index ({type(exc).__name__}: {exc})") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(None, f"{path}: a shard index needs a 'weight_map' object")
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(read_state_dict(path.parent / shard))
        return state_dict
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # bad header, truncated data: safetensors' message does not name the file
            raise CheckpointError(None, f"{path}: cannot read as safetensors ({type(exc).__name__}: {exc})") from exc
    return _as_state_dict(load_torch_file(path), str(path))


# How torch.save's files begin: a zip archive (torch >= 1.6) or a pickle (the legacy format).
_TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def load_torch_file(path: Path, *, mmap: bool = False):
    """torch.load(path) with weights_only=True (no code runs on load), on the CPU; every failure a
    CheckpointError naming the file and saying which it is: not a torch checkpoint at all (torch
    itself answers random bytes with advice about _use_new_zipfile_serialization), an object the
    weights-only loader refuses, or a truncated or corrupted file (torch: a zip error, an EOF,
    or OSError [Errno 22] without the file's name)."""
    with open(path, "rb") as file:
        head = file.read(4)
    if not head.startswith(_TORCH_FILE_MAGIC):
        raise CheckpointError(None, f"{path}: not a torch checkpoint (torch.save writes a zip archive or a pickle; "
                                    f"this file starts with {head!r}{', and is empty' if not head else ''})")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
    except pickle.UnpicklingError as exc:  # a whole file holding objects other than tensors and containers
        raise CheckpointError(None, f"{path}: cannot read as a weights-only torch pickle ({exc})") from exc
    except Exception as exc:  # a zip without its central directory, an EOF, an OSError, ...
        size = path.stat().st_size
        raise CheckpointError(None, f"{path}: the torch checkpoint is truncated or corrupted ({size:,} bytes; "
                                    f"{type(exc).__name__}: {exc}); download or save it again") from exc


def resolve_model_folder(folder: str | os.PathLike, subfolder: str) -> Path:
    """`folder` if it holds config.json, else `folder/subfolder` (a pipeline folder's component)."""
    folder = Path(folder)
    for candidate in (folder, folder / subfolder):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError("folder", f"no config.json in {folder} or {folder / subfolder}")


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(None, f"{path}: cannot read the model config ({exc})") from exc


def find_weights(folder: str | os.PathLike, name: str = WEIGHTS_NAME) -> Path:
    """The weight file of a diffusers model folder: safetensors first, then the pickle, single or sharded."""
    folder = Path(folder)
    for file_name in (f"{name}.safetensors", f"{name}.safetensors.index.json", f"{name}.bin", f"{name}.bin.index.json"):
        if (folder / file_name).is_file():
            return folder / file_name
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError("folder", f"no {name}.safetensors / .bin (or sharded index) in {folder}; it holds {present}")


def read_model_folder(folder: str | os.PathLike, subfolder: str = "unet") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state_dict) of a diffusers model folder or of `subfolder` in a pipeline folder."""
    model_folder = resolve_model_folder(folder, subfolder)
    return read_config(model_folder), read_state_dict(find_weights(model_folder))


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Drop prefixes that every key shares (DataParallel's "module.", a parent's "unet.", ...)
    while that makes expected names appear."""
    expected = set(expected)
    while state_dict and not expected.issubset(state_dict):
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _listing(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:LISTED]) + (f", ... ({len(names) - LISTED} more)" if len(names) > LISTED else "")
    return f"{len(names)} {kind}: {shown}"


def match_state_dict(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                     strict: bool = True, owner: str = "model") -> dict[str, torch.Tensor]:
    """`state_dict` with wrapper prefixes removed, checked against `expected` (the model's own
    state_dict: names and shapes). Raises one CheckpointError naming every missing and unexpected
    key (when strict) and every shape mismatch."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError("state_dict", f"expected a mapping of names to tensors, got {type(state_dict).__name__}")
    state_dict = _strip_wrapper_prefixes(_as_state_dict(state_dict, "state_dict"), expected)
    problems = []
    quantized = sorted(k for k in state_dict if k.endswith(".weight") and k.removesuffix("weight") + "qweight" in expected)
    if quantized:  # fastdiff.quantize's layers keep qweight and weight_scale instead
        problems.append(_listing("float weights for layers quantized by fastdiff.quantize (load float weights before "
                                 "quantizing)", quantized))
    if strict:
        missing = sorted(k for k in expected if k not in state_dict)
        unexpected = sorted(k for k in state_dict if k not in expected)
        if missing:
            problems.append(_listing("missing keys", missing))
        if unexpected:
            problems.append(_listing("unexpected keys", unexpected))
    misshapen = sorted(
        f"{k} (checkpoint {tuple(v.shape)}, {owner} {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    )
    if misshapen:
        problems.append(_listing("shape mismatches", misshapen))
    if problems:
        raise CheckpointError(None, f"state_dict does not fit {owner}: " + "; ".join(problems))
    return state_dict

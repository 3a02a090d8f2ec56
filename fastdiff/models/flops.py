"""Parameter and multiply-accumulate (MAC) counts of one forward pass.

The pass runs under a TorchDispatchMode that sees every aten op, so it works on the meta device
(no weights in RAM: a full-size UNet is counted in about a second) as well as on real tensors.
fastdiff.ops are run on the reference backend while counting, because only plain aten ops are
visible here (a C++ or Triton kernel is one opaque call).

Counted, in four categories (one MAC = one multiply + one add):
  conv       dense convolutions: out_elements * in_channels * kh * kw
  depthwise  grouped convolutions: out_elements * (in_channels / groups) * kh * kw
  linear     mm / addmm: M * K * N (nn.Linear on any rank folds to these)
  attention  the two attention matmuls (bmm / baddbmm, or a fused SDPA op): Lq*Lk*D each
Norms, activations, softmax and elementwise ops are not counted. Counting runs outside inference
mode, on normal copies of arguments that are inference tensors: an op whose every input is an
inference tensor (an inference-mode model's weights and activations) escapes the dispatch mode.

Conventions differ: published UNet figures (e.g. 339 G MACs for SD1.5 at 512x512, and the
budgets MobileDiffusion quotes) come from module-hook counters that see conv and linear layers
only; that is `MacCount.module_macs`. `MacCount.total` adds the attention matmuls.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.module_tracker import ModuleTracker

import fastdiff.ops as ops

CATEGORIES = ("conv", "depthwise", "linear", "attention")

aten = torch.ops.aten


def _conv(args, out):
    weight, groups = args[1], args[8]
    category = "conv" if groups == 1 else "depthwise"
    return category, out.numel() * math.prod(weight.shape[1:])  # weight: (C_out, C_in/groups, kh, kw)


def _mm(args, out):
    a = args[-2]  # mm(a, b) / addmm(bias, a, b): (M, K) @ (K, N)
    return "linear", out.numel() * a.shape[-1]


def _bmm(args, out):
    a = args[-2]  # bmm(a, b) / baddbmm(c, a, b): (B, M, K) @ (B, K, N)
    return "attention", out.numel() * a.shape[-1]


def _sdpa(args, out):
    q, k, v = args[:3]  # (B, H, L, D): Q·Kᵀ then P·V
    return "attention", q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])


_RULES = {
    aten.convolution: _conv,
    aten.mm: _mm,
    aten.addmm: _mm,
    aten.bmm: _bmm,
    aten.baddbmm: _bmm,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    aten._scaled_dot_product_flash_attention: _sdpa,
    aten._scaled_dot_product_efficient_attention: _sdpa,
}


@dataclass
class MacCount:
    """MACs of one forward pass by category, overall and per module (fully qualified name)."""

    params: int
    macs: dict[str, int]
    by_module: dict[str, dict[str, int]] = field(repr=False)

    @property
    def total(self) -> int:
        """Every counted MAC, attention matmuls included."""
        return sum(self.macs.values())

    @property
    def module_macs(self) -> int:
        """Conv + depthwise + linear: the convention of published UNet MAC figures."""
        return self.total - self.macs["attention"]

    def module(self, name: str) -> dict[str, int]:
        """MACs by category inside module `name` (and its children)."""
        return self.by_module.get(name, dict.fromkeys(CATEGORIES, 0))


class _Counter(TorchDispatchMode):
    def __init__(self, tracker: ModuleTracker):
        super().__init__()
        self.tracker = tracker
        self.macs = dict.fromkeys(CATEGORIES, 0)
        self.by_module = defaultdict(lambda: dict.fromkeys(CATEGORIES, 0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = _RULES.get(func.overloadpacket)
        if rule is not None:
            first = out[0] if isinstance(out, (tuple, list)) else out
            category, macs = rule(args, first)
            self.macs[category] += macs
            for name in self.tracker.parents:
                self.by_module[name][category] += macs
        return out


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _countable(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def count_call_macs(fn, *args, **kwargs) -> dict[str, int]:
    """MACs by category of one call fn(*args, **kwargs) that is not a module's forward, e.g. one
    fastdiff.ops call (no grad, reference ops; on meta tensors nothing is computed)."""
    counter = _Counter(ModuleTracker())
    with torch.inference_mode(False):
        args, kwargs = [_countable(a) for a in args], {k: _countable(v) for k, v in kwargs.items()}
        with torch.no_grad(), ops.use_backend("reference"), counter.tracker, counter:
            fn(*args, **kwargs)
    return dict(counter.macs)


def count_macs(model: torch.nn.Module, *args, **kwargs) -> MacCount:
    """Run model(*args, **kwargs) once (no grad, reference ops) and count its MACs.

    Module names in `by_module` are the model's own fully qualified names ("" is the model);
    they match `model.named_modules()`.
    """
    tracker = ModuleTracker()
    counter = _Counter(tracker)
    with torch.inference_mode(False):
        args, kwargs = [_countable(a) for a in args], {k: _countable(v) for k, v in kwargs.items()}
        with torch.no_grad(), ops.use_backend("reference"), tracker, counter:
            model(*args, **kwargs)
    root = type(model).__name__
    by_module = {}
    for name, macs in counter.by_module.items():
        # ModuleTracker names modules "<RootClass>.<fqn>"; strip the root to get the fqn.
        if name == root:
            by_module[""] = dict(macs)
        elif name.startswith(root + "."):
            by_module[name[len(root) + 1 :]] = dict(macs)
    return MacCount(params=count_params(model), macs=dict(counter.macs), by_module=by_module)

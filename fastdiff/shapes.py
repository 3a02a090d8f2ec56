"""The kernels' shapes: one table for the tests, bench/, `fastdiff bench kernels` and `fastdiff validate`.

Each case is one fastdiff.ops call as a model makes it at 512x512, or an odd shape the kernels
must also get right, with a name saying which:

  sd15-*  SD1.5's UNet, batch 2 (classifier-free guidance), 8 heads of channels / 8
  ip2p-*  InstructPix2Pix / MGIE (SD1.5's UNet with 8 input channels), batch 3 (text + image,
          image only, neither); an edit keeps the photo's size rounded to 8, e.g. 504x376
          -> 63x47 latents, 2961 tokens
  md-*    MobileDiffusion (fastdiff.models.mobilediffusion's default preset), batch 2, heads of
          64, one K/V projection (shared K/V); md-relu-*: its ReLU-attention switch
  vae-*   the SD VAE decoder, batch 1, 512x512 output
  others  odd shapes (model "odd"): head dims 8/9/72/256, lengths that are not multiples of 16,
          one key, batch 3, 1x1 maps, channel counts off every block size

Sizes. FULL is the case as given (benchmarks, GPU tests). The reductions keep what picks a
kernel's code path (head dim; key counts up to 256, and over 256 for the looped paths; channels
per group; feature count; batch; tails modulo 16) and cut the rest:
  QUICK  the float64 reference twin and torch's own bf16 op run in a fraction of a second on 2 CPU
         cores (C++ and reference tests, `fastdiff validate`): fewer heads, query rows, pixels,
         tokens; channel counts and every key kept.
  TINY   Triton's CPU interpreter (numpy per program, ~1 ms per tl op) runs it in a second or two:
         also fewer groups (same channels per group), channels halved with their ratio kept, keys
         over 256 cut to at most 304 (still the looped path). Also the SIMD-fallback subprocess checks.
Odd cases are mostly written at their TINY size already.

Leaf module: imports torch and the standard library only.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Union

import torch

FULL, QUICK, TINY = "full", "quick", "tiny"
SIZES = (FULL, QUICK, TINY)
MODELS = ("sd15", "ip2p", "mobilediffusion", "vae")
ODD = "odd"


def _cut(n: int, cap: int) -> int:
    """n, or the largest m <= cap with m = n (mod 16) if n > cap: a cut length keeps its tail."""
    if n <= cap:
        return n
    m = n - (n - cap + 15) // 16 * 16
    return m if m >= 1 else (n % 16 or 16)


def _halve_until(dims: tuple[int, ...], fixed: int, budget: int) -> tuple[int, ...]:
    """Halve every dim of `dims` (rounding up, so odd sizes stay odd-ish) until fixed * prod <= budget."""
    while fixed * math.prod(dims) > budget and any(d > 1 for d in dims):
        dims = tuple((d + 1) // 2 for d in dims)
    return dims


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


class _Case:
    """What every case has: name, model, replace(), reduced(size), label, inputs(), options (the op's keywords)."""

    name: str
    model: str

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def reduced(self, size: str):
        if size not in SIZES:
            raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
        return self if size == FULL else self._reduced(size)

    def inputs(self, *, dtype=torch.float64, device="cpu", seed=0) -> tuple[tuple, dict]:
        """(args, options) of the fastdiff.ops call: standard-normal tensors (weights scaled as a
        model's), made in float64 on the CPU from `seed`, then cast to dtype and moved to device."""
        args = self._inputs(torch.Generator().manual_seed(seed))
        return tuple(a.to(device=device, dtype=dtype) if isinstance(a, torch.Tensor) else a for a in args), self.options


@dataclass(frozen=True)
class Attention(_Case):
    """ops.attention(q, k, v, kind=kind): q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, ...)."""

    name: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    head_dim: int
    kind: str = "softmax"
    shared_kv: bool = False  # v=None: k serves as keys and values
    model: str = ODD
    op: ClassVar[str] = "attention"

    QUICK_SCORES: ClassVar[int] = 2**22  # batch * heads * seqlen_q * seqlen_k of a QUICK case
    TINY_ROWS: ClassVar[int] = 260  # batch * heads * seqlen_q of a TINY case (query blocks of 32-128 rows)
    TINY_KEYS: ClassVar[int] = 304  # more than 256 keys stay more: Triton's looped path

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return self.batch, self.seqlen_q, self.seqlen_k, self.heads, self.head_dim

    @property
    def label(self) -> str:
        B, Lq, Lk, H, D = self.dims
        text = f"{B}x{Lq}x{H}x{D}" + ("" if Lq == Lk else f", {Lk} keys")
        return text + (", shared K/V" if self.shared_kv else "") + (", relu" if self.kind == "relu" else "")

    def _reduced(self, size):
        B, Lq, Lk, H, D = self.dims
        heads = min(H, 2)  # heads are independent programs: two show the head strides
        if size == QUICK:  # every key kept (keys set the kernels' paths); then fewer heads, then query rows
            heads = max(1, min(heads, self.QUICK_SCORES // (B * Lq * Lk)))
            return self.replace(heads=heads, seqlen_q=_cut(Lq, max(1, self.QUICK_SCORES // (B * heads * Lk))))
        keys = Lk if Lk <= 256 else _cut(Lk, self.TINY_KEYS)
        return self.replace(heads=heads, seqlen_q=_cut(Lq, self.TINY_ROWS // (B * heads)), seqlen_k=keys)

    def _inputs(self, g):
        B, Lq, Lk, H, D = self.dims
        q, k = _randn(g, B, Lq, H, D), _randn(g, B, Lk, H, D)
        v = None if self.shared_kv else _randn(g, B, Lk, H, D)
        return q, k, v

    @property
    def options(self) -> dict:
        return {"kind": self.kind}


@dataclass(frozen=True)
class GroupNorm(_Case):
    """ops.group_norm(x, groups, weight, bias, eps, silu=silu), x (batch, channels, height, width)."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    groups: int = 32
    silu: bool = True  # resnets fuse the SiLU; transformer / attention input norms do not
    affine: bool = True
    eps: float = 1e-5
    model: str = ODD
    op: ClassVar[str] = "group_norm"

    QUICK_ELEMENTS: ClassVar[int] = 2**20
    TINY_PROGRAMS: ClassVar[int] = 4  # batch x groups: the interpreter takes ~25 ms a program
    TINY_ELEMENTS: ClassVar[int] = 2**15

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.channels, self.height, self.width

    @property
    def label(self) -> str:
        text = "x".join(map(str, self.shape)) + f" g{self.groups}"
        return text + ("" if self.affine else " no affine") + (" +silu" if self.silu else "")

    def _reduced(self, size):
        N, C, H, W = self.shape
        groups = self.groups
        if size == TINY and N * groups > self.TINY_PROGRAMS:  # fewer groups of the same channels per group
            fewer = max(1, self.TINY_PROGRAMS // N)
            C, groups = C // groups * fewer, fewer
        budget = self.QUICK_ELEMENTS if size == QUICK else self.TINY_ELEMENTS
        H, W = _halve_until((H, W), N * C, budget)
        return self.replace(channels=C, groups=groups, height=H, width=W)

    def _inputs(self, g):
        C = self.channels
        x = _randn(g, *self.shape)
        weight, bias = (_randn(g, C), _randn(g, C)) if self.affine else (None, None)
        return x, self.groups, weight, bias, self.eps

    @property
    def options(self) -> dict:
        return {"silu": self.silu}


@dataclass(frozen=True)
class GLU(_Case):
    """ops.glu(h, activation=activation), h (*lead, 2 * features)."""

    name: str
    lead: tuple[int, ...]
    features: int
    activation: str = "gelu"  # SD's GEGLU; MobileDiffusion's SwiGLU: "silu"
    model: str = ODD
    op: ClassVar[str] = "glu"

    QUICK_ELEMENTS: ClassVar[int] = 2**21
    TINY_ELEMENTS: ClassVar[int] = 2**16

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.lead, 2 * self.features)

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape)) + f" {self.activation}"

    def _reduced(self, size):
        lead = list(self.lead)
        budget = self.QUICK_ELEMENTS if size == QUICK else self.TINY_ELEMENTS
        while lead and 2 * self.features * math.prod(lead) > budget and max(lead) > 1:  # fewer rows
            i = lead.index(max(lead))
            lead[i] = (lead[i] + 1) // 2
        return self.replace(lead=tuple(lead))

    def _inputs(self, g):
        return (_randn(g, *self.shape),)

    @property
    def options(self) -> dict:
        return {"activation": self.activation}


@dataclass(frozen=True)
class SeparableConv2d(_Case):
    """ops.separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias): depthwise 3x3, pointwise to out_channels."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    bias: bool = True
    model: str = ODD
    op: ClassVar[str] = "separable_conv2d"

    QUICK_MACS: ClassVar[int] = 2**26  # of the pointwise product: float64 and bf16 torch convs are slow on a CPU
    # The interpreter loops over input channels (9 taps each) in every (pixel, out-channel) tile program.
    TINY_CHANNELS: ClassVar[int] = 72
    TINY_OUT_CHANNELS: ClassVar[int] = 160
    TINY_PIXELS: ClassVar[int] = 256  # batch x height x width

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.channels, self.height, self.width

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape)) + f"->{self.out_channels}" + ("" if self.bias else " no bias")

    def _reduced(self, size):
        N, C, H, W = self.shape
        C_out = self.out_channels
        if size == QUICK:
            H, W = _halve_until((H, W), N * C * C_out, self.QUICK_MACS)
        else:  # channels halved together (their ratio kept), then the map
            while C > self.TINY_CHANNELS or C_out > self.TINY_OUT_CHANNELS:
                C, C_out = (C + 1) // 2, (C_out + 1) // 2
            H, W = _halve_until((H, W), N, self.TINY_PIXELS)
        return self.replace(channels=C, out_channels=C_out, height=H, width=W)

    def _inputs(self, g):
        N, C, H, W = self.shape
        C_out = self.out_channels
        x = _randn(g, N, C, H, W)
        dw_weight = _randn(g, C, 1, 3, 3) / 3
        pw_weight = _randn(g, C_out, C, 1, 1) / C**0.5  # nn.Conv2d's layout
        dw_bias, pw_bias = (_randn(g, C), _randn(g, C_out)) if self.bias else (None, None)
        return x, dw_weight, dw_bias, pw_weight, pw_bias

    @property
    def options(self) -> dict:
        return {}


@dataclass(frozen=True)
class LinearInt8(_Case):
    """ops.linear(x, ops.quantize_weight(weight), bias): x (*lead, in_features), weight (out, in)."""

    name: str
    lead: tuple[int, ...]
    in_features: int
    out_features: int
    bias: bool = True
    model: str = ODD
    op: ClassVar[str] = "linear_int8"

    QUICK_MACS: ClassVar[int] = 2**26  # the float64 twin's product in a fraction of a second
    TINY_MACS: ClassVar[int] = 2**22

    @property
    def label(self) -> str:
        return "x".join(map(str, (*self.lead, self.in_features))) + f" -> {self.out_features}"

    def _reduced(self, size):
        budget = self.QUICK_MACS if size == QUICK else self.TINY_MACS
        return self.replace(lead=_halve_until(self.lead, self.in_features * self.out_features, budget))

    def _inputs(self, g):
        x = _randn(g, *self.lead, self.in_features)
        weight = _randn(g, self.out_features, self.in_features) / math.sqrt(self.in_features)
        return x, weight, _randn(g, self.out_features) if self.bias else None

    @property
    def options(self) -> dict:
        return {}


Case = Union[Attention, GroupNorm, GLU, SeparableConv2d]

_SD, _IP2P, _MD, _VAE = MODELS

TABLE: tuple[Case, ...] = (
    # --- attention (batch, seqlen_q, seqlen_k, heads, head_dim) -------------------------------
    # SD1.5: one self and one cross (77 text tokens) attention per transformer, at 64/32/16 latents
    Attention("sd15-self-64x64", 2, 4096, 4096, 8, 40, model=_SD),
    Attention("sd15-self-32x32", 2, 1024, 1024, 8, 80, model=_SD),
    Attention("sd15-self-16x16", 2, 256, 256, 8, 160, model=_SD),
    Attention("sd15-cross-64x64", 2, 4096, 77, 8, 40, model=_SD),
    Attention("sd15-cross-32x32", 2, 1024, 77, 8, 80, model=_SD),
    Attention("sd15-cross-16x16", 2, 256, 77, 8, 160, model=_SD),
    # InstructPix2Pix / MGIE editing a 504x376 photo: 63x47 latents
    Attention("ip2p-self-63x47", 3, 2961, 2961, 8, 40, model=_IP2P),
    Attention("ip2p-cross-63x47", 3, 2961, 77, 8, 40, model=_IP2P),
    # MobileDiffusion: cross-only transformers at 32x32, full ones in the 16x16 core
    Attention("md-cross-32x32", 2, 1024, 77, 10, 64, shared_kv=True, model=_MD),
    Attention("md-self-16x16", 2, 256, 256, 16, 64, shared_kv=True, model=_MD),
    Attention("md-self-32x32", 2, 1024, 1024, 10, 64, shared_kv=True, model=_MD),  # the "self-attention at 32x32" ablation
    Attention("md-relu-self-32x32", 2, 1024, 1024, 10, 64, kind="relu", shared_kv=True, model=_MD),  # and with ReLU attention
    # odd
    Attention("self-1000-d72", 1, 1000, 1000, 2, 72),  # nothing a multiple of 16; looped everywhere
    Attention("batch3-d80", 3, 33, 20, 2, 80),
    Attention("keys1", 2, 17, 1, 2, 64),
    Attention("keys1-d160", 2, 17, 1, 1, 160),
    Attention("keys299-d40", 1, 50, 299, 2, 40),  # past every single-pass path, odd key tail
    Attention("queries5", 2, 5, 130, 3, 40),
    Attention("d8", 2, 20, 23, 2, 8),  # padded to the 16 tl.dot needs
    Attention("d9", 1, 37, 50, 2, 9),  # odd head dim: the bf16 pair tail
    Attention("d9-keys301", 1, 40, 301, 1, 9),
    Attention("d256", 1, 40, 257, 1, 256),
    # --- group_norm (batch, channels, height, width), 32 groups unless stated --------------------
    # SD1.5 resnets (+SiLU) and a transformer's input norm (eps 1e-6, no SiLU)
    GroupNorm("sd15-320x64x64", 2, 320, 64, 64, model=_SD),
    GroupNorm("sd15-640x32x32", 2, 640, 32, 32, model=_SD),  # also MobileDiffusion's 32x32 level
    GroupNorm("sd15-1280x16x16", 2, 1280, 16, 16, model=_SD),
    GroupNorm("sd15-1280x8x8", 2, 1280, 8, 8, model=_SD),
    GroupNorm("sd15-transformer-320x64x64", 2, 320, 64, 64, silu=False, eps=1e-6, model=_SD),
    GroupNorm("ip2p-320x63x47", 3, 320, 63, 47, model=_IP2P),
    GroupNorm("md-1664x32x32", 2, 1664, 32, 32, model=_MD),  # 1024 upsampled + 640 skip: 52 per group
    # VAE decoder: mid block, the output norm at 512x512
    GroupNorm("vae-512x64x64", 1, 512, 64, 64, eps=1e-6, model=_VAE),
    GroupNorm("vae-128x512x512", 1, 128, 512, 512, eps=1e-6, model=_VAE),
    # odd
    GroupNorm("3x40x7x13-g8", 3, 40, 7, 13, groups=8),  # batch 3, 7x13, channels % 16 != 0
    GroupNorm("2x72x1x1-g8-noaffine", 2, 72, 1, 1, groups=8, affine=False),  # 1x1 map
    GroupNorm("2x64x9x13-g32", 2, 64, 9, 13),  # 2 channels per group
    GroupNorm("1x160x12x12-g2", 1, 160, 12, 12, groups=2),  # 80 per group: 2 channel blocks; Triton: 3 splits
    GroupNorm("2x48x6x11-g16-noaffine", 2, 48, 6, 11, groups=16, silu=False, affine=False, eps=1e-6),
    GroupNorm("1x96x9x5-g3-noaffine", 1, 96, 9, 5, groups=3, silu=False, affine=False),
    # --- glu (*lead, 2 * features) ---------------------------------------------------------------
    # SD1.5's GEGLU: features = 4 x channels; MobileDiffusion's SwiGLU (expansion 6): 3 x channels
    GLU("sd15-geglu-64x64", (2, 4096), 1280, model=_SD),
    GLU("sd15-geglu-16x16", (2, 256), 5120, model=_SD),
    GLU("ip2p-geglu-63x47", (3, 2961), 1280, model=_IP2P),
    GLU("md-swiglu-32x32", (2, 1024), 1920, activation="silu", model=_MD),
    GLU("md-swiglu-16x16", (2, 256), 3072, activation="silu", model=_MD),
    # odd
    GLU("3x7x13-f72", (3, 7, 13), 72),  # extra leading dims
    GLU("3x37-f96", (3, 37), 96),
    GLU("4x9-f40", (4, 9), 40),
    GLU("5-f37", (5,), 37),  # features % 16 != 0 and % 8 != 0
    GLU("f24", (), 24),  # one row, 1-D
    GLU("f3", (), 3),
    # --- separable_conv2d (batch, channels, height, width) -> out_channels -----------------------
    # MobileDiffusion's resnets below 64x64: conv2 (C -> C) and conv1 where the channels change
    SeparableConv2d("md-320to640-32x32", 2, 320, 32, 32, 640, model=_MD),  # first resnet after the downsample
    SeparableConv2d("md-640x32x32", 2, 640, 32, 32, 640, model=_MD),
    SeparableConv2d("md-1664to640-32x32", 2, 1664, 32, 32, 640, model=_MD),  # up block: 1024 + 640 skip
    SeparableConv2d("md-1024x16x16", 2, 1024, 16, 16, 1024, model=_MD),
    # 64x64 made separable too (the default keeps dense convs there): 320 channels, the largest map
    SeparableConv2d("md-320x64x64", 2, 320, 64, 64, 320, model=_MD),
    # odd
    SeparableConv2d("3x40x7x13-to72", 3, 40, 7, 13, 72),
    SeparableConv2d("2x72x1x1-to40-nobias", 2, 72, 1, 1, 40, bias=False),  # 1x1 map: only the centre tap
    SeparableConv2d("1x17x5x3-to33", 1, 17, 5, 3, 33),  # channels not multiples of 16
    SeparableConv2d("1x64x2x9-to100", 1, 64, 2, 9, 100),  # 2-row map, out tail of 4 past three 32-panels
    SeparableConv2d("2x40x7x13-to24", 2, 40, 7, 13, 24),
    SeparableConv2d("2x40x7x13-to24-nobias", 2, 40, 7, 13, 24, bias=False),
    SeparableConv2d("1x70x5x6-to150", 1, 70, 5, 6, 150),  # 3 Triton out-channel blocks, input tail
    SeparableConv2d("3x16x9x9-to16-nobias", 3, 16, 9, 9, 16, bias=False),  # batch 3, exact 16-channel blocks
    SeparableConv2d("1x24x6x10-to40", 1, 24, 6, 10, 40),
    SeparableConv2d("1x32x24x64-to48", 1, 32, 24, 64, 48),  # 64-wide rows: several pixel tiles per row
)

OPS = ("attention", "group_norm", "glu", "separable_conv2d")

# The int8 path's linears (opt-in, so apart from TABLE, which every op's tests and `fastdiff validate` run):
# SD1.5 at batch 2 (attention projections, GEGLU in and out, the text's keys/values), MobileDiffusion's
# (batch 2; 640 channels at 32x32, 1024 at 16x16), and odd sizes (in_features off multiples of 4 and
# 16, out_features off 8, 16 and 64, batch 3, one token).
INT8_LINEAR: tuple[LinearInt8, ...] = (
    LinearInt8("sd15-proj-64x64", (2, 4096), 320, 320, model=_SD),
    LinearInt8("sd15-geglu-in-64x64", (2, 4096), 320, 2560, model=_SD),
    LinearInt8("sd15-ff-out-64x64", (2, 4096), 1280, 320, model=_SD),
    LinearInt8("sd15-proj-32x32", (2, 1024), 640, 640, model=_SD),
    LinearInt8("sd15-proj-16x16", (2, 256), 1280, 1280, model=_SD),
    LinearInt8("sd15-ff-out-16x16", (2, 256), 5120, 1280, model=_SD),
    LinearInt8("sd15-text-kv", (2, 77), 768, 320, bias=False, model=_SD),
    LinearInt8("md-proj-32x32", (2, 1024), 640, 640, model=_MD),
    LinearInt8("md-proj-16x16", (2, 256), 1024, 1024, model=_MD),
    LinearInt8("md-text-kv", (2, 77), 768, 640, bias=False, model=_MD),
    LinearInt8("3x77x72-to160", (3, 77), 72, 160),
    LinearInt8("3x33x77-to72-nobias", (3, 33), 77, 72, bias=False),
    LinearInt8("1x1x160-to77", (1, 1), 160, 77),
    LinearInt8("2x50x1283-to131", (2, 50), 1283, 131),
)


def int8_linear_cases(*, models=None, size: str = FULL) -> list[LinearInt8]:
    """INT8_LINEAR's cases, optionally only those of `models` (names from MODELS, or ODD), reduced to `size`."""
    return [c.reduced(size) for c in INT8_LINEAR if models is None or c.model in models]


def cases(op: str | None = None, *, models=None, size: str = FULL) -> list[Case]:
    """The table's cases for `op` (all ops if None), optionally only those of `models` (names from
    MODELS, or ODD), reduced to `size`."""
    if op is not None and op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if models is not None:
        unknown = set(models) - {*MODELS, ODD}
        if unknown:
            raise ValueError(f"models: expected names from {(*MODELS, ODD)}, got {sorted(unknown)}")
    return [c.reduced(size) for c in TABLE if (op is None or c.op == op) and (models is None or c.model in models)]


def model_cases(op: str | None = None, *, size: str = FULL) -> list[Case]:
    """The cases the real models run (no odd ones)."""
    return cases(op, models=MODELS, size=size)


def case(op: str, name: str, *, size: str = FULL) -> Case:
    for c in TABLE:
        if c.op == op and c.name == name:
            return c.reduced(size)
    raise KeyError(f"no {op} case named {name!r} in fastdiff.shapes.TABLE")


def _check_table() -> None:
    seen = set()
    for c in TABLE:
        if (c.op, c.name) in seen:
            raise AssertionError(f"duplicate {c.op} case {c.name!r}")
        seen.add((c.op, c.name))
        if c.model not in (*MODELS, ODD):
            raise AssertionError(f"{c.name}: unknown model {c.model!r}")


_check_table()

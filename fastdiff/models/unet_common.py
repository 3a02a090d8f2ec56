"""What the pipelines rely on in every fastdiff UNet (UNet2DCondition, MobileDiffusionUNet): the
same attributes, one input rule for forward(sample, timestep, encoder_hidden_states), and the
level-by-level run that lets rows of one call skip the deep levels (DeepCacheRows)."""
from __future__ import annotations

import dataclasses
import numbers

import torch
import torch.nn as nn

__all__ = ["ConditionalUNet", "DeepCacheRows"]


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


@dataclasses.dataclass(eq=False)
class DeepCacheRows:
    """DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", 2023) for the rows
    of one UNet call, row by row, so that requests at different points of their cache share the call.

    depths[r]: None (row r runs in full and keeps nothing), or d in 1..max_cache_depth: its request
    caches the deep part, everything but the outer part (conv_in, conv_out and the down and up
    blocks of the d outermost levels). reuse[r]: None (the row runs in full; its deep
    features, the input of the up block of level d-1, come back in stored[r]) or what stored[r]
    held at the row's last full step (then only the outer part runs for it, the deep features
    taken from there instead). stored: filled by the UNet call, (1, C, h, w) per row or None.
    """

    depths: list[int | None]
    reuse: list[torch.Tensor | None]
    stored: list[torch.Tensor | None] = dataclasses.field(default_factory=list)

    def check(self, batch: int, max_depth: int) -> None:
        if len(self.depths) != batch or len(self.reuse) != batch:
            raise ValueError(f"cache: expected depths and reuse for each of the {batch} rows, got "
                             f"{len(self.depths)} and {len(self.reuse)}")
        for r, (depth, reuse) in enumerate(zip(self.depths, self.reuse)):
            if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= max_depth):
                raise ValueError(f"cache.depths[{r}]: expected None or an int in 1..{max_depth} (this UNet's "
                                 f"outer levels that can run alone), got {depth!r}")
            if reuse is not None and (depth is None or not isinstance(reuse, torch.Tensor) or reuse.dim() != 4
                                      or reuse.shape[0] != 1):
                raise ValueError(f"cache.reuse[{r}]: expected None or a (1, C, h, w) tensor for a row with a depth, "
                                 f"got {describe(reuse)} (depth {depth!r})")


def _rows(value, rows):
    """The rows of a batch-first tensor (or of each in a tuple or list; None stays None): the first
    `rows` for an int, else those an index tensor lists."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows) for v in value)
    return value[:rows] if isinstance(rows, int) else value.index_select(0, rows)


class ConditionalUNet(nn.Module):
    """Base of the text-conditioned UNets. Subclasses have `config` (with in_channels and
    out_channels), `conv_in`, and define `cross_attention_dim`.

    Input rule of forward:
      sample                 floating (B, in_channels, H, W), any H, W >= 1
      timestep               a number, a 1-element tensor, or a (B,) tensor
      encoder_hidden_states  floating (B, L, cross_attention_dim), L >= 1
    Tensors must be on the model's device; floating inputs of another dtype are cast to the
    model's. A non-tensor or non-floating input raises TypeError, a wrong shape or device
    ValueError, each naming the argument.
    """

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def cross_attention_dim(self) -> int:
        """Width of the text conditioning (encoder_hidden_states' last dimension)."""
        raise NotImplementedError

    def _check_inputs(self, sample, timestep, encoder_hidden_states) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample channels_last in the model's dtype, timesteps (B,), context in the model's dtype)."""
        C, D = self.in_channels, self.cross_attention_dim
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample: expected a floating-point (B, {C}, H, W) tensor, got {describe(sample)}")
        if sample.dim() != 4 or sample.shape[1] != C or sample.numel() == 0:
            raise ValueError(f"sample: expected shape (B, {C}, H, W) (config in_channels {C}), got {tuple(sample.shape)}")
        B = sample.shape[0]
        if not isinstance(encoder_hidden_states, torch.Tensor) or not encoder_hidden_states.is_floating_point():
            raise TypeError(f"encoder_hidden_states: expected a floating-point ({B}, L, {D}) tensor, got {describe(encoder_hidden_states)}")
        shape = tuple(encoder_hidden_states.shape)
        if len(shape) != 3 or shape[0] != B or shape[1] < 1 or shape[2] != D:
            raise ValueError(f"encoder_hidden_states: expected shape ({B}, L, {D}) for a batch of {B} "
                             f"(config cross_attention_dim {D}), got {shape}")
        for name, t in (("sample", sample), ("encoder_hidden_states", encoder_hidden_states)):
            if t.device != self.device:
                raise ValueError(f"{name}: on {t.device}, the model is on {self.device}")

        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 1 and timestep.dim() <= 1:
                timestep = timestep.reshape(1).expand(B)
            elif timestep.shape != (B,):
                raise ValueError(f"timestep: expected a number, a 1-element tensor or a ({B},) tensor, got shape {tuple(timestep.shape)}")
            timestep = timestep.to(self.device)
        elif isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
            timestep = torch.full((B,), float(timestep), dtype=torch.float32, device=self.device)
        else:
            raise TypeError(f"timestep: expected a number or a tensor, got {type(timestep).__name__}")

        sample = sample.to(dtype=self.dtype, memory_format=torch.channels_last)
        return sample, timestep, encoder_hidden_states.to(self.dtype)

    # ------------------------------------------------------------------------------------------
    # the levels, for DeepCache: a subclass defines num_levels, max_cache_depth and the parts below

    @property
    def num_levels(self) -> int:
        """Resolution levels: down blocks (and up blocks)."""
        raise NotImplementedError

    @property
    def max_cache_depth(self) -> int:
        """The most outer levels a cached step may run (DeepCacheRows.depths): every level when a
        mid block is left to cache, else all but the deepest."""
        raise NotImplementedError

    def _stem(self, x: torch.Tensor, skips: list) -> torch.Tensor:
        """conv_in (and the skips it keeps)."""
        raise NotImplementedError

    def _down(self, level: int, x, temb, context, skips: list, deeper: int):
        """Down block `level` on all rows of x; returns its output downsampled for the first `deeper`
        rows, those going deeper (None when none does; the deepest level returns its output as is)."""
        raise NotImplementedError

    def _mid(self, x, temb, context):
        raise NotImplementedError

    def _up(self, level: int, x, temb, context, skips: list):
        """The up block of `level` (it consumes that level's skips), upsampled unless finest."""
        raise NotImplementedError

    def _head(self, x):
        """conv_norm_out + SiLU, conv_out."""
        raise NotImplementedError

    def _run_levels(self, x: torch.Tensor, temb: torch.Tensor, context, cache: DeepCacheRows | None, *,
                    after_down=None, after_mid=None) -> torch.Tensor:
        """conv_in, down, mid, up, conv_out; with `cache`, each row runs only the levels its
        DeepCacheRows entry asks for. Rows are put in order of how deep they go, so that every block
        runs on a prefix of the batch (a view); the output is put back in the callers' order.
        context: what the blocks are conditioned on, per row: a tensor, or a tuple or list of tensors
        (or None) that the blocks unpack. after_down(skips), after_mid(x): changes to the skips once
        the down blocks ran and to the mid block's output (ControlNet's residuals; not with a cache)."""
        B, L = x.shape[0], self.num_levels
        if cache is None:
            reach = [L + 1] * B  # L + 1: through the mid block
        else:
            cache.check(B, self.max_cache_depth)
            reach = [d if d is not None and reuse is not None else L + 1 for d, reuse in zip(cache.depths, cache.reuse)]
            cache.stored = [None] * B
        order = sorted(range(B), key=lambda r: -reach[r])  # stable: rows that go equally deep keep their order
        permuted = order != list(range(B))
        if permuted:
            index = torch.tensor(order, device=x.device)
            x, temb, context = _rows(x, index), _rows(temb, index), _rows(context, index)
        rows = [sum(r > level for r in reach) for level in range(L + 1)]  # rows[level]: rows reaching it; rows[L]: mid

        skips: list = []
        x = self._stem(x, skips)
        for level in range(L):
            n = rows[level]
            if not n:
                break
            x = self._down(level, x, temb[:n], _rows(context, n), skips, rows[level + 1] if level + 1 < L else n)
        if after_down is not None:
            after_down(skips)
        n = rows[L]
        x = self._mid(x[:n], temb[:n], _rows(context, n)) if n else None
        if after_mid is not None:
            x = after_mid(x)

        for level in reversed(range(L)):
            n, deep = rows[level], rows[level + 1]
            if not n:
                continue
            if cache is not None:
                for p in range(deep):  # rows that ran the deep part: keep the features their depth caches
                    if cache.depths[order[p]] == level + 1:
                        cache.stored[order[p]] = x[p : p + 1].clone()
                x = self._join(x if deep else None, [order[p] for p in range(deep, n)], cache.reuse)
            x = self._up(level, x, temb[:n], _rows(context, n), skips)

        out = self._head(x)
        if permuted:
            back = [0] * B
            for p, r in enumerate(order):
                back[r] = p
            out = out.index_select(0, torch.tensor(back, device=out.device))
        return out

    def _join(self, x: torch.Tensor | None, rows: list[int], reuse: list) -> torch.Tensor:
        """x (the deep part's output, or None when no row ran it) with the cached features of `rows`
        appended: the input of the up block where those rows rejoin."""
        parts = [] if x is None else [x]
        for r in rows:
            features = reuse[r]
            if parts and features.shape[1:] != parts[0].shape[1:]:
                raise ValueError(f"cache.reuse[{r}]: expected shape (1, {', '.join(map(str, parts[0].shape[1:]))}) "
                                 f"(the deep features at its depth), got {tuple(features.shape)}")
            parts.append(features.to(dtype=self.dtype, memory_format=torch.channels_last))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

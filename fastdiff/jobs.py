"""Denoising jobs and the step that advances many of them with shared UNet calls.

A Job is one image's pass through its sampler: its latents, its guidance branches (1, 2 or 3
rows of UNet input, each with its context and, for SDXL, its pooled embedding and size/crop ids),
its own generator and its own sampler run. `step_jobs` advances any set of
jobs by one denoising step each, stacking the branches of every job whose rows fit together
(same latent shape, same context length) into one UNet call with per-row timesteps.
`Pipeline.generate/edit` and the batching `Engine` both run on it; since every UNet layer treats
batch rows independently and each job draws its noise from its own generator, a request gives
the same image alone or batched with others.

A job with a StepCache (DeepCache) shares those calls too: its rows say per call whether they
refresh their deep features or reuse them (models.unet_common.DeepCacheRows), so one call runs
the outer levels for every row and the deep ones only for the rows that need them.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable

import torch

from fastdiff.models.unet_common import DeepCacheRows
from fastdiff.requests import Guidance, PipelineError
from fastdiff.samplers import SamplerRun


@dataclasses.dataclass(eq=False)
class StepCache:
    """One job's DeepCache: steps 0, interval, 2*interval, ... run the whole UNet and keep the deep
    features (all of the job's guidance rows together); the others run the `depth` outer levels on them."""

    interval: int
    depth: int
    features: torch.Tensor | None = None  # (branches, C, h, w), from the last full step

    def refreshes(self, step: int) -> bool:
        return step % self.interval == 0


@dataclasses.dataclass(eq=False)
class Job:
    run: SamplerRun
    latents: torch.Tensor  # (1, C, h, w), fp32: the sampler's state
    context: torch.Tensor  # (branches, L, D): encoder hidden states in the guidance's row order
    guidance: Guidance  # row layout and the combine of the branches' predictions
    generator: torch.Generator | None = None
    image_latents: torch.Tensor | None = None  # (branches, C_img, h, w), concatenated to the input channels
    on_step: Callable[[int], None] | None = None  # progress callback with the number of steps done
    cache: StepCache | None = None  # DeepCache; None: every step runs the whole UNet
    # SDXL's added conditioning, the UNet's text_embeds (branches, P) and time_ids (branches, 6), in row order
    added_cond: dict[str, torch.Tensor] | None = None

    @property
    def done(self) -> bool:
        return self.run.done

    @property
    def branches(self) -> int:
        return self.guidance.branches

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share a UNet call: their rows have the same shapes."""
        image_channels = None if self.image_latents is None else self.image_latents.shape[1]
        added = None if self.added_cond is None else tuple((k, tuple(v.shape[1:])) for k, v in sorted(self.added_cond.items()))
        return tuple(self.latents.shape[1:]), image_channels, tuple(self.context.shape[1:]), added

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This job's UNet rows for its next step: (sample (branches, C_in, h, w), timesteps (branches,))."""
        i = self.run.next_index
        x = self.run.scale_model_input(self.latents, i).expand(self.branches, -1, -1, -1)
        if self.image_latents is not None:
            x = torch.cat([x, self.image_latents.to(x.dtype)], dim=1)
        # fp32 for every sampler (DDIM's are int64): mixed requests concatenate, and the UNet's
        # sinusoidal embedding computes in fp32 either way
        t = self.run.timesteps[i].to(torch.float32).reshape(1).expand(self.branches)
        return x, t

    def cache_rows(self) -> tuple[list, list]:
        """This job's entries of DeepCacheRows for its next step: (depths, reuse), one per row."""
        if self.cache is None:
            return [None] * self.branches, [None] * self.branches
        reuse = None if self.cache.refreshes(self.run.next_index) else self.cache.features.split(1)
        return [self.cache.depth] * self.branches, list(reuse or [None] * self.branches)

    def advance(self, prediction: torch.Tensor) -> None:
        """Apply guidance to this job's rows of the UNet output and take the sampler step. Latents
        that turn NaN or infinite (NaN weights, an overflow in bf16) fail here, not as a black image."""
        i = self.run.next_index
        guided = self.guidance.combine(prediction.float())
        latents = self.run.step(guided, i, self.latents, generator=self.generator)
        if not torch.isfinite(latents).all():
            raise PipelineError("latents", f"no longer finite at step {i + 1} of {self.run.num_steps} (NaN or infinite "
                                           f"UNet output: check the model's weights and the conditioning)")
        self.latents = latents
        if self.on_step is not None:
            self.on_step(self.run.next_index)


def group_jobs(jobs: list[Job]) -> list[list[Job]]:
    """Jobs split into groups that can share one UNet call (see Job.batch_key), in first-seen order."""
    groups: dict[tuple, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[job.batch_key()].append(job)
    return list(groups.values())


def predict(unet, group: list[Job]) -> list[torch.Tensor]:
    """One UNet call over every branch of every job in `group`; returns each job's rows. Jobs that
    cache (StepCache) refresh or reuse their deep features in that same call."""
    dtype = next(unet.parameters()).dtype
    inputs = [job.model_input() for job in group]
    sample = torch.cat([x for x, _ in inputs]).to(dtype).contiguous(memory_format=torch.channels_last)
    timesteps = torch.cat([t for _, t in inputs])
    context = torch.cat([job.context for job in group]).to(dtype)
    options = {}  # keywords only some UNets take: passed only when used
    if group[0].added_cond is not None:  # the group shares its keys (batch_key)
        options.update({name: torch.cat([job.added_cond[name] for job in group]) for name in group[0].added_cond})
    cache = None
    if any(job.cache is not None for job in group):
        rows = [job.cache_rows() for job in group]
        options["cache"] = cache = DeepCacheRows([d for depths, _ in rows for d in depths],
                                                 [r for _, reuse in rows for r in reuse])
    with torch.inference_mode():
        prediction = unet(sample, timesteps, context, **options)
    if cache is not None:  # after the call succeeded: a failed call leaves every job as it was
        stored = iter(cache.stored)
        for job in group:
            features = [next(stored) for _ in range(job.branches)]
            if features[0] is not None:
                job.cache.features = torch.cat(features)
    return list(prediction.split([job.branches for job in group]))


def step_jobs(unet, jobs: list[Job]) -> None:
    """Advance every job by one step, one UNet call per group of compatible jobs."""
    for group in group_jobs(jobs):
        for job, rows in zip(group, predict(unet, group)):
            job.advance(rows)

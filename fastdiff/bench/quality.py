"""Quality table: held-out toy-world accuracy of the default models per sampler setting, backend and dtype.

The models: fastdiff/weights/generate (text to image) and fastdiff/weights/edit (instruction editor).

Samples: --n-generate captions (toyworld.sample_scene) and --n-edit edit triplets (sample_edit)
of the held-out split (split="test": never drawn in training), from random.Random(--seed); sample
i is denoised with seed --seed + i. toyworld.judge / judge_edit read every image back.

generate, per (sampler, steps) of --samplers and at the pipeline's default setting (C++ backend,
fp32): the share of expected shapes drawn in the right color, kind and cell, of images with the
right background, and of images entirely right. edit, at the editor's default setting: the
success rate per edit kind and overall, and the mean PSNR to the source outside the edited region.
At the default settings also the reference backend (plain PyTorch) fp32 on the same samples and
the C++ backend bf16 on the first --n-bf16, each beside C++ fp32 on those samples: the share of
identical verdicts and the largest pixel difference. Figures are marked against the issue's
targets (TARGETS). With --int8 also the UNets quantized to int8 (W8A8, C++) on every sample at the
default settings, beside C++ fp32, judged by issue 21's bar (int8_verdict: at most INT8_DROP below
fp32 on every share).

Step caching (DeepCache, issue 20): --cache-interval and --cache-depth are grid axes; each
(interval, depth) with interval > 1 runs both tasks (C++ fp32) at each --cache-samplers setting
(default: each task's default setting), on the same samples with the same seeds as the uncached
row of that setting (measured too when not already a row; interval 1 is that row). A cached row
gives the task's figures, the share of verdicts it shares with the uncached row and their largest
pixel difference, the PSNR of each cached image to the uncached image of the same request (mean
and min; identical images count as PSNR_CAP), and for edits the change of success against the
issue's bar (at most CACHE_SUCCESS_DROP below uncached).

--record writes a --quick run's figures and settings to fastdiff/weights/quality.json, the
reference tests/test_quality.py compares its own --quick run against (compare_to_record).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

import fastdiff.ops as ops
from fastdiff import toyworld
from fastdiff.bench.timing import format_table
from fastdiff.default_model import WEIGHTS
from fastdiff.jobs import step_jobs
from fastdiff.requests import EditRequest
from fastdiff.samplers import SAMPLERS, make_sampler

GENERATE_WEIGHTS, EDIT_WEIGHTS, RECORD = WEIGHTS / "generate", WEIGHTS / "edit", WEIGHTS / "quality.json"
# The bar for every fast path: shares of shapes (generate), of edits, and mean PSNR in dB.
TARGETS = {"color": 0.90, "kind": 0.80, "position": 0.90, "success": 0.85, "preservation": 25.0}
PSNR_CAP = 60.0  # an edit that keeps the unedited region exactly (PSNR inf) counts as 60 dB in the mean
BATCH = 8  # samples denoised together (each image has its own seed: batching does not change it)
GENERATE_FIGURES = ("color", "kind", "position", "background", "all")
CACHE_SUCCESS_DROP = 0.03  # the bar for step caching: edit success within 3 points of uncached


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run measures; the pipelines' default (sampler, steps) is always measured, and is where
    the reference backend and bf16 run beside C++ fp32."""

    n_generate: int = 128
    n_edit: int = 96
    n_bf16: int = 16  # samples of each task run in bf16 as well (bf16 is ~8x slower than fp32 on CPUs without bf16 units)
    seed: int = 0
    grid: tuple[tuple[str, int], ...] = (("euler", 10), ("euler_ancestral", 20), ("ddim", 20), ("dpmpp_2m", 10))
    cache_grid: tuple[tuple[int, int], ...] = ()  # (cache_interval > 1, cache_depth) pairs; () measures no caching
    cache_samplers: tuple[tuple[str, int], ...] = ()  # where the cached rows run; (): each task's default setting
    int8: bool = False  # also the UNets quantized to int8 (W8A8) on every sample, beside fp32 (issue 21's bar)

    def __post_init__(self):
        if self.n_generate < 1 or self.n_edit < 1 or self.n_bf16 < 0:
            raise ValueError(f"--n-generate, --n-edit: expected at least 1, --n-bf16 at least 0; got {self.n_generate}, "
                             f"{self.n_edit}, {self.n_bf16}")
        if self.cache_samplers and not self.cache_grid:
            raise ValueError("--cache-samplers: where the cached rows run; give --cache-interval with an interval above 1")

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), **{name: [list(item) for item in getattr(self, name)]
                                               for name in ("grid", "cache_grid", "cache_samplers")}}


# Settings added after records were made, at the value those records were made with: an older
# record still matches a run without them.
LATER_SETTINGS = {"cache_grid": [], "cache_samplers": [], "int8": False}
INT8_DROP = 0.02  # issue 21's bar: int8 at most 2 points below C++ fp32 on every share, on the same samples


QUICK = Settings(n_generate=32, n_edit=32, n_bf16=0, grid=())  # tests/test_quality.py's run: under a minute on 2 cores


def parse_grid(text: str, *, option: str = "--samplers") -> tuple[tuple[str, int], ...]:
    """"euler:10,ddim:20" -> (("euler", 10), ("ddim", 20)); "" -> () (the default setting only)."""
    grid = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, steps = item.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"{option}: expected comma-separated sampler:steps with a sampler of {sorted(SAMPLERS)} "
                             f"and steps >= 1, got {item!r}")
        grid.append((name, int(steps)))
    return tuple(grid)


def _positive_ints(text: str, option: str) -> list[int]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items or not all(item.isdigit() and int(item) >= 1 for item in items):
        raise ValueError(f"{option}: expected comma-separated integers >= 1, got {text!r}")
    return list(dict.fromkeys(int(item) for item in items))


def parse_cache_grid(intervals: str, depths: str = "1") -> tuple[tuple[int, int], ...]:
    """"1,2,3" and "1,2" -> ((2, 1), (2, 2), (3, 1), (3, 2)): every cached (interval, depth); interval 1
    is the uncached row, measured anyway."""
    depth_list = _positive_ints(depths, "--cache-depth")
    return tuple((interval, depth) for interval in _positive_ints(intervals, "--cache-interval") if interval > 1
                 for depth in depth_list)


def held_out(settings: Settings) -> tuple[list[toyworld.Scene], list[toyworld.Edit]]:
    """The run's held-out scenes and edits; a smaller run's samples are the first of a larger one's."""
    rng = random.Random(settings.seed)
    scenes = [toyworld.sample_scene(rng, "test") for _ in range(settings.n_generate)]
    rng = random.Random(settings.seed)
    return scenes, [toyworld.sample_edit(rng, "test") for _ in range(settings.n_edit)]


def weights_id(folder: Path) -> str:
    """SHA-256 (16 hex digits) of a pipeline folder's weight files: which model a record belongs to."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# -- counting verdicts --------------------------------------------------------------------------

def _share(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def generate_figures(readings: list[toyworld.Reading]) -> dict:
    """Shares of expected shapes with the right color / kind / cell, of images with the right
    background and of images entirely right."""
    shapes = [s for r in readings for s in r.shapes]
    return {"images": len(readings), "shapes": len(shapes), "color": _share(s.color_ok for s in shapes),
            "kind": _share(s.kind_ok for s in shapes), "position": _share(s.position_ok for s in shapes),
            "background": _share(r.background_ok for r in readings), "all": _share(r.ok for r in readings)}


def edit_figures(readings: list[toyworld.EditReading]) -> dict:
    """Success rate overall and per edit kind, mean preservation PSNR (inf capped at PSNR_CAP)."""
    by_kind = {kind: [r.success for r in readings if r.edit.kind == kind] for kind in toyworld.EDIT_KINDS}
    return {"edits": len(readings), "success": _share(r.success for r in readings),
            "preservation": float(np.mean([min(r.preservation, PSNR_CAP) for r in readings])) if readings else None,
            "by_kind": {kind: {"edits": len(flags), "success": _share(flags)} for kind, flags in by_kind.items()}}


def verdicts(reading) -> list[bool]:
    """The judge's yes/no verdicts on one image: per shape color, kind, cell, then the background;
    for an edit its success."""
    if isinstance(reading, toyworld.EditReading):
        return [reading.success]
    return [v for s in reading.shapes for v in (s.color_ok, s.kind_ok, s.position_ok)] + [reading.background_ok]


def same_verdicts(readings: list, baseline: list) -> float:
    """Share of verdicts that `readings` and the first len(readings) of `baseline` (the same samples) agree on."""
    pairs = [(verdicts(r), verdicts(base)) for r, base in zip(readings, baseline)]
    if len(readings) > len(baseline) or any(len(a) != len(b) for a, b in pairs):
        raise ValueError("same_verdicts: expected readings of the baseline's samples")
    return _share(x == y for a, b in pairs for x, y in zip(a, b))


def max_pixel_diff(images: list, baseline: list) -> int:
    """Largest absolute difference of a uint8 channel between `images` and `baseline`, image by image."""
    return max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(images, baseline))


def psnr_to(images: list, baseline: list) -> dict:
    """PSNR in dB of each image to the baseline image of the same request (equal images: PSNR_CAP),
    with their mean and min."""
    values = [min(toyworld.psnr(a, b), PSNR_CAP) for a, b in zip(images, baseline, strict=True)]
    return {"mean": float(np.mean(values)), "min": min(values), "images": values}


# -- running the models ---------------------------------------------------------------------------

def _backend(name: str):
    return ops.use_backend("reference") if name == "reference" else contextlib.nullcontext()


def default_setting(pipe) -> tuple[str, int]:
    """The pipeline's default (sampler name, steps)."""
    return make_sampler(pipe.defaults.sampler, pipe.scheduler_config).name, pipe.defaults.steps


def _cache_options(cache: tuple[int, int] | None) -> dict:
    """A row's (cache_interval, cache_depth) as request fields; None: uncached (nothing set)."""
    return {} if cache is None else {"cache_interval": cache[0], "cache_depth": cache[1]}


def generate_images(pipe, scenes, *, sampler: str, steps: int, seed: int, bar, cache=None) -> list:
    images = []
    for start in range(0, len(scenes), BATCH):
        prompts = [scene.caption() for scene in scenes[start:start + BATCH]]
        images += pipe.generate(prompts, sampler=sampler, steps=steps, seed=seed + start, progress=False,
                                **_cache_options(cache))
        bar.update(len(prompts))
    return images


def edit_images(pipe, edits, *, sampler: str, steps: int, seed: int, bar, cache=None) -> list:
    """The edited images; BATCH edits share each UNet call (Pipeline.run's loop over several requests)."""
    images = []
    for start in range(0, len(edits), BATCH):
        requests = [EditRequest(image=edit.source.render(), instruction=edit.instruction, sampler=sampler, steps=steps,
                                seed=seed + start + i, **_cache_options(cache))
                    for i, edit in enumerate(edits[start:start + BATCH])]
        prepared = [pipe.prepare(pipe.resolve(request)) for request in requests]
        jobs = [job for p in prepared for job in p.jobs]
        while not all(job.done for job in jobs):
            step_jobs(pipe.unet, [job for job in jobs if not job.done])
        images += [p.finish()[0] for p in prepared]
        bar.update(len(prepared))
    return images


def _row(setting, backend, dtype, figures, *, same=None, diff=None, cache=None, psnr=None) -> dict:
    return {"sampler": setting[0], "steps": setting[1], "backend": backend, "dtype": dtype,
            "cache": None if cache is None else list(cache), "figures": figures, "same_verdicts": same,
            "max_pixel_diff": diff, "psnr_to_uncached": psnr}


def cache_settings(settings: Settings, default: tuple[str, int]) -> tuple[tuple[str, int], ...]:
    """Where a task's cached rows run: --cache-samplers, else the task's default setting; none without a cache grid."""
    if not settings.cache_grid:
        return ()
    return settings.cache_samplers or (default,)


def _task_rows(pipes, samples, settings, grid, *, draw, read, figures, bar) -> list[dict]:
    """One task's rows: at the default setting (grid[0]) C++ (the selected backend) fp32, the
    reference backend fp32, C++ bf16 and C++ int8 (settings.int8), the others beside the first; then C++ fp32 per other
    setting of `grid`; then per cache setting (cache_settings) C++ fp32 uncached unless already
    measured, and C++ fp32 per (interval, depth) of the cache grid beside it."""
    cpp = ops.selected_name("cpu")
    default = grid[0]

    def sample(pipe, subset, setting, cache=None):
        images = draw(pipe, subset, sampler=setting[0], steps=setting[1], seed=settings.seed, bar=bar, cache=cache)
        return images, [read(image, s) for image, s in zip(images, subset)]

    uncached = {default: sample(pipes["fp32"], samples, default)}  # setting -> C++ fp32 (images, readings)
    base_images, base_readings = uncached[default]
    rows = [_row(default, cpp, "fp32", figures(base_readings))]
    others = ([("reference", "fp32", samples)] + ([(cpp, "bf16", samples[:settings.n_bf16])] if settings.n_bf16 else [])
              + ([(cpp, "int8", samples)] if settings.int8 else []))
    for backend, dtype, subset in others:
        with _backend(backend):
            images, readings = sample(pipes[dtype], subset, default)
        rows.append(_row(default, backend, dtype, figures(readings), same=same_verdicts(readings, base_readings),
                         diff=max_pixel_diff(images, base_images)))
    for setting in [*grid[1:], *cache_settings(settings, default)]:
        if setting not in uncached:
            uncached[setting] = sample(pipes["fp32"], samples, setting)
            rows.append(_row(setting, cpp, "fp32", figures(uncached[setting][1])))
    for setting in cache_settings(settings, default):
        base_images, base_readings = uncached[setting]
        for cache in settings.cache_grid:
            images, readings = sample(pipes["fp32"], samples, setting, cache)
            rows.append(_row(setting, cpp, "fp32", figures(readings), same=same_verdicts(readings, base_readings),
                             diff=max_pixel_diff(images, base_images), cache=cache, psnr=psnr_to(images, base_images)))
    return rows


def measure(settings: Settings, *, progress: bool = True) -> dict:
    """Run both tasks on their held-out samples; returns {"settings", "weights", "generate": rows,
    "edit": rows}, each row {"sampler", "steps", "backend", "dtype", "cache" ([interval, depth] or
    None), "figures", "same_verdicts", "max_pixel_diff" (these two beside C++ fp32 uncached at the
    row's setting; None on those rows themselves), "psnr_to_uncached" (cached rows: psnr_to's dict)}."""
    from tqdm.auto import tqdm

    from fastdiff.pipeline import Pipeline

    dtypes = ("fp32", "bf16") if settings.n_bf16 else ("fp32",)
    generators = {d: Pipeline.from_pretrained(GENERATE_WEIGHTS, dtype=d) for d in dtypes}
    editors = {d: Pipeline.from_pretrained(EDIT_WEIGHTS, dtype=d) for d in dtypes}
    if settings.int8:
        generators["int8"] = Pipeline.from_pretrained(GENERATE_WEIGHTS, quantize="int8")
        editors["int8"] = Pipeline.from_pretrained(EDIT_WEIGHTS, quantize="int8")
    for pipe in (generators["fp32"], editors["fp32"]):
        deepest = max((depth for _, depth in settings.cache_grid), default=1)
        if deepest > pipe.unet.max_cache_depth:
            raise ValueError(f"--cache-depth: expected at most {pipe.unet.max_cache_depth} (the levels of {pipe.name}'s "
                             f"UNet that can run on a cached step), got {deepest}")
    scenes, edits = held_out(settings)
    generate_default = default_setting(generators["fp32"])
    grid = [generate_default, *(s for s in settings.grid if s != generate_default)]
    edit_default = default_setting(editors["fp32"])

    def cache_images(n, task_grid):  # the cached images and the uncached ones their settings add
        where = cache_settings(settings, task_grid[0])
        return n * (len(where) * len(settings.cache_grid) + len(set(where) - set(task_grid)))

    total = (len(scenes) * (len(grid) + 1 + settings.int8) + min(settings.n_bf16, len(scenes)) + cache_images(len(scenes), grid)
             + (2 + settings.int8) * len(edits) + min(settings.n_bf16, len(edits)) + cache_images(len(edits), [edit_default]))
    with torch.inference_mode(), tqdm(total=total, desc="quality", unit="image", disable=not progress) as bar:
        generate = _task_rows(generators, scenes, settings, grid, draw=generate_images, read=toyworld.judge,
                              figures=generate_figures, bar=bar)
        edit = _task_rows(editors, edits, settings, [edit_default], draw=edit_images, read=toyworld.judge_edit,
                          figures=edit_figures, bar=bar)
    return {"settings": settings.as_json(),
            "weights": {"generate": weights_id(GENERATE_WEIGHTS), "edit": weights_id(EDIT_WEIGHTS)},
            "generate": generate, "edit": edit}


# -- the record ----------------------------------------------------------------------------------

def _key(row) -> tuple:
    cache = row.get("cache")  # absent from rows recorded before caching: uncached
    return row["sampler"], row["steps"], row["backend"], row["dtype"], *(["cache", *cache] if cache else [])


def compare_to_record(result: dict, record: dict, *, margin: float, psnr_margin: float) -> list[str]:
    """One message per problem: a record made with other settings or weights, or a figure of
    `result` more than `margin` (a share) / `psnr_margin` (dB) below the record's same row."""
    if "settings" not in record or {**LATER_SETTINGS, **record["settings"]} != result["settings"]:
        return [f"the record was made with the settings {record.get('settings')}, this run used {result['settings']}: "
                "record again with `python -m fastdiff.bench quality --quick --record`"]
    if record.get("weights") != result["weights"]:
        return [f"the record is for the weights {record.get('weights')}, these are {result['weights']}: record again "
                "with `python -m fastdiff.bench quality --quick --record`"]
    problems = []
    for task, names in (("generate", GENERATE_FIGURES), ("edit", ("success", "preservation"))):
        recorded = {_key(row): row["figures"] for row in record[task]}
        for row in result[task]:
            if _key(row) not in recorded:
                problems.append(f"{task} {' '.join(map(str, _key(row)))}: no such row in the record")
                continue
            for name in names:
                now, then = row["figures"][name], recorded[_key(row)][name]
                allowed = psnr_margin if name == "preservation" else margin
                if now is not None and then is not None and now < then - allowed:
                    problems.append(f"{task} {' '.join(map(str, _key(row)))} {name}: {now:.3f}, recorded {then:.3f} "
                                    f"(allowed drop {allowed})")
    return problems


# -- the tables ----------------------------------------------------------------------------------

def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _marked(value, target, text) -> str:
    return text if value is None else f"{text} {'ok' if value >= target else 'MISS'}"


def _beside(row) -> list[str]:
    if row["same_verdicts"] is None:
        return ["-", "-"]
    return [_pct(row["same_verdicts"]), str(row["max_pixel_diff"])]


def _cache_cells(row) -> list[str]:
    """The step-caching columns: interval/depth and the PSNR to the uncached images (mean / min)."""
    if row["cache"] is None:
        return ["off", "-"]
    psnr = row["psnr_to_uncached"]
    return ["{}/{}".format(*row["cache"]), f"{psnr['mean']:.1f} / {psnr['min']:.1f}"]


def _success_change(row, rows) -> str:
    """A cached edit row's success minus the uncached row's at its setting, in points, marked against
    CACHE_SUCCESS_DROP."""
    if row["cache"] is None:
        return "-"
    uncached = next(r for r in rows if r["cache"] is None and _key(r) == _key({**row, "cache": None}))
    change = row["figures"]["success"] - uncached["figures"]["success"]
    return f"{100 * change:+.1f} {'ok' if change >= -CACHE_SUCCESS_DROP - 1e-9 else 'MISS'}"


def int8_verdict(result: dict) -> str | None:
    """A line judging the int8 rows against C++ fp32 at the same setting (INT8_DROP on every share;
    preservation's change in dB), or None without int8 rows."""
    changes, misses = [], []
    for task, names in (("generate", GENERATE_FIGURES), ("edit", ("success",))):
        for row in (r for r in result[task] if r["dtype"] == "int8"):
            base = next(r for r in result[task] if r["dtype"] == "fp32" and r["backend"] == row["backend"]
                        and _key(r)[:2] == _key(row)[:2] and r["cache"] is None)
            for name in names:
                change = row["figures"][name] - base["figures"][name]
                changes.append(f"{task} {name} {100 * change:+.1f}")
                if change < -INT8_DROP - 1e-9:
                    misses.append(name)
            if task == "edit":
                changes.append(f"edit preservation {row['figures']['preservation'] - base['figures']['preservation']:+.1f} dB")
    if not changes:
        return None
    verdict = "ok" if not misses else f"MISS ({', '.join(misses)})"
    return f"int8 vs fp32, points (bar: >= -{100 * INT8_DROP:.0f} on every share): {', '.join(changes)}: {verdict}"


def tables(result: dict) -> str:
    """The generate and edit tables of a measure() result, figures marked ok / MISS against TARGETS;
    with cached rows, their columns (cache_cells; edit success against CACHE_SUCCESS_DROP)."""
    beside = ["same verdicts", "max |pixel diff|"]
    cached = any(row["cache"] for task in ("generate", "edit") for row in result[task])
    cache_headers = ["cache N/depth", "PSNR to uncached mean / min"] if cached else []
    rows = []
    for row in result["generate"]:
        f = row["figures"]
        rows.append([f"{row['sampler']} {row['steps']}", f"{row['backend']} {row['dtype']}", str(f["images"]),
                     *(_marked(f[n], TARGETS[n], _pct(f[n])) for n in ("color", "kind", "position")),
                     _pct(f["background"]), _pct(f["all"]), *_beside(row), *(_cache_cells(row) if cached else [])])
    generate = format_table(["generate", "backend", "images", *(f"{n} >={TARGETS[n]:.0%}" for n in ("color", "kind", "position")),
                             "background", "all correct", *beside, *cache_headers], rows)
    rows = []
    for row in result["edit"]:
        f = row["figures"]
        cache_cells = [*_cache_cells(row), _success_change(row, result["edit"])] if cached else []
        rows.append([f"{row['sampler']} {row['steps']}", f"{row['backend']} {row['dtype']}", str(f["edits"]),
                     *(_pct(f["by_kind"][k]["success"]) for k in toyworld.EDIT_KINDS),
                     _marked(f["success"], TARGETS["success"], _pct(f["success"])),
                     _marked(f["preservation"], TARGETS["preservation"], f"{f['preservation']:.1f}"), *_beside(row),
                     *cache_cells])
    success_change = [f"success vs uncached, points >=-{100 * CACHE_SUCCESS_DROP:.0f}"] if cached else []
    edit = format_table(["edit", "backend", "edits", *toyworld.EDIT_KINDS, f"success >={TARGETS['success']:.0%}",
                         f"PSNR dB >={TARGETS['preservation']:.0f}", *beside, *cache_headers, *success_change], rows)
    counts = ", ".join(f"{k} {n['edits']}" for k, n in result["edit"][0]["figures"]["by_kind"].items())
    caching = ("\n(cache N/depth: cache_interval/cache_depth; same verdicts, max |pixel diff| and PSNR to uncached (dB, "
               "per image, identical = {:.0f}) beside the uncached C++ fp32 row of the same setting)".format(PSNR_CAP)
               if cached else "")
    int8 = int8_verdict(result)
    return (f"{generate}\n(shares of {result['generate'][0]['figures']['shapes']} shapes; background and all correct: "
            f"of images)\n\n{edit}\n(edits per kind: {counts}; PSNR: mean, to the source outside the edited region)"
            f"{caching}" + (f"\n{int8}" if int8 else ""))


# -- command line ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument("--n-generate", type=int, help=f"held-out captions (default {defaults.n_generate})")
    parser.add_argument("--n-edit", type=int, help=f"held-out edits (default {defaults.n_edit})")
    parser.add_argument("--n-bf16", type=int, help=f"samples of each task also run in bf16 (default {defaults.n_bf16}; 0: none)")
    parser.add_argument("--samplers", help="generate settings besides the pipeline's default, as sampler:steps,... "
                                           f"(default {','.join(f'{n}:{s}' for n, s in defaults.grid)}; '' for none)")
    parser.add_argument("--cache-interval", metavar="N,...",
                        help="step caching (DeepCache) grid axis: cache_interval values, e.g. 1,2,3,5 (1: the uncached "
                             "row, always measured); default: no caching rows")
    parser.add_argument("--cache-depth", metavar="D,...", help="with --cache-interval: cache_depth values (default 1)")
    parser.add_argument("--cache-samplers", metavar="SAMPLER:STEPS,...",
                        help="with --cache-interval: the settings the cached rows run at, each beside its uncached row "
                             "(default: each task's default setting), e.g. euler_ancestral:100")
    parser.add_argument("--int8", action="store_true", default=None,
                        help="also the UNets in int8 (W8A8, C++) on every sample, judged against fp32 (within "
                             f"{100 * INT8_DROP:.0f} points on every share)")
    parser.add_argument("--seed", type=int, help=f"seed of the samples and of the noise (default {defaults.seed})")
    parser.add_argument("--quick", action="store_true", help=f"the reduced run tests/test_quality.py makes: {QUICK.n_generate} captions and "
                        f"{QUICK.n_edit} edits at the default settings, C++ and reference backends, fp32")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--record", action="store_true", help=f"write the figures and settings to {RECORD} (with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def settings_from(args) -> Settings:
    """The run's Settings from the command line: --quick, or the defaults with the options given."""
    options = {"n_generate": "--n-generate", "n_edit": "--n-edit", "n_bf16": "--n-bf16", "seed": "--seed", "int8": "--int8"}
    given = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    flags = {**options, "grid": "--samplers", "cache_grid": "--cache-interval", "cache_samplers": "--cache-samplers"}
    if args.samplers is not None:
        given["grid"] = parse_grid(args.samplers)
    if args.cache_depth is not None and args.cache_interval is None:
        raise ValueError("--cache-depth: a grid axis of the cached rows; give --cache-interval too")
    if args.cache_interval is not None:
        given["cache_grid"] = parse_cache_grid(args.cache_interval, args.cache_depth or "1")
    if args.cache_samplers is not None:
        given["cache_samplers"] = parse_grid(args.cache_samplers, option="--cache-samplers")
    if args.quick:
        if given:
            raise ValueError(f"--quick: fixes the samples and settings; drop {', '.join(flags[n] for n in given)}")
        return QUICK
    if args.record:
        raise ValueError("--record: the record is what tests/test_quality.py compares its --quick run against; add --quick")
    return Settings(**given)


def run(args) -> int:
    settings = settings_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"quality: {settings.n_generate} held-out captions, {settings.n_edit} held-out edits ({settings.n_bf16} of each in "
          f"bf16 too), seed {settings.seed}; weights {WEIGHTS}; {torch.get_num_threads()} threads, "
          f"{ops.selected_name('cpu')} backend")
    result = measure(settings)
    print(tables(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"figures written to {args.json}")
    if args.record:
        RECORD.write_text(json.dumps(result, indent=1) + "\n")
        print(f"recorded to {RECORD}")
    return 0


def load_record(path: Path = RECORD) -> dict:
    """The recorded figures; FileNotFoundError saying how to make them when absent."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: record the quality figures of the trained weights with "
                                "`python -m fastdiff.bench quality --quick --record`")
    return json.loads(path.read_text())


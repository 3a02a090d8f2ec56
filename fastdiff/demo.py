"""The demo (`make demo`): the trained default model on held-out toy-world prompts and edits, judged.

With the default "toyworld" (fastdiff.default_model) it generates held-out captions of
fastdiff.toyworld (never seen in training) and writes them as a grid with each caption under its
image (out/generate_grid.png), edits held-out sources rendered by the toy world
(out/edit_grid.png: before, after, expected), and prints the judge's reading of every image
(fastdiff.toyworld.judge, judge_edit) and the totals.

--timing runs the old timing demo instead: one 512x512 image from the full-size MobileDiffusion
UNet in its one-step mode, then one edit of it, on fastdiff's kernels and again on the reference
(plain PyTorch) backend, with the time of each stage side by side. The image is decoded by the
tiny VAE (AutoencoderTiny, TAESD's size), the edit by the KL VAE (its UNet takes KL image latents).
Those models are UNTRAINED seeded random weights, so their images are noise; the timings are real.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import fastdiff.ops as ops
from fastdiff import toyworld
from fastdiff.bench.timing import format_table
from fastdiff.default_model import LABEL, TRAINED, default_pipeline
from fastdiff.requests import resolve_dtype

SCALE = 2  # the grids show each 128x128 image at twice its size
FONT_SIZE = 13


class StageClock:
    """Wall time spent inside each named module's forward (text encoder, UNet, VAE halves, edit head)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.seconds: dict[str, float] = defaultdict(float)
        self._handles = []
        for name, module in modules.items():
            started = {}
            self._handles.append(module.register_forward_pre_hook(lambda m, a, s=started: s.__setitem__("t", time.perf_counter())))
            self._handles.append(module.register_forward_hook(
                lambda m, a, o, s=started, n=name: self.seconds.__setitem__(n, self.seconds[n] + time.perf_counter() - s["t"])))

    def close(self):
        for handle in self._handles:
            handle.remove()


def _timed(pipe, run) -> tuple[object, dict[str, float]]:
    parts = {"text encoder": pipe.text_encoder.model, "UNet": pipe.unet, "VAE encoder": pipe.vae.encoder,
             "VAE decoder": pipe.vae.decoder}
    clock = StageClock(parts)
    start = time.perf_counter()
    try:
        result = run()
    finally:
        clock.close()
    seconds = dict(clock.seconds)
    seconds["total"] = time.perf_counter() - start
    return result, seconds


def _timing_demo(args, out: Path) -> int:
    """The UNTRAINED models (full size by default), timed on fastdiff's kernels and on the reference backend."""
    name = args.dtype or "bf16"
    dtype = resolve_dtype(name)
    print(f"fastdiff demo --timing: the {args.size} models, {LABEL}")
    start = time.perf_counter()
    generator = default_pipeline("generate", args.size, dtype)
    editor = default_pipeline("edit", args.size, dtype)
    print(f"built {generator.name.split(' (')[0]} and {editor.name.split(' (')[0]} ({name}) in {time.perf_counter() - start:.1f} s")
    prompt, instruction = "a lighthouse on a cliff at sunset", "make it snowy"
    backends = [ops.selected_name("cpu")] + ([] if args.no_reference else ["reference"])
    timings = {}
    for backend in backends:
        with ops.use_backend(backend):
            if not args.no_warmup:
                warm = generator.generate(prompt, seed=0, progress=False)[0]
                editor.edit(warm, instruction, seed=0, steps=1, progress=False)
            image, gen_times = _timed(generator, lambda: generator.generate(prompt, seed=0)[0])
            edited, edit_times = _timed(editor, lambda: editor.edit(image, instruction, seed=0, steps=args.edit_steps))
        timings[backend] = (gen_times, edit_times)
        if backend == backends[0]:
            image.save(out / "generate.png")
            edited.save(out / "edit.png")
            print(f"wrote {out / 'generate.png'} ({image.size[0]}x{image.size[1]}, '{prompt}') and "
                  f"{out / 'edit.png'} ('{instruction}', {args.edit_steps} steps)")

    rows = []
    for task, index, pipe in (("generate (1 step)", 0, generator), (f"edit ({args.edit_steps} steps, 3-way guidance)", 1, editor)):
        stages = timings[backends[0]][index]
        vae = "tiny" if type(pipe.vae).__name__ == "AutoencoderTiny" else "KL"  # text-to-image decodes with TAESD
        for stage in [s for s in ("text encoder", "VAE encoder", "UNet", "VAE decoder") if s in stages] + ["total"]:
            label = f"{stage} ({vae})" if stage.startswith("VAE") else stage
            row = [task if stage == "text encoder" else "", label, f"{stages[stage]:.2f}"]
            if len(backends) > 1:
                reference = timings["reference"][index][stage]
                row += [f"{reference:.2f}", f"{reference / stages[stage]:.2f}x"]
            rows.append(row)
    headers = ["task", "stage", f"{backends[0]} s"] + (["reference s", "speedup"] if len(backends) > 1 else [])
    print(format_table(headers, rows))
    return 0


def _grid(cells: list[tuple[list[Image.Image], list[str]]], columns: int) -> Image.Image:
    """Cells of images side by side with their text wrapped below, `columns` cells a row."""
    font = ImageFont.load_default(size=FONT_SIZE)
    side, gap, pad, line_height = toyworld.SIZE * SCALE, 4, 8, FONT_SIZE + 3
    width = max(len(images) for images, _ in cells) * (side + gap) - gap
    wrapped = [[line for text in texts for line in textwrap.wrap(text, width=width // 7)] for _, texts in cells]
    height = side + pad + line_height * max(len(lines) for lines in wrapped) + pad
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * height + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, ((images, _), lines) in enumerate(zip(cells, wrapped)):
        x, y = pad + (i % columns) * (width + pad), pad + (i // columns) * height
        for j, image in enumerate(images):
            grid.paste(image.resize((side, side), Image.NEAREST), (x + j * (side + gap), y))
        for k, line in enumerate(lines):
            draw.text((x, y + side + 4 + k * line_height), line, fill="black", font=font)
    return grid


def _quality_demo(args, out: Path) -> int:
    """Held-out captions and edits on the trained default, written as grids and judged."""
    name = args.dtype or "fp32"
    start = time.perf_counter()
    generator = default_pipeline("generate", TRAINED, resolve_dtype(name))
    editor = default_pipeline("edit", TRAINED, resolve_dtype(name))
    print(f"fastdiff demo: {generator.name.split(' (')[0]} and {editor.name} ({name}), "
          f"loaded in {time.perf_counter() - start:.1f} s; held-out captions and edits (seed {args.seed})")

    rng = random.Random(args.seed)
    scenes = [toyworld.sample_scene(rng, "test") for _ in range(args.prompts)]
    start = time.perf_counter()
    images = generator.generate([s.caption() for s in scenes], seed=args.seed, progress=False)
    print(f"\ngenerate: {len(scenes)} images, {generator.defaults.steps} steps, in {time.perf_counter() - start:.1f} s")
    cells, read_ok = [], 0
    for scene, image in zip(scenes, images):
        reading = toyworld.judge(image, scene)
        read_ok += reading.ok
        print(f"  {scene.caption()}\n      {reading.summary()}")
        cells.append(([image], [scene.caption(), "OK" if reading.ok else "WRONG"]))
    _grid(cells, columns=4).save(out / "generate_grid.png")

    edits = [toyworld.sample_edit(rng, "test") for _ in range(args.edits)]
    start = time.perf_counter()
    results = []
    for i, edit in enumerate(edits):  # edit i with seed + i, as image i of the generate batch
        source = edit.source.render()
        results.append((edit, source, editor.edit(source, edit.instruction, seed=args.seed + i, progress=False)))
    print(f"\nedit: {len(edits)} edits, {editor.defaults.steps} steps, in {time.perf_counter() - start:.1f} s")
    cells, succeeded, preservation = [], 0, []
    for edit, source, edited in results:
        reading = toyworld.judge_edit(edited, edit, source)
        succeeded += reading.success
        preservation.append(reading.preservation)
        leftovers = f"; still drawn: {', '.join(reading.leftovers)}" if reading.leftovers else ""
        verdict = f"{'OK' if reading.success else 'WRONG'}, preservation {reading.preservation:.1f} dB"
        print(f"  {edit.instruction!r} ({edit.kind}) on {edit.source.caption()}\n"
              f"      {verdict}: {reading.reading.summary()}{leftovers}")
        cells.append(([source, edited, edit.target.render()], [f"{edit.instruction} ({edit.kind})",
                                                              f"before / after / expected: {verdict}"]))
    _grid(cells, columns=2).save(out / "edit_grid.png")

    print(f"\ngenerate: {read_ok}/{len(scenes)} read back correctly; edit: {succeeded}/{len(edits)} succeeded, "
          f"median preservation {statistics.median(preservation):.1f} dB")
    print(f"wrote {out / 'generate_grid.png'} and {out / 'edit_grid.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out captions and edits, and their noise")
    parser.add_argument("--prompts", type=int, default=8, help="held-out captions to generate")
    parser.add_argument("--edits", type=int, default=6, help="held-out edits to run")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: fp32 (bf16 with --timing)")
    parser.add_argument("--quick", action="store_true", help="2 prompts and 2 edits (the test of the README commands)")
    timing = parser.add_argument_group("--timing: the UNTRAINED models, timed")
    timing.add_argument("--timing", action="store_true", help="run the timing demo instead")
    timing.add_argument("--size", choices=["mobilediffusion", "small"], default="mobilediffusion",
                        help="untrained model size: the paper's (512x512 images) or small (quick)")
    timing.add_argument("--edit-steps", type=int, default=10, help="denoising steps of the edit")
    timing.add_argument("--no-reference", action="store_true", help="skip the reference-backend comparison")
    timing.add_argument("--no-warmup", action="store_true",
                        help="time the first runs too (they include one-time set-up: weight packing, page faults)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.edits = 2, 2
    if args.prompts < 1 or args.edits < 1:
        parser.error(f"--prompts, --edits: expected positive counts, got {args.prompts}, {args.edits}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return (_timing_demo if args.timing else _quality_demo)(args, out)


if __name__ == "__main__":
    sys.exit(main())

"""The demo (`make demo`): one 512x512 image from the full-size MobileDiffusion UNet in its one-step
mode, then one edit of it, on fastdiff's kernels and again on the reference (plain PyTorch)
backend, with the time of each stage side by side. The image is decoded by the tiny VAE
(AutoencoderTiny, TAESD's size), the edit by the KL VAE (its UNet takes KL image latents).

The models are fastdiff's embedded defaults: UNTRAINED seeded random weights (nothing can be
downloaded here), so the images are noise; the timings are real. Use real weights with
`fastdiff generate/edit --model DIR` (a diffusers folder) or `Pipeline.from_pretrained`.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import fastdiff.ops as ops
from fastdiff.bench.timing import format_table
from fastdiff.default_model import LABEL, default_pipeline
from fastdiff.requests import resolve_dtype


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["mobilediffusion", "small"], default="mobilediffusion",
                        help="embedded model size: the paper's (512x512 images) or small (quick)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--edit-steps", type=int, default=10, help="denoising steps of the edit")
    parser.add_argument("--out", default="out", help="folder for the PNGs")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-backend comparison")
    parser.add_argument("--no-warmup", action="store_true",
                        help="time the first runs too (they include one-time set-up: weight packing, page faults)")
    args = parser.parse_args(argv)
    dtype = resolve_dtype(args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"fastdiff demo: embedded default models, {LABEL}")
    start = time.perf_counter()
    generator = default_pipeline("generate", args.size, dtype)
    editor = default_pipeline("edit", args.size, dtype)
    print(f"built {generator.name.split(' (')[0]} and {editor.name.split(' (')[0]} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
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


if __name__ == "__main__":
    sys.exit(main())

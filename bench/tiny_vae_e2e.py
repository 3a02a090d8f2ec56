"""One-step 512x512 text-to-image end to end as `fastdiff generate` runs it (the embedded MobileDiffusion
default: text encoder + UNet + decoder + PNG write), decoded by the tiny VAE (AutoencoderTiny) and
by the KL VAE, in fp32 and bf16, in one process:

    flock /tmp/fastdiff-bench.lock .venv/bin/python bench/tiny_vae_e2e.py --rounds 3

Both decoders share one UNet and text encoder per dtype; the runs alternate tiny/KL each round
(after one warm-up each) and the table shows medians. Weights are the default's seeded random ones:
the timings are real, the images noise.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastdiff.bench.timing import format_table
from fastdiff.default_model import default_pipeline
from fastdiff.demo import StageClock
from fastdiff.pipeline import Pipeline
from fastdiff.requests import GenerateRequest

PROMPT = "a lighthouse on a cliff at sunset"


def run_once(pipe: Pipeline, out: Path) -> dict[str, float]:
    clock = StageClock({"text encoder": pipe.text_encoder.model, "UNet": pipe.unet, "decoder": pipe.vae.decoder})
    start = time.perf_counter()
    try:  # what `fastdiff generate` times: the run and the PNG write
        pipe.run(GenerateRequest(prompt=PROMPT, seed=0), progress=False)[0].save(out)
    finally:
        clock.close()
    return {**clock.seconds, "end to end": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out.png"
        for name in args.dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            tiny = default_pipeline("generate", "mobilediffusion", dtype)
            kl_vae = default_pipeline("generate", "mobilediffusion", dtype, vae="kl").vae
            default_pipeline.cache_clear()  # keep only the parts used below (one UNet per dtype)
            kl = Pipeline(unet=tiny.unet, vae=kl_vae, scheduler_config=tiny.scheduler_config,
                          text_encoder=tiny.text_encoder, defaults=tiny.defaults, name="KL")
            pipes = {"tiny": tiny, "KL": kl}
            times = {vae: [] for vae in pipes}
            for vae, pipe in pipes.items():
                run_once(pipe, out)  # warm-up: weight packing, first-touch pages
            for _ in range(args.rounds):
                for vae, pipe in pipes.items():
                    times[vae].append(run_once(pipe, out))
            for vae, runs in times.items():
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append([name, vae, *(f"{med[k]:.2f}" for k in ("text encoder", "UNet", "decoder", "end to end"))])
                print(*rows[-1], flush=True)  # a slow bf16 pass must not hide the fp32 figures
            del tiny, kl, pipes
    print(format_table(["dtype", "decoder", "text encoder s", "UNet s", "decoder s", "end to end s"], rows))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.rounds} rounds")


if __name__ == "__main__":
    main()

"""Ablation table: MobileDiffusion's UNet with each design choice reverted in turn (params, MACs, CPU latency vs the paper).

Each row builds the default "mobilediffusion" preset with one change undone and reports its
parameters, MACs (counted on the meta device: conv + linear + attention matmuls) and, with
--latency, the median CPU time of a forward pass at --res (batch 1, 77 text tokens) on random
weights, run in alternation with the default model (a shared machine's load drifts; each ratio
uses the default runs beside it). The "default vs row" columns give what the design choice buys,
in the paper's sign convention: default / row - 1 for parameters and MACs (negative = the
default is smaller), and row latency / default latency - 1 for speed (positive = the default is
faster). The last column is the figure MobileDiffusion reports for that choice.

Reverting a choice does not always recreate the paper's exact baseline (it ablated while
designing); e.g. "transformers at 64x64" adds SD-style full blocks there on top of the core.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastdiff.ops as ops
from fastdiff.bench.timing import format_table, interleaved_ms
from fastdiff.bench.unet import fill_random
from fastdiff.models.mobilediffusion import PRESETS, MobileDiffusionConfig, MobileDiffusionUNet, summarize


def variants(base: MobileDiffusionConfig) -> list[tuple[str, MobileDiffusionConfig, str]]:
    """(row name, `base` with one choice reverted, what the paper reports for that choice)."""
    finest_full = dict(transformer_depth=(1,) + base.transformer_depth[1:],
                       cross_attention_only=(False,) + base.cross_attention_only[1:])
    levels = len(base.block_out_channels)
    return [
        ("MobileDiffusion (default)", base, ""),
        ("transformers at 64x64", base.replace(**finest_full), "cost -26%"),
        ("self-attention at 32x32", base.replace(cross_attention_only=tuple(i != 1 for i in range(levels))), "cost -15%"),
        ("separate K and V", base.replace(shared_kv=False), "params -5%"),
        ("FF expansion 8", base.replace(ff_expansion=8), "-10%"),
        ("dense 3x3 convs", base.replace(separable_conv=(False,) * levels), "-10%"),
        # SD1.5's 22: two per down level, three per up level, the rest (7) in the core
        ("22 residual blocks", base.replace(down_layers=(2,) * levels, up_layers=(3,) * levels, mid_layers=22 - 5 * levels),
         "speed +19%, params -15%"),
        ("ReLU attention (on)", base.replace(relu_attention=True), "(a switch, not reverted)"),
    ]


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mobilediffusion", help="the default model")
    parser.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                        help="measure CPU forward latency (slow at 512: tens of seconds per row)")
    parser.add_argument("--res", type=int, default=512, help="image side in pixels (latent = res / 8); 256 is 4x quicker")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="weights and activations for latency")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per row and beside it of the default (medians)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop timing a row after this long (>= 3 pairs kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--backend", choices=["auto", *ops.BACKENDS], default="auto", help="fastdiff.ops backend for latency")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


class _Forward:
    """One forward pass of `config` at batch 1 on random weights, callable."""

    def __init__(self, config: MobileDiffusionConfig, dtype: torch.dtype):
        with torch.device("meta"):
            model = MobileDiffusionUNet(config)
        self.model = fill_random(model).to(dtype)
        side = config.sample_size
        self.sample = torch.randn(1, config.in_channels, side, side).to(dtype)
        self.context = torch.randn(1, config.text_length, config.cross_attention_dim).to(dtype)

    def __call__(self):
        return self.model(self.sample, 500, self.context)


def _ratio(value: float, base: float) -> str:
    return f"{100 * (value / base - 1):+.0f}%"


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    factor = 8 * 2 ** (len(PRESETS[args.preset].block_out_channels) - 1)
    if args.res % factor or args.res < factor:
        raise SystemExit(f"--res: expected a positive multiple of {factor} (VAE x8, then the UNet's levels), got {args.res}")
    latent = args.res // 8
    table = variants(PRESETS[args.preset])
    backend = args.backend if args.backend != "auto" else ops.selected_name("cpu")
    dtype = _DTYPES[args.dtype]
    default = None
    results = []
    for name, config, paper in table:
        config = config.replace(sample_size=latent)
        s = summarize(config)
        row = {"variant": name, "params": s.params, "macs": s.total_macs, "module_macs": s.module_macs,
               "resnets": config.num_resnets, "paper": paper}
        if args.latency and default is None:
            default = _Forward(config, dtype)
            row["default_runs_ms"] = []
        elif args.latency:
            # The machine is shared and its load drifts: each row is timed in alternation with
            # the default, and compared with those default runs only.
            start = time.perf_counter()
            with ops.use_backend(backend):
                times = interleaved_ms({"default": default, "variant": _Forward(config, dtype)}, repeats=args.repeats,
                                       budget_s=args.budget_s)
            default_ms, variant_ms = times["default"], times["variant"]
            row["latency_ms"], row["paired_default_ms"] = statistics.median(variant_ms), statistics.median(default_ms)
            results[0]["default_runs_ms"] += default_ms
            print(f"  {name}: {row['latency_ms']:.0f} ms, default beside it {row['paired_default_ms']:.0f} ms "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        results.append(row)

    base = results[0]
    if args.latency:
        base["latency_ms"] = statistics.median(base["default_runs_ms"])
    headers = ["variant", "resnets", "params (M)", "GMACs", "default vs row: params", "MACs"]
    if args.latency:
        headers += ["latency (ms)", "default speed-up"]
    headers += ["paper"]
    rows = []
    for r in results:
        is_base = r is base
        cells = [r["variant"], str(r["resnets"]), f"{r['params'] / 1e6:.4g}", f"{r['macs'] / 1e9:.4g}",
                 "" if is_base else _ratio(base["params"], r["params"]), "" if is_base else _ratio(base["macs"], r["macs"])]
        if args.latency:
            cells += [f"{r['latency_ms']:.0f}", "" if is_base else _ratio(r["latency_ms"], r["paired_default_ms"])]
        cells.append(r["paper"])
        rows.append(cells)
    where = f"{args.res}x{args.res} (latent {latent}x{latent}), batch 1, 77 text tokens"
    print(f"MobileDiffusion ablations at {where}; MACs include attention matmuls")
    if args.latency:
        print(f"latency: median of up to {args.repeats} forward passes, {args.dtype}, backend {backend}, "
              f"{torch.get_num_threads()} threads, random weights; each row timed in alternation with the default "
              f"and its speed-up taken against those default runs (the default row: median of all of them)")
    print(format_table(headers, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"resolution": args.res, "dtype": args.dtype, "backend": backend if args.latency else None,
                       "threads": torch.get_num_threads(), "rows": results}, f, indent=2)
    return 0

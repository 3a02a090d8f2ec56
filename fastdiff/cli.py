"""The `fastdiff` command: generate, edit, validate, bench, info, serve.

Errors print one line naming what is wrong and exit non-zero; --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

import fastdiff
import fastdiff.ops as ops
from fastdiff import hardware
from fastdiff.quantization import DTYPES as QUANTIZE_DTYPES
from fastdiff.requests import EditRequest, GenerateRequest, PipelineError


def _info(args) -> int:
    print(f"fastdiff {fastdiff.__version__}  (torch {torch.__version__}, Python {platform.python_version()})")
    for name, status in ops.backends().items():
        print(f"  backend {name:<9} {status}")
    try:
        print(f"  C++ SIMD level: {ops.cpp_simd_level()}")
    except Exception as exc:  # no compiler, a failed build: the C++ backend line above says the same
        print(f"  C++ extension: not available ({exc})")
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16"]
    print(f"  CPU: {hardware.cpu_name()}, {torch.get_num_threads()} threads, "
          f"features: {' '.join(w for w in wanted if w in hardware.cpu_flags()) or 'unknown'}")
    fast = ", ".join(str(d).removeprefix("torch.") for d in hardware.fast_dtypes("cpu"))
    slow = "" if torch.bfloat16 in hardware.fast_dtypes("cpu") else \
        f"; bf16 runs but slowly here (no BF16 dot products: ~{hardware.BF16_SLOWDOWN} the fp32 time)"
    print(f"  CPU fast dtypes: {fast}{slow}")
    onednn = ", ".join(str(d).removeprefix("torch.") for d in hardware.onednn_dtypes()) or "none (no oneDNN in this torch)"
    print(f"  CPU dense products (ops.linear, ops.conv2d) through oneDNN in: {onednn}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  CUDA device {i}: {torch.cuda.get_device_name(i)}")
    else:
        print("  CUDA: none")
    return 0


def _validate(args) -> int:
    from fastdiff.bench.timing import format_table
    from fastdiff.validate import compare, kernel_cases, unet_class

    if args.model is not None:
        unet_class(args.model)  # a folder that is not a pipeline fails now, not after minutes of kernel checks
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast = [name for name, status in ops.backends().items() if name != "reference" and status == "available"]
    if device == "cpu":
        fast = [name for name in fast if name == "cpp"]  # Triton's CPU interpreter is for tests, not validation
    rows, failures = [], 0
    for backend in ["reference", *fast]:
        for dtype in hardware.device_dtypes(device):
            if dtype not in hardware.backend_dtypes(backend):
                continue
            for label, op, op_args, kwargs, cast in kernel_cases():
                _, result = compare(op, op_args, kwargs, backend, dtype, device=device, cast=cast)
                failures += not result.passed
                rows.append([op, label, backend, str(dtype).removeprefix("torch."), f"{result.error:.2e}",
                             f"{result.bound:.2e}", "PASS" if result.passed else f"FAIL {result.problem or ''}".strip()])
    print(format_table(["op", "shape", "backend", "dtype", "error", "bound", "result"], rows))
    model_rows = _validate_models(args.model)
    failures += sum(not r["passed"] for r in model_rows)
    total = len(rows) + len(model_rows)
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


def _validate_models(folder) -> list[dict]:
    """The UNet and VAE against diffusers (same weights, same inputs), when diffusers is installed."""
    import importlib.util

    from fastdiff.bench.timing import format_table
    from fastdiff.validate import compare_models

    if importlib.util.find_spec("diffusers") is None:
        if folder is not None:
            raise RuntimeError("--model: checking a model against diffusers needs diffusers (pip install 'fastdiff[reference]')")
        print("models: diffusers not installed, model checks not run (pip install 'fastdiff[reference]')")
        return []
    rows = compare_models(folder)
    print()
    print(format_table(["model", "backend", "dtype", "error", "bound", "result"],
                       [[r["model"] + (f" ({folder})" if folder else " (small random)"), r["backend"], r["dtype"],
                         f"{r['error']:.2e}", f"{r['bound']:.2e}", "PASS" if r["passed"] else "FAIL"] for r in rows]))
    return rows


def _check_output(path: str) -> None:
    """Refuse an output path that cannot be written before any model is built."""
    import os

    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PipelineError("-o/--output", f"folder {folder} does not exist")
    Image.init()
    extension = os.path.splitext(path)[1].lower()
    writable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    if extension not in writable:
        what = repr(extension) if extension else "a file without an extension"
        raise PipelineError("-o/--output", f"cannot write images as {what}; use one of .png, .jpg, .webp, ... "
                            f"({len(writable)} extensions PIL writes)")


def _save(images, output: str) -> list[str]:
    """Write images to `output`; several images get _0, _1, ... before the extension."""
    import os

    if len(images) == 1:
        images[0].save(output)
        return [output]
    stem, ext = os.path.splitext(output)
    paths = [f"{stem}_{i}{ext}" for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def _run(args, kind: str, request) -> int:
    """Load the model (after the request and output path have passed their checks), run, save."""
    import time

    from fastdiff.api import get_pipeline

    pipe = get_pipeline(args.model, kind, args.dtype, args.quantize)
    print(f"model: {pipe.name}" + (f", UNet on {pipe.quantized} weights" if pipe.quantized else ""))
    start = time.perf_counter()
    paths = _save(pipe.run(request), args.output)
    print(f"wrote {', '.join(paths)} in {time.perf_counter() - start:.2f} s")
    return 0


def _generate(args) -> int:
    _check_output(args.output)
    request = GenerateRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                              guidance_scale=args.guidance_scale, height=args.height, width=args.width, seed=args.seed,
                              sampler=args.sampler, num_images=args.num_images, cache_interval=args.cache_interval,
                              cache_depth=args.cache_depth)
    return _run(args, "generate", request)


def _edit(args) -> int:
    from fastdiff.images import load_image

    _check_output(args.output)
    if any(getattr(args, flag) is not None for flag in ("mgie", "llava", "ip2p", "vision")):
        return _edit_mgie(args)
    request = EditRequest(image=load_image(args.image), instruction=args.instruction, steps=args.steps,
                          guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
                          seed=args.seed, sampler=args.sampler, cache_interval=args.cache_interval,
                          cache_depth=args.cache_depth)
    return _run(args, "edit", request)


# MGIE.from_pretrained's arguments and the flags that set them
MGIE_FLAGS = {"llava_dir": "--llava", "mgie_dir": "--mgie", "ip2p_dir": "--ip2p", "vision_dir": "--vision"}


def _edit_mgie(args) -> int:
    """MGIE end to end: LLaVA reads the instruction, its [IMG] states condition the edit."""
    import time

    from fastdiff.mgie import MAX_SIZE, MGIE, check_instruction

    for flag in ("mgie", "llava", "ip2p"):
        if getattr(args, flag) is None:
            raise PipelineError(f"--{flag}", "needed for an MGIE edit (--mgie MGIE_DIR --llava LLAVA_DIR --ip2p IP2P_DIR)")
    if args.model is not None:
        raise PipelineError("--model", "not with --mgie (MGIE's editor is the --ip2p folder)")
    if args.quantize is not None:
        raise PipelineError("--quantize", "not with --mgie (fastdiff.MGIE runs float weights)")
    check_instruction(args.instruction)
    start = time.perf_counter()
    # 7B weights: bf16 unless asked otherwise (fp32 would need ~27 GB)
    try:
        mgie = MGIE.from_pretrained(args.llava, args.mgie, args.ip2p, vision_dir=args.vision, dtype=args.dtype or "bf16")
    except PipelineError as exc:  # name the flag the user typed, not the Python argument
        if exc.field not in MGIE_FLAGS:
            raise
        raise PipelineError(MGIE_FLAGS[exc.field], exc.detail) from exc
    print(f"model: {mgie!r}, loaded in {time.perf_counter() - start:.1f} s")
    options = dict(steps=args.steps, guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
                   sampler=args.sampler, cache_interval=args.cache_interval, cache_depth=args.cache_depth)
    result = mgie.edit(args.image, args.instruction, seed=args.seed, **{k: v for k, v in options.items() if v is not None})
    result.image.save(args.output)
    t = result.timings
    print(f"expressive instruction: {result.expressive_instruction or '(none: the MLLM wrote no text)'}")
    if not result.img_token_written:
        print("  (the MLLM wrote no [IMG] token: its last 8 hidden states condition the edit, as MGIE does then)")
    print(f"  MLLM vision + embed  {t['vision_s']:8.2f} s")
    print(f"  MLLM prefill         {t['prefill_s']:8.2f} s  ({t['prompt_tokens']} tokens, "
          f"{t['prompt_tokens'] / t['prefill_s']:.1f} tokens/s)")
    print(f"  MLLM decode          {t['decode_s']:8.2f} s  ({t['new_tokens']} tokens, "
          f"{max(t['new_tokens'] - 1, 0) / max(t['decode_s'], 1e-9):.2f} tokens/s)")
    print(f"  VAE encode, edit head{t['encode_s']:8.2f} s")
    print(f"  UNet                 {t['unet_s']:8.2f} s  ({t['steps']} steps, {t['unet_s'] / t['steps']:.2f} s/step)")
    print(f"  VAE decode           {t['vae_decode_s']:8.2f} s")
    print(f"wrote {args.output} ({result.image.width}x{result.image.height}: MGIE edits the input shrunk to fit "
          f"{MAX_SIZE}x{MAX_SIZE})")
    return 0


def _bench(args) -> int:
    from fastdiff.bench.__main__ import main as bench_main

    return bench_main(args.rest, prog="fastdiff bench")


def _autoscale(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return int(low), int(high)


def _serve(args) -> int:
    """The HTTP service (fastdiff.serving): one process under uvicorn, or Ray Serve replicas."""
    import os

    import torch

    from fastdiff.serving import Limits

    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_key or os.environ.get("FASTDIFF_API_KEY")):
        print(f"fastdiff serve: warning: listening on {args.host} without --api-key: anyone who reaches the port "
              "can use it", file=sys.stderr)
    given = dict(max_body_bytes=args.max_body_bytes, max_steps=args.max_steps, max_queue=args.max_queue,
                 max_pixels=args.max_pixels)
    limits = {name: value for name, value in given.items() if value is not None}  # the rest: Limits' defaults
    if args.ray:
        from fastdiff.serving.ray_serve import ServeArgs, serve_forever

        options = ServeArgs(model=args.model, dtype=args.dtype, quantize=args.quantize, max_batch=args.max_batch, threads=args.threads,
                            api_key=args.api_key, **limits)
        return serve_forever(options, host=args.host, port=args.port, replicas=args.replicas, autoscale=args.autoscale,
                             num_cpus=args.num_cpus, num_gpus=args.num_gpus, drain_timeout_s=args.drain_timeout)
    if args.replicas or args.autoscale:
        raise PipelineError("--replicas/--autoscale", "only with --ray")
    from fastdiff.serving import create_app, load_pipelines, serve_forever

    if args.threads:
        torch.set_num_threads(args.threads)
    pipes = load_pipelines(args.model, args.dtype, args.quantize)
    app = create_app(pipes, api_key=args.api_key, max_batch=args.max_batch, limits=Limits(**limits))
    print(f"fastdiff serve: {', '.join(p.name + (f' ({p.quantized} UNet)' if p.quantized else '') for p in pipes)} on http://{args.host}:{args.port}", flush=True)
    return serve_forever(app, host=args.host, port=args.port, drain_timeout_s=args.drain_timeout)


def _add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-interval", type=int, metavar="N",
                        help="step caching (DeepCache): every N-th step runs the whole UNet, the steps between reuse its "
                             "deep features: faster, and further from the uncached image as N grows (default: the "
                             "model's; 1: off)")
    parser.add_argument("--cache-depth", type=int, metavar="D",
                        help="with --cache-interval: the outer resolution levels that run on cached steps, from 1 "
                             "(cheapest) to the UNet's levels (closest to the uncached image); default: the model's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description="fastdiff: diffusion inference on its own kernels")
    parser.add_argument("--version", action="version", version=f"fastdiff {fastdiff.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # --debug is accepted after the subcommand too; SUPPRESS keeps the main parser's value when absent
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", parents=[common], help="version, backends, CPU features, devices").set_defaults(run=_info)
    model_help = ("a diffusers-format folder, or an embedded default: toyworld (default, trained on fastdiff.toyworld), "
                  "or the UNTRAINED mobilediffusion or small, for timing ($FASTDIFF_MODEL)")
    quantize_help = "int8: the UNet's linear and 1x1 convolution weights in int8 (W8A8; default: float)"
    gen = sub.add_parser("generate", parents=[common], help="text to image")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", required=True, help="image file to write (PNG, JPEG, ...)")
    gen.add_argument("--model", help=model_help)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--sampler", help="euler_ancestral, euler, ddim, dpmpp_2m or x0 (default: the model's)")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--dtype", choices=list(hardware.DTYPE_NAMES), default="fp32", help="fp16 runs on CUDA only")
    gen.add_argument("--quantize", choices=QUANTIZE_DTYPES, help=quantize_help)
    _add_cache_arguments(gen)
    gen.set_defaults(run=_generate)
    ed = sub.add_parser("edit", parents=[common], help="edit an image following an instruction")
    ed.add_argument("image", help="input image file")
    ed.add_argument("instruction")
    ed.add_argument("-o", "--output", required=True, help="image file to write")
    ed.add_argument("--model", help=model_help)
    ed.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    ed.add_argument("--guidance-scale", type=float, help="text guidance (default: the model's)")
    ed.add_argument("--image-guidance-scale", type=float, help="image guidance (default: the model's)")
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--sampler", help="euler_ancestral, euler, ddim or dpmpp_2m (default: the model's)")
    ed.add_argument("--dtype", choices=list(hardware.DTYPE_NAMES), help="default fp32 (bf16 with --mgie); fp16 runs on CUDA only")
    ed.add_argument("--quantize", choices=QUANTIZE_DTYPES, help=quantize_help)
    _add_cache_arguments(ed)
    ed.add_argument("--mgie", metavar="MGIE_DIR", help="MGIE end to end: its unet.pt and mllm.pt (with --llava, --ip2p)")
    ed.add_argument("--llava", metavar="LLAVA_DIR", help="MGIE: the LLaVA-7B-v1 folder")
    ed.add_argument("--ip2p", metavar="IP2P_DIR", help="MGIE: InstructPix2Pix in diffusers' layout")
    ed.add_argument("--vision", metavar="VISION_DIR", help="MGIE: the CLIP vision tower, if mm_vision_tower is not local")
    ed.set_defaults(run=_edit)
    val = sub.add_parser("validate", parents=[common], help="every kernel against its reference twin, and the models against diffusers")
    val.add_argument("--model", help="a diffusers pipeline folder whose unet/ and vae/ to check (default: small random models)")
    val.set_defaults(run=_validate)
    # everything after `bench` (its own -h included) goes to fastdiff.bench's parser, see main()
    bench = sub.add_parser("bench", help="benchmark tables: kernels, unet, ablations, engine (see `fastdiff bench -h`)",
                           add_help=False)
    bench.set_defaults(run=_bench)
    srv = sub.add_parser("serve", parents=[common], help="HTTP service: POST /v1/generate, /v1/edit (needs fastdiff[serve])")
    srv.add_argument("--model", help=model_help)
    srv.add_argument("--dtype", choices=list(hardware.DTYPE_NAMES), default="fp32", help="fp16 runs on CUDA only")
    srv.add_argument("--quantize", choices=QUANTIZE_DTYPES, help=quantize_help)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on all but /healthz ($FASTDIFF_API_KEY)")
    srv.add_argument("--max-batch", type=int, default=8, help="requests denoised together per model (Engine max_batch)")
    srv.add_argument("--max-queue", type=int, help="requests waiting beyond the batch before 429 (default 64)")
    srv.add_argument("--max-steps", type=int, help="largest steps a request may ask for (default 150)")
    srv.add_argument("--max-pixels", type=int, help="largest image in pixels (default: the model's, 4 megapixels)")
    srv.add_argument("--max-body-bytes", type=int, help="largest request body (default 16 MiB)")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="seconds in-flight requests may take to finish after SIGTERM")
    srv.add_argument("--threads", type=int, help="torch threads (per replica with --ray)")
    srv.add_argument("--ray", action="store_true", help="deploy on Ray Serve ($RAY_ADDRESS, or a local cluster)")
    scale = srv.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="with --ray: this many replicas (default 1)")
    scale.add_argument("--autoscale", type=_autoscale, metavar="MIN,MAX",
                       help="with --ray: scale between MIN and MAX replicas on ongoing requests")
    srv.add_argument("--num-cpus", type=float, default=1, help="with --ray: CPUs per replica")
    srv.add_argument("--num-gpus", type=float, default=0, help="with --ray: GPUs per replica")
    srv.set_defaults(run=_serve)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.rest = argv[argv.index("bench") + 1:]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for users; --debug for the traceback
        if args.debug:
            raise
        print(f"fastdiff {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

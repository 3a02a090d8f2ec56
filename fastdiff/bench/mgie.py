"""MGIE table: the MLLM's prefill and decode rates and one diffusion step, fastdiff beside plain transformers / diffusers.

MLLM: LLaVA-7B's layer shapes (width 4096, MLP 11008, 32 heads, vocabulary 32011 with MGIE's
tokens) with --layers decoder layers instead of 32, so it fits and runs on a small machine; random
weights, a --prompt-tokens prompt (MGIE's is ~320: the template, the instruction and 256 image
patches). fastdiff: fastdiff.models.llava's greedy loop (lm_head on the newest position only, the
last layer's states kept, n-gram ban over the ids); baseline: transformers' generate as MGIE calls
it (greedy, no_repeat_ngram_size=3, return_dict_in_generate, output_hidden_states). Decode rate
over --new-tokens tokens after the first. The 32-layer columns scale the per-layer part:
t32 = t_fixed + (t - t_fixed) * 32 / layers, t_fixed = the final norm and lm_head, timed alone.

Diffusion: one 3-way guided Euler-ancestral step of InstructPix2Pix's UNet (SD1.5, 8 input
channels, 77 x 768 context) at --res: fastdiff's Job step (UNet on fastdiff's kernels, guidance,
sampler) beside diffusers' UNet2DConditionModel on the same random weights with the same
guidance and EulerAncestralDiscreteScheduler.step (fp32 eager, and bf16 weights).
"""
from __future__ import annotations

import argparse
import statistics

import torch

import fastdiff.ops as ops
from fastdiff.bench.timing import elapsed_ms, format_table, median_ms
from fastdiff.bench.unet import SD15_CONFIG, fill_random

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LLAVA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32011, rms_norm_eps=1e-6,
                max_position_embeddings=2048)
FULL_LAYERS = 32
# SD1.5 / InstructPix2Pix scheduler config (timbrooks/instruct-pix2pix: EulerAncestralDiscreteScheduler)
IP2P_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "steps_offset": 1, "prediction_type": "epsilon"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=2, help="LLaMA decoder layers (LLaVA-7B has 32)")
    parser.add_argument("--prompt-tokens", type=int, default=320)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per run (MGIE allows up to 96)")
    parser.add_argument("--res", type=int, default=512, help="image side for the diffusion step (MGIE: at most 512)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-diffusion", action="store_true")


def _mllm_rows(args, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdiff.models.llava import LlavaV1

    config = LlamaConfig(**LLAVA_7B, num_hidden_layers=args.layers, eos_token_id=None, bos_token_id=1)
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
    llm = fill_random(llm).to(dtype)
    with torch.device("cpu"):  # the rotary frequencies: a buffer that to_empty left uninitialised
        llm.model.rotary_emb = type(llm.model.rotary_emb)(config=config)
    llava = LlavaV1(llm, None, None, select_layer=-2, patch_token_id=0)
    ids = torch.randint(3, 32000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    embeds = llm.get_input_embeddings()(ids)
    n = args.new_tokens

    generate = dict(input_ids=ids, inputs_embeds=embeds, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                    no_repeat_ngram_size=3, return_dict_in_generate=True, output_hidden_states=True)
    fastdiff_runs, prefill, total = [], [], []
    for repeat in range(args.repeats + 1):  # interleaved, so a change in the machine's load hits both; run 0 warms up
        timings = {}
        llava.greedy(ids[0].tolist(), embeds, max_new_tokens=n, no_repeat_ngram_size=3, eos_token_id=None, timings=timings)
        first = elapsed_ms(lambda: llm.generate(**generate, max_new_tokens=1)) / 1e3
        whole = elapsed_ms(lambda: llm.generate(**generate, max_new_tokens=n, min_new_tokens=n)) / 1e3
        if repeat:
            fastdiff_runs.append(timings)
            prefill.append(first)
            total.append(whole)
    hidden = torch.randn(1, args.prompt_tokens, config.hidden_size, dtype=dtype)
    fixed_prefill = median_ms(lambda: llm.lm_head(llm.model.norm(hidden)[:, -1:])) / 1e3
    fixed_decode = median_ms(lambda: llm.lm_head(llm.model.norm(hidden[:, :1]))) / 1e3
    scale = FULL_LAYERS / args.layers
    project = lambda t, fixed: fixed + (t - fixed) * scale  # noqa: E731

    def rates(prefill_s, decode_per_token_s):
        return [args.prompt_tokens / prefill_s, 1 / decode_per_token_s,
                args.prompt_tokens / project(prefill_s, fixed_prefill), 1 / project(decode_per_token_s, fixed_decode)]

    median = statistics.median_high  # one of the runs, as before
    ours = rates(median([r["prefill_s"] for r in fastdiff_runs]), median([r["decode_s"] for r in fastdiff_runs]) / (n - 1))
    p = median(prefill)
    theirs = rates(p, (median(total) - p) / (n - 1))
    return [(f"fastdiff greedy loop ({args.dtype})", ours), (f"transformers generate ({args.dtype})", theirs)]


def _diffusion_rows(args, dtype):
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel

    from fastdiff.jobs import Job, step_jobs
    from fastdiff.models.unet_2d_condition import UNet2DCondition
    from fastdiff.requests import EditGuidance
    from fastdiff.samplers import make_sampler

    config = dict(SD15_CONFIG, in_channels=8)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    reference = fill_random(reference)
    side = args.res // 8
    g = torch.Generator().manual_seed(0)
    image_latents = torch.randn(1, 4, side, side, generator=g)
    context = torch.randn(3, 77, 768, generator=g)  # [text, null, null] rows, as EditGuidance lays them out
    time_step = lambda fn: median_ms(fn, warmup=1, repeats=args.repeats, budget_s=600) / 1e3  # noqa: E731

    fast = UNet2DCondition.from_diffusers(reference, dtype=dtype)
    guidance = EditGuidance(7.5, 1.5)
    run = make_sampler("EulerAncestralDiscreteScheduler", {"_class_name": "EulerAncestralDiscreteScheduler",
                                                            **IP2P_SCHEDULER}).start(100)
    job = Job(run=run, latents=run.initial_latents((1, 4, side, side), generator=g), context=context, guidance=guidance,
              generator=torch.Generator().manual_seed(1), image_latents=guidance.image_latents(image_latents))
    results = [(f"fastdiff {args.dtype}", time_step(lambda: step_jobs(fast, [job])))]
    del fast

    def diffusers_step(unet):
        scheduler = EulerAncestralDiscreteScheduler.from_config(IP2P_SCHEDULER)
        scheduler.set_timesteps(100)
        state = {"latents": torch.randn(1, 4, side, side, generator=g) * scheduler.init_noise_sigma, "i": 0}
        images = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        generator = torch.Generator().manual_seed(1)
        unet_dtype = next(unet.parameters()).dtype

        def step():  # StableDiffusionInstructPix2PixPipeline's loop body
            t = scheduler.timesteps[state["i"]]
            x = scheduler.scale_model_input(torch.cat([state["latents"]] * 3), t)
            out = unet(torch.cat([x, images], 1).to(unet_dtype), t, context.to(unet_dtype)).sample.float()
            text, image, uncond = out.chunk(3)
            guided = uncond + 7.5 * (text - image) + 1.5 * (image - uncond)
            state["latents"] = scheduler.step(guided, t, state["latents"], generator=generator).prev_sample
            state["i"] += 1

        return step

    results.append(("diffusers fp32", time_step(diffusers_step(reference))))
    results.append(("diffusers bf16 weights", time_step(diffusers_step(reference.to(torch.bfloat16)))))
    return results


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        raise ValueError("--layers, --prompt-tokens: at least 1; --new-tokens: at least 2")
    if args.res % 64:
        raise ValueError(f"--res: expected a multiple of 64, got {args.res}")
    dtype = _DTYPES[args.dtype]
    print(f"MGIE: LLaVA-7B layer shapes x {args.layers} layers (32-layer columns projected), prompt {args.prompt_tokens} "
          f"tokens, {args.new_tokens} decoded; {torch.get_num_threads()} threads, {ops.selected_name('cpu')} backend; "
          f"median of {args.repeats}")
    with torch.inference_mode():
        mllm = _mllm_rows(args, dtype)
    rows = [[name, *(f"{v:.3g}" for v in values)] for name, values in mllm]
    print(format_table(["MLLM", "prefill tok/s", "decode tok/s", "prefill tok/s @32L", "decode tok/s @32L"], rows))
    if not args.skip_diffusion:
        with torch.no_grad():  # not inference_mode: the UNet's weights made in it would be packed again on every call
            steps = _diffusion_rows(args, dtype)
        fast = steps[0][1]
        print()
        print(format_table([f"diffusion step {args.res}x{args.res}, 3-way guidance", "s / step", "fastdiff speedup"],
                           [[name, f"{s:.2f}", "-" if i == 0 else f"{s / fast:.2f}x"] for i, (name, s) in enumerate(steps)]))
    return 0

"""fastdiff.Engine: step-level batching gives each request the image it gets alone, requests join
mid-flight, failures stay with their request, and nothing deadlocks. Runs on the embedded small
default models (untrained, 32-128 px), so the whole file takes seconds.

Batched vs alone: every UNet layer treats batch rows independently and each request draws from
its own generator, so results agree to fp32 rounding. They are not bit-identical: MKL's GEMMs
block differently for different row counts (the first divergence is the time-embedding MLP, 3
rows vs 20, ~2e-7), which leaves ~1e-6 in the pixels; BATCH_INVARIANCE allows 100x that.
"""
import contextlib
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
import torch

from fastdiff.default_model import default_pipeline
from fastdiff.engine import Engine, EngineClosed
from fastdiff.requests import EditRequest, PipelineError

BATCH_INVARIANCE = 1e-4  # max |pixel diff| in [0, 1] (2/255 = 7.8e-3 would be one 8-bit level)
TIMEOUT_S = 120  # no future may take this long: a hang fails instead of blocking the suite


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def editor():
    return default_pipeline("edit", "small")


@pytest.fixture(scope="module")
def generator():
    return default_pipeline("generate", "small")


def image(side=32, seed=0, width=None):
    return np.random.default_rng(seed).random((side, width or side, 3))


@contextlib.contextmanager
def unet_calls(pipe, on_call=None):
    """Records the batch size (rows) of every UNet call while the block runs."""
    sizes = []

    def hook(module, args):
        sizes.append(args[0].shape[0])
        if on_call is not None:
            on_call(args)

    handle = pipe.unet.register_forward_pre_hook(hook)
    try:
        yield sizes
    finally:
        handle.remove()


def max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


EDITS = [  # 8 edits of various settings: sizes, steps, samplers, scales, seeds, text or embeddings
    dict(image=image(32, 0), instruction="make it snowy", steps=3, seed=0),
    dict(image=image(32, 1), instruction="add a hat", steps=5, seed=1, sampler="euler", guidance_scale=4.0),
    dict(image=image(32, 2), instruction="night", steps=2, seed=2, sampler="ddim", image_guidance_scale=1.2),
    dict(image=image(32, 3), instruction="make it red", steps=4, seed=3, sampler="dpmpp_2m", guidance_scale=1.0),
    dict(image=image(16, 4, width=40), instruction="snow", steps=3, seed=4),  # its own latent size: its own call
    dict(image=image(32, 5), instruction_embeds=torch.randn(77, 32, generator=torch.Generator().manual_seed(5)), steps=4, seed=5),
    dict(image=image(32, 6), instruction="make it snowy", steps=6, seed=6, guidance_scale=9.0, image_guidance_scale=2.0),
    dict(image=image(32, 0), instruction="make it snowy", steps=3, seed=7, sampler="euler_ancestral"),
]


def test_batched_edits_equal_alone(editor):
    # max_wait_ms: the worker starts when all 8 are queued (max_batch) however slowly they arrive
    with Engine(editor, max_batch=8, max_wait_ms=60_000) as engine, unet_calls(editor) as sizes:
        futures = [engine.submit_edit(output_type="np", **request) for request in EDITS]
        results = [f.result(timeout=TIMEOUT_S) for f in futures]
    batched_sizes = list(sizes)
    diffs = []
    for request, result in zip(EDITS, results):
        request = dict(request)
        alone = editor.edit(request.pop("image"), output_type="np", progress=False, **request)
        diffs.append(max_diff(result, alone))
    print(f"edits batched vs alone: max |diff| per request {['%.1e' % d for d in diffs]}; UNet rows per call {batched_sizes}")
    assert max(diffs) <= BATCH_INVARIANCE
    # 7 requests of one latent size shared calls: 6 guided (3 rows) + 1 unguided (1 row) = 19 rows at first
    assert batched_sizes[:2] == [19, 3]
    assert sum(batched_sizes) == sum((1 if r.get("guidance_scale") == 1.0 else 3) * r["steps"] for r in EDITS)


GENERATIONS = [  # the small MobileDiffusion: one-step x0 by default, plus multi-step samplers with guidance
    dict(prompt="a cat", seed=0),
    dict(prompt="a dog", seed=1, steps=3, sampler="euler", guidance_scale=3.0),
    dict(prompt="a red car", seed=2, steps=2, sampler="dpmpp_2m", guidance_scale=5.0, negative_prompt="blurry"),
    dict(prompt="a tree", seed=3, steps=4, sampler="ddim"),
    # 20-token embeddings (and their negative): rows of another context length, so a UNet call of their own
    dict(prompt_embeds=torch.randn(20, 32, generator=torch.Generator().manual_seed(4)), seed=4, steps=2, sampler="euler_ancestral",
         guidance_scale=2.0, negative_prompt_embeds=torch.zeros(20, 32)),
    dict(prompt="a cat", seed=5, steps=3, sampler="euler_ancestral", guidance_scale=7.5, height=64, width=96),
    dict(prompt="a house", seed=6, height=64, width=64),
    dict(prompt="a cat", seed=7, steps=2, sampler="euler", guidance_scale=1.0),
]


def test_batched_generations_equal_alone(generator):
    with Engine(generator, max_batch=8, max_wait_ms=60_000) as engine:
        futures = [engine.submit_generate(output_type="np", **request) for request in GENERATIONS]
        results = [f.result(timeout=TIMEOUT_S) for f in futures]
    diffs = []
    for request, result in zip(GENERATIONS, results):
        request = dict(request)
        alone = generator.generate(request.pop("prompt", None), output_type="np", progress=False, **request)[0]
        diffs.append(max_diff(result, alone))
    print(f"generations batched vs alone: max |diff| per request {['%.1e' % d for d in diffs]}")
    assert max(diffs) <= BATCH_INVARIANCE
    assert results[5].shape == (64, 96, 3) and results[0].shape == (128, 128, 3)


def test_request_joins_mid_flight(editor):
    """A request submitted while another runs joins it at the next step (one UNet call carries
    both) and finishes first: it does not wait for the long one."""
    started, gate = threading.Event(), threading.Event()
    finished = []

    def hold_first_call(args):
        started.set()
        gate.wait(TIMEOUT_S)

    long_request = dict(image=image(32, 1), instruction="snow", steps=12, seed=1)
    short_request = dict(image=image(32, 2), instruction="night", steps=2, seed=2)
    with Engine(editor, max_batch=8, max_wait_ms=0) as engine, unet_calls(editor, hold_first_call) as sizes:
        first = engine.submit_edit(output_type="np", **long_request)
        first.add_done_callback(lambda _: finished.append("long"))
        assert started.wait(TIMEOUT_S)  # the long request's first UNet call has begun (and waits for the gate)
        second = engine.submit_edit(output_type="np", **short_request)
        second.add_done_callback(lambda _: finished.append("short"))
        gate.set()
        results = first.result(timeout=TIMEOUT_S), second.result(timeout=TIMEOUT_S)
    print(f"mid-flight join: UNet rows per call {sizes}, finished {finished}")
    # the long one alone, then both (3 + 3 rows) in one call for the short one's 2 steps, then the long one alone
    assert sizes == [3, 6, 6] + [3] * 9
    assert finished == ["short", "long"]
    for request, result in zip((long_request, short_request), results):
        request = dict(request)
        assert max_diff(result, editor.edit(request.pop("image"), output_type="np", progress=False, **request)) <= BATCH_INVARIANCE


def test_bad_requests_are_refused_at_submit(editor, tmp_path):
    """The pipeline's own checks run in submit(): a bad request raises there, naming its argument,
    and is never queued; the good requests around it are untouched."""
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = [dict(image=image(32, i), instruction="snow", steps=2, seed=i) for i in range(3)]
    bad = {
        "image": dict(image=tmp_path / "broken.png", instruction="snow", steps=2),
        "steps": dict(image=image(32), instruction="snow", steps=-1),
        "instruction_embeds": dict(image=image(32), instruction_embeds=torch.randn(77, 17), steps=2),
        "guidance_scale": dict(image=image(32), instruction="snow", guidance_scale="x", steps=2),
        "sampler": dict(image=image(32), instruction="snow", sampler="plms", steps=2),
        "stepz": dict(image=image(32), instruction="snow", stepz=2),
    }
    with Engine(editor, max_batch=8, max_wait_ms=100) as engine:
        good_futures = [engine.submit_edit(output_type="np", **r) for r in good[:2]]
        for name, request in bad.items():
            with pytest.raises(PipelineError, match=f"^{name}:"):
                engine.submit_edit(**request)
        good_futures.append(engine.submit_edit(output_type="np", **good[2]))
        results = [f.result(timeout=TIMEOUT_S) for f in good_futures]
    for request, result in zip(good, results):
        request = dict(request)
        assert max_diff(result, editor.edit(request.pop("image"), output_type="np", progress=False, **request)) <= BATCH_INVARIANCE


def test_submit_takes_request_values(editor):
    request = EditRequest(image=image(32), instruction="snow", steps=2, seed=3, output_type="np")
    with Engine(editor) as engine:
        result = engine.submit(request).result(timeout=TIMEOUT_S)
        with pytest.raises(TypeError, match="^request:"):
            engine.submit({"image": image(32)})
    assert max_diff(result, editor.run(request, progress=False)[0]) <= BATCH_INVARIANCE


def test_each_request_is_resolved_once(editor, generator, resolve_calls):
    """generate/edit, fastdiff.generate and Engine.submit resolve a request once (Pipeline.resolve);
    prepare and the engine's worker take the Resolved without checking it again."""
    import fastdiff

    generator.generate("a cat", height=32, width=32, steps=1, progress=False)
    editor.edit(image(32), "snow", steps=1, progress=False)
    fastdiff.generate("a cat", model="small", height=32, width=32, steps=1, progress=False)
    assert [type(r).__name__ for r in resolve_calls] == ["GenerateRequest", "EditRequest", "GenerateRequest"]
    resolve_calls.clear()
    with Engine(editor, max_wait_ms=0) as engine:
        engine.submit(EditRequest(image=image(32), instruction="snow", steps=1)).result(timeout=TIMEOUT_S)
        engine.submit_edit(image(32), "snow", steps=1).result(timeout=TIMEOUT_S)
        resolved = editor.resolve(EditRequest(image=image(32), instruction="snow", steps=1))
        engine.submit(resolved).result(timeout=TIMEOUT_S)
    assert len(resolve_calls) == 3  # the third by the caller, none by the engine
    with Engine(generator) as engine, pytest.raises(TypeError, match="^request: resolved by another pipeline"):
        engine.submit(resolved)
    with Engine(editor, max_pixels=16 * 16) as engine, pytest.raises(PipelineError, match=r"^image: 1,024 pixels, over"):
        engine.submit(resolved)  # resolved under the pipeline's limit: the engine's own still holds
    with pytest.raises(TypeError, match="^resolved: expected what this pipeline's resolve"):
        editor.prepare(EditRequest(image=image(32), instruction="snow", steps=1))


def test_pixel_limit_refused_at_submit_before_any_work(editor):
    """max_pixels on the engine: a request over it raises in submit() and the UNet never runs."""
    with unet_calls(editor) as calls, Engine(editor, max_pixels=32 * 32) as engine:
        with pytest.raises(PipelineError, match=r"^image: 48x48 \(2,304 pixels\), over the limit of 1,024 \(max_pixels\)"):
            engine.submit_edit(image(48), "snow", steps=1)
        assert engine.submit_edit(image(32), "snow", steps=1).result(timeout=TIMEOUT_S).size == (32, 32)
    assert calls == [3]  # the one good request, three guidance rows
    with pytest.raises(PipelineError, match="^max_pixels:"):
        Engine(editor, max_pixels=0)


def test_failing_unet_call_fails_only_its_request(editor):
    """A request that makes the shared UNet call raise is found by re-running the requests one by
    one; only it fails, the others' steps are exact (nothing was advanced before the retry)."""
    poison = torch.full((77, 32), 1234.5)

    def explode_on_poison(args):
        if (args[2] == 1234.5).any():
            raise RuntimeError("UNet: poisoned context")

    requests = [dict(image=image(32, i), instruction="snow", steps=3, seed=i) for i in range(3)]
    with Engine(editor, max_batch=8, max_wait_ms=100) as engine, unet_calls(editor, explode_on_poison):
        futures = [engine.submit_edit(output_type="np", **r) for r in requests[:2]]
        poisoned = engine.submit_edit(image(32), instruction_embeds=poison, steps=3)
        futures.append(engine.submit_edit(output_type="np", **requests[2]))
        with pytest.raises(RuntimeError, match="poisoned context"):
            poisoned.result(timeout=TIMEOUT_S)
        results = [f.result(timeout=TIMEOUT_S) for f in futures]
    for request, result in zip(requests, results):
        request = dict(request)
        assert max_diff(result, editor.edit(request.pop("image"), output_type="np", progress=False, **request)) <= BATCH_INVARIANCE


def test_generate_takes_one_image_per_request(generator):
    with Engine(generator) as engine:
        with pytest.raises(PipelineError, match="^num_images:"):
            engine.submit_generate("a cat", num_images=2)
        assert engine.submit_generate("a cat", seed=1).result(timeout=TIMEOUT_S).size == (128, 128)


def test_many_mixed_requests_from_threads_no_deadlock(editor):
    """200 requests (48 of them bad, refused by submit) from 4 threads, then close(): every future resolves."""
    engine = Engine(editor, max_batch=8, max_wait_ms=1)
    futures = [[] for _ in range(4)]
    refused = [[] for _ in range(4)]

    def client(index):
        rng = np.random.default_rng(index)
        for i in range(50):
            kind = i % 4
            if kind == 3:  # bad: alternately a bad number and a bad embedding, refused by submit
                args = dict(steps=0) if i % 8 == 3 else dict(instruction=None, instruction_embeds=torch.randn(5, 7))
                try:
                    engine.submit_edit(image(32, i), **{"instruction": "snow", **args})
                except PipelineError as exc:
                    refused[index].append(exc)
            else:
                futures[index].append((True, engine.submit_edit(image(32, i), "snow", steps=int(rng.integers(1, 3)),
                                                                seed=i, guidance_scale=[7.5, 1.0, 3.0][kind])))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(TIMEOUT_S)
    assert not closer.is_alive(), "close() did not return: the engine hangs"
    elapsed = time.perf_counter() - start
    everything = [entry for per_thread in futures for entry in per_thread]
    assert len(everything) == 152 and sum(map(len, refused)) == 48 and all(f.done() for _, f in everything)
    for _, future in everything:
        assert future.result().size == (32, 32)
    print(f"200 mixed requests from 4 threads: {elapsed:.1f} s")
    with pytest.raises(EngineClosed):
        engine.submit_edit(image(32), "snow")
    engine.close()  # a second close is harmless


def test_close_cancel_queued(editor):
    """close(cancel_queued=True): the running request finishes, the queued ones are cancelled."""
    started, gate = threading.Event(), threading.Event()

    def hold_first_call(args):
        started.set()
        gate.wait(TIMEOUT_S)

    engine = Engine(editor, max_batch=1, max_wait_ms=0)
    with unet_calls(editor, hold_first_call):
        futures = [engine.submit_edit(image(32, i), "snow", steps=2, seed=i) for i in range(4)]
        assert started.wait(TIMEOUT_S)
        closer = threading.Thread(target=engine.close, kwargs=dict(cancel_queued=True))
        closer.start()
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:  # until close() has taken effect
            try:
                futures.append(engine.submit_edit(image(32), "snow", steps=2))
            except EngineClosed:
                break
            time.sleep(0.001)
        gate.set()
        closer.join(TIMEOUT_S)
    assert not closer.is_alive()
    assert futures[0].result(timeout=TIMEOUT_S).size == (32, 32)
    assert all(f.cancelled() for f in futures[1:])
    with pytest.raises(CancelledError):
        futures[1].result()


def test_context_manager_and_arguments(editor):
    with Engine(editor) as engine:
        future = engine.submit_edit(image(32), "snow", steps=1)
    assert future.done() and future.result().size == (32, 32)  # __exit__ waited for it
    with pytest.raises(EngineClosed):
        engine.submit_edit(image(32), "snow")
    with pytest.raises(ValueError, match="^max_batch:"):
        Engine(editor, max_batch=0)
    with pytest.raises(ValueError, match="^max_wait_ms:"):
        Engine(editor, max_wait_ms=-1)


def test_worker_uses_the_creating_threads_backend(editor, monkeypatch):
    from fastdiff import ops
    from fastdiff.ops import cpp, reference

    if ops.backends()["cpp"] != "available":
        pytest.skip("cpp backend not built")
    calls = {"cpp": 0, "reference": 0}
    for name, module in (("cpp", cpp), ("reference", reference)):
        original = module.group_norm

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "group_norm", counting)
    with ops.use_backend("reference"), Engine(editor) as engine:
        engine.submit_edit(image(32), "snow", steps=1).result(timeout=TIMEOUT_S)
    assert calls["reference"] > 0 and calls["cpp"] == 0


EXIT_WITH_BUSY_ENGINE = """
import time
import numpy as np
from fastdiff.default_model import default_pipeline
from fastdiff.engine import Engine
engine = Engine(default_pipeline("edit", "small"), max_batch=2)
futures = [engine.submit_edit(np.random.default_rng(i).random((64, 64, 3)), "snow", steps=50, seed=i) for i in range(6)]
while not futures[0].running():
    time.sleep(0.01)
print("exiting with work in flight", flush=True)
"""


def test_exit_with_a_busy_engine_is_clean(tmp_path):
    """A script that ends while the engine denoises: queued work is cancelled, the running batch
    abandoned at a step boundary, and the process exits 0 (a worker left inside a kernel at
    interpreter teardown aborted it: 'terminate called without an active exception', exit 134)."""
    script = tmp_path / "busy.py"
    script.write_text(EXIT_WITH_BUSY_ENGINE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert "exiting with work in flight" in done.stdout
    assert done.returncode == 0 and "terminate" not in done.stderr, done.stderr


def test_close_cancel_running(editor):
    """close(cancel_running=True): the running requests stop at the next step and fail with EngineClosed."""
    engine = Engine(editor, max_batch=2, max_wait_ms=0)
    with unet_calls(editor) as calls:
        futures = [engine.submit_edit(image(32, i), "snow", steps=500, seed=i) for i in range(3)]
        while not calls:
            time.sleep(0.01)
        engine.close(cancel_running=True)
    assert len(calls) < 500
    for future in futures:
        assert future.cancelled() or isinstance(future.exception(timeout=TIMEOUT_S), EngineClosed)


def test_callback_on_step_end_runs_in_the_engine_as_alone(editor):
    """diffusers' callback_on_step_end is called after every step of its own request, and a
    replacement of the latents takes effect, in the engine as in pipe.run."""
    seen = {"engine": [], "alone": []}

    def damp(where):
        def callback(pipe, step, timestep, kwargs):
            seen[where].append(step)
            return {"latents": kwargs["latents"] * 0.5} if step == 0 else None
        return callback

    args = dict(image=image(32), instruction="snow", steps=3, seed=2, output_type="np")
    with Engine(editor, max_batch=4) as engine:
        others = [engine.submit_edit(image(32, i), "night", steps=4, seed=i) for i in range(2)]
        result = engine.submit(EditRequest(callback_on_step_end=damp("engine"), **args)).result(timeout=TIMEOUT_S)
        [f.result(timeout=TIMEOUT_S) for f in others]
    alone = editor.run(EditRequest(callback_on_step_end=damp("alone"), **args), progress=False)[0]
    plain = editor.run(EditRequest(**args), progress=False)[0]
    assert seen["engine"] == seen["alone"] == [0, 1, 2]
    assert max_diff(result, alone) <= BATCH_INVARIANCE and max_diff(alone, plain) > 10 * BATCH_INVARIANCE

"""fastdiff.serving, one process: real servers on 127.0.0.1 (a `fastdiff serve` process, or uvicorn
in a thread over this process's pipelines), the embedded small models, bounded loops.

Images equal to the pipeline's alone: the engine batches rows that the pipeline runs alone, which
moves pixels by ~1e-6 (see test_engine.py); after 8-bit PNG encoding that is at most one level.
"""
import base64
import json
import os
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from fastdiff.cli import main as cli_main
from fastdiff.default_model import default_pipeline
from fastdiff.engine import Engine
from fastdiff.serving import Limits, create_app
from serving_util import bomb_png, decode_png, metric, png_bytes, serve_in_thread, serve_process

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 120  # per HTTP request: a hang fails the test instead of blocking the suite
MAX_BODY = 1_000_000

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served():
    """The CLI's server: API key from the environment, small limits to hit; shared by this module
    (its last test stops it with SIGTERM: one server start-up less)."""
    def build_references_meanwhile():
        default_pipeline("generate", "small"), default_pipeline("edit", "small")

    with serve_process("--max-batch", "8", "--max-queue", "32", "--max-steps", "50", "--drain-timeout", "60",
                       "--max-body-bytes", str(MAX_BODY), env={"FASTDIFF_API_KEY": KEY},
                       while_starting=build_references_meanwhile) as (url, proc):
        yield url, proc


@pytest.fixture
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def pipes():
    return default_pipeline("generate", "small"), default_pipeline("edit", "small")  # cached: built once


def source_image(seed: int, side: int = 32) -> np.ndarray:
    return (np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- the load test: good and bad requests together ------------------------------------------------

GOOD = [("generate", dict(prompt="a red bicycle", seed=s, height=64, width=64)) for s in range(3)] \
    + [("generate", dict(prompt="a cat", seed=s, height=64, width=64, steps=2, sampler="euler", guidance_scale=3.0))
       for s in range(3)] \
    + [("edit", dict(image=s, instruction="make it snowy", steps=3, seed=s)) for s in range(3)] \
    + [("edit", dict(image=s, instruction="add a hat", steps=2, seed=10 + s, image_guidance_scale=1.2)) for s in range(3)]


def good_request(client, kind, spec, index):
    """Alternates the transports: JSON with base64 or multipart for edits, PNG or JSON responses."""
    spec = dict(spec)
    as_json = index % 2 == 0
    if kind == "generate":
        response = client.post("/v1/generate", json={**spec, "response_format": "json" if as_json else "png"})
    elif as_json:
        spec["image"] = b64(png_bytes(source_image(spec["image"])))
        response = client.post("/v1/edit", json=spec, headers={"Accept": "application/json"})
    else:
        image = png_bytes(source_image(spec.pop("image")))
        response = client.post("/v1/edit", files={"image": ("in.png", image, "image/png")},
                               data={k: str(v) for k, v in spec.items()})
    if response.status_code != 200:
        return response.status_code, response.text
    data = base64.b64decode(response.json()["image"]) if response.headers["content-type"].startswith(
        "application/json") else response.content
    return 200, decode_png(data)


BAD = [  # (name, how to send it, expected status, field named in the JSON error)
    ("missing prompt", lambda c, bomb: c.post("/v1/generate", json={"seed": 1}), 422, "prompt"),
    ("prompt of the wrong type", lambda c, bomb: c.post("/v1/generate", json={"prompt": 5}), 422, "prompt"),
    ("a list of prompts", lambda c, bomb: c.post("/v1/generate", json={"prompt": ["a", "b"]}), 422, "prompt"),
    ("steps as text", lambda c, bomb: c.post("/v1/generate", json={"prompt": "x", "steps": "ten"}), 422, "steps"),
    ("steps 0", lambda c, bomb: c.post("/v1/generate", json={"prompt": "x", "steps": 0}), 422, "steps"),
    ("steps 10^6", lambda c, bomb: c.post("/v1/generate", json={"prompt": "x", "steps": 10**6}), 422, "steps"),
    ("huge size", lambda c, bomb: c.post("/v1/generate", json={"prompt": "x", "height": 10**5, "width": 10**5}),
     422, "height, width"),
    ("unknown field", lambda c, bomb: c.post("/v1/generate", json={"prompt": "x", "latents": [1]}), 422, "latents"),
    ("garbage image bytes", lambda c, bomb: c.post("/v1/edit", files={"image": ("x.png", os.urandom(2000))},
                                                   data={"instruction": "x"}), 422, "image"),
    ("decompression bomb", lambda c, bomb: c.post("/v1/edit", files={"image": ("bomb.png", bomb)},
                                                  data={"instruction": "x"}), 422, "image"),
    ("edit without image", lambda c, bomb: c.post("/v1/edit", json={"instruction": "x"}), 422, "image"),
    ("bad base64", lambda c, bomb: c.post("/v1/edit", json={"image": "%%%", "instruction": "x"}), 422, "image"),
    ("not JSON", lambda c, bomb: c.post("/v1/generate", content=b"{prompt", headers={"Content-Type": "application/json"}),
     400, "body"),
    ("JSON nested 100k deep", lambda c, bomb: c.post("/v1/generate", content=b"[" * 100_000 + b"]" * 100_000,
                                                     headers={"Content-Type": "application/json"}), 400, "body"),
    ("an integer of 5000 digits", lambda c, bomb: c.post("/v1/generate", content=b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
                                                         headers={"Content-Type": "application/json"}), 400, "body"),
    ("wrong API key", lambda c, bomb: c.post("/v1/generate", json={"prompt": "x"},
                                             headers={"Authorization": "Bearer wrong"}), 401, "authorization"),
    ("oversize body", lambda c, bomb: c.post("/v1/generate", json={"prompt": "x" * (MAX_BODY + 1)}), 413, "body"),
]


def test_load_good_and_bad_requests_together(server, pipes, capsys):
    """200 requests from 16 concurrent clients: every one answered; the good ones with the image
    pipe.generate/edit gives alone; the bad ones each a 4xx JSON error naming the field."""
    generator, editor = pipes
    expected = {}
    for i, (kind, spec) in enumerate(GOOD):
        spec = dict(spec)
        if kind == "generate":
            image = generator.generate(progress=False, **spec)[0]
        else:
            image = editor.edit(source_image(spec.pop("image")), progress=False, **spec)
        expected[i] = np.asarray(image, dtype=np.int16)
    bomb = bomb_png()
    rng = np.random.default_rng(0)
    work = [("good", i % len(GOOD)) for i in range(160)] + [("bad", i % len(BAD)) for i in range(40)]
    work = [work[i] for i in rng.permutation(len(work))]
    results, lock = {}, threading.Lock()
    before = httpx.get(f"{server}/metrics", headers=AUTH).text

    def client():
        with httpx.Client(base_url=server, headers=AUTH, timeout=TIMEOUT_S) as c:
            while True:
                with lock:
                    if not work:
                        return
                    n = len(work)
                    what, i = work.pop()
                t0 = time.perf_counter()
                try:
                    if what == "good":
                        outcome = good_request(c, *GOOD[i], n)
                    else:
                        response = BAD[i][1](c, bomb)
                        outcome = response.status_code, response.json()
                except Exception as exc:  # recorded: every request must be answered
                    outcome = "no answer", repr(exc)
                results[n] = (what, i, outcome, time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 3)
    assert len(results) == 200, f"{200 - len(results)} requests unanswered"
    latencies = []
    for what, i, (status, body), seconds in results.values():
        if what == "good":
            assert status == 200, (GOOD[i], body)
            assert body.shape == expected[i].shape and np.abs(body - expected[i]).max() <= 1, GOOD[i]
            latencies.append(seconds)
        else:
            name, _, status_expected, field = BAD[i]
            assert status == status_expected and body["field"] == field, (name, status, body)
            assert "Traceback" not in json.dumps(body)
    after = httpx.get(f"{server}/metrics", headers=AUTH).text
    delta = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    ok = delta("fastdiff_requests_total", endpoint="generate", outcome="ok") + \
        delta("fastdiff_requests_total", endpoint="edit", outcome="ok")
    assert ok == 160
    invalid = sum(1 for what, i, outcome, _ in results.values() if what == "bad" and BAD[i][2] in (400, 422))
    assert delta("fastdiff_requests_total", endpoint="generate", outcome="invalid") + \
        delta("fastdiff_requests_total", endpoint="edit", outcome="invalid") == invalid  # refusals are counted too
    assert delta("fastdiff_unet_step_seconds_count", model="edit") > 0
    assert metric(after, "fastdiff_queue_depth", model="edit") == 0
    with capsys.disabled():
        print(f"\nserving load: 160 good requests, p50 {np.percentile(latencies, 50):.2f} s, "
              f"p95 {np.percentile(latencies, 95):.2f} s (16 clients, 40 bad requests among them)")


def test_auth_everywhere_but_healthz(server):
    assert httpx.get(f"{server}/healthz").status_code == 200
    head = httpx.head(f"{server}/healthz")
    assert head.status_code == 200 and head.content == b""
    for method, path in (("GET", "/metrics"), ("POST", "/v1/generate"), ("POST", "/v1/edit"), ("GET", "/nowhere")):
        response = httpx.request(method, f"{server}{path}", json={"prompt": "x"})
        assert response.status_code == 401 and response.json()["field"] == "authorization", path
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    assert httpx.get(f"{server}/metrics", headers=AUTH).status_code == 200


def test_client_disconnect_cancels_its_request(server):
    """A 50-step edit whose client hangs up after it starts: the engine stops it within a step or
    two (its UNet calls stop), instead of running the other ~45 steps for nobody."""
    metrics = lambda: httpx.get(f"{server}/metrics", headers=AUTH).text  # noqa: E731
    body = json.dumps({"image": b64(png_bytes(source_image(0, 128))), "instruction": "snow", "steps": 50}).encode()
    head = (f"POST /v1/edit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    calls_before = metric(metrics(), "fastdiff_unet_step_seconds_count", model="edit")
    sock = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])))
    sock.sendall(head + body)
    deadline = time.monotonic() + 60
    while metric(metrics(), "fastdiff_unet_step_seconds_count", model="edit") < calls_before + 3:
        assert time.monotonic() < deadline, "the edit never started"
        time.sleep(0.05)
    sock.close()
    at_disconnect = metric(metrics(), "fastdiff_unet_step_seconds_count", model="edit")
    deadline = time.monotonic() + 30
    while metric(text := metrics(), "fastdiff_running_batch_size", model="edit") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    done = metric(metrics(), "fastdiff_unet_step_seconds_count", model="edit")
    assert done - at_disconnect <= 3, f"{done - at_disconnect} UNet calls after the client left"
    assert done - calls_before < 50
    assert metric(text, "fastdiff_requests_total", endpoint="edit", outcome="cancelled") >= 1


def test_queue_limit_refuses_with_retry_after(pipes):
    """An embedded app over a caller's Engine: one request running, no queue: the next gets 429."""
    _, editor = pipes
    engine = Engine(editor, max_batch=1, max_wait_ms=0)
    app = create_app(engine, limits=Limits(max_queue=0, retry_after_s=2))
    request = {"image": b64(png_bytes(source_image(1, 64))), "instruction": "x", "steps": 40, "seed": 0}
    first = {}
    with serve_in_thread(app) as url:
        sender = threading.Thread(target=lambda: first.update(r=httpx.post(f"{url}/v1/edit", json=request,
                                                                             timeout=TIMEOUT_S)))
        sender.start()
        deadline = time.monotonic() + 60
        while engine.running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = httpx.post(f"{url}/v1/edit", json=request, timeout=TIMEOUT_S)
        sender.join(TIMEOUT_S)
        assert refused.status_code == 429 and refused.json()["field"] == "queue"
        assert refused.headers["retry-after"] == "2"
        assert first["r"].status_code == 200
        assert httpx.post(f"{url}/v1/generate", json={"prompt": "x"}).status_code == 404  # no text-to-image model
    assert engine.healthy  # the caller's engine outlives the app
    engine.close()


def test_quantized_service_reports_and_serves_int8():
    """`fastdiff serve --quantize int8`'s pipelines: int8 UNets, named in /healthz, answering."""
    from fastdiff.serving import load_pipelines

    pipes = load_pipelines("small", quantize="int8")
    assert [p.quantized for p in pipes] == ["int8", "int8"]
    app = create_app(pipes, max_wait_ms=0)
    with serve_in_thread(app) as url:
        health = httpx.get(f"{url}/healthz").json()
        assert health["quantized"] == {"generate": "int8", "edit": "int8"}
        made = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "height": 32, "width": 32, "steps": 1}, timeout=TIMEOUT_S)
        assert made.status_code == 200 and decode_png(made.content).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="quantize: expected None or one of"):
        load_pipelines("small", quantize="int4")


def test_cli_refuses_replicas_without_ray(capsys):
    assert cli_main(["serve", "--replicas", "2"]) == 1
    assert "--replicas/--autoscale: only with --ray" in capsys.readouterr().err


def test_sigterm_finishes_in_flight_refuses_new_exits_0(served):
    """Last in this module: it stops the module's server."""
    url, proc = served
    body = {"image": b64(png_bytes(source_image(2, 32))), "instruction": "x", "steps": 40}
    answers = []
    senders = [threading.Thread(target=lambda s=s: answers.append(
        httpx.post(f"{url}/v1/edit", json={**body, "seed": s}, headers=AUTH, timeout=TIMEOUT_S).status_code))
        for s in range(12)]  # more than --max-batch 8: some are still queued at the signal
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 60
    while True:  # all 12 in the engine, running or queued, when the signal comes
        text = httpx.get(f"{url}/metrics", headers=AUTH).text
        in_engine = metric(text, "fastdiff_running_batch_size", model="edit") + metric(text, "fastdiff_queue_depth",
                                                                                      model="edit")
        if in_engine == 12:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # draining: the socket stays open, health and new work answer 503 while the 12 finish
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 503
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "x"}, headers=AUTH, timeout=10).status_code == 503
    for sender in senders:
        sender.join(TIMEOUT_S)
    assert proc.wait(60) == 0
    assert answers == [200] * 12


def test_server_pixel_limit_holds_for_an_engine_passed_in(pipes):
    """Limits.max_pixels was ignored for a caller's Engine (only engines the app made got it)."""
    generator, editor = pipes
    engines = [Engine(generator, max_wait_ms=0), Engine(editor, max_wait_ms=0)]
    app = create_app(engines, limits=Limits(max_pixels=32 * 32))
    try:
        with serve_in_thread(app) as url:
            big = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "height": 64, "width": 64, "steps": 1}, timeout=TIMEOUT_S)
            assert big.status_code == 422 and "1,024 (max_pixels)" in big.json()["error"], big.text
            upload = {"image": b64(png_bytes(source_image(1, 64))), "instruction": "x", "steps": 1}
            edit = httpx.post(f"{url}/v1/edit", json=upload, timeout=TIMEOUT_S)
            assert edit.status_code == 422 and "(max_pixels)" in edit.json()["error"], edit.text
            small = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "height": 32, "width": 32, "steps": 1}, timeout=TIMEOUT_S)
            assert small.status_code == 200
    finally:
        for engine in engines:
            engine.close()


def test_a_disconnect_leaves_no_unretrieved_future_in_the_log(pipes, caplog):
    """Every client that hung up used to leave 'Future exception was never retrieved ... _Cancelled'
    in the log (asyncio's, when the wrapped future is collected)."""
    import gc
    import logging

    _, editor = pipes
    engine = Engine(editor, max_batch=1, max_wait_ms=0)
    body = json.dumps({"image": b64(png_bytes(source_image(0, 64))), "instruction": "snow", "steps": 60}).encode()
    try:
        with caplog.at_level(logging.ERROR), serve_in_thread(create_app(engine)) as url:
            for _ in range(2):
                head = (f"POST /v1/edit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
                sock.sendall(head + body)
                deadline = time.monotonic() + 60
                while engine.running == 0:
                    assert time.monotonic() < deadline, "the edit never started"
                    time.sleep(0.02)
                sock.close()
                while engine.running or engine.queued:
                    assert time.monotonic() < deadline, "the cancelled edit never ended"
                    time.sleep(0.02)
            time.sleep(0.5)
            gc.collect()
            assert httpx.get(f"{url}/healthz").status_code == 200
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text[-2000:]
    finally:
        engine.close()


def test_each_http_request_is_resolved_once(pipes, resolve_calls):
    """The server resolves a request once and hands the Resolved to the engine, which prepares it
    without resolving it again."""
    generator, editor = pipes
    with serve_in_thread(create_app([generator, editor], max_wait_ms=0)) as url:
        made = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "height": 32, "width": 32, "steps": 1},
                          timeout=TIMEOUT_S)
        edited = httpx.post(f"{url}/v1/edit", json={"image": b64(png_bytes(source_image(1))), "instruction": "x",
                                                    "steps": 1}, timeout=TIMEOUT_S)
        assert made.status_code == 200 and edited.status_code == 200, (made.text, edited.text)
        bad = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "height": 36, "steps": 1}, timeout=TIMEOUT_S)
        assert bad.status_code == 422 and bad.json()["field"] == "height", bad.text  # PipelineError.field
    assert [type(r).__name__ for r in resolve_calls] == ["GenerateRequest", "EditRequest", "GenerateRequest"]


def test_http_fields_come_from_the_request_dataclasses():
    """What a client may send, and as which JSON type: the request fields of int, float or str type
    (one image per request: num_images and output_type are the server's), with diffusers' aliases."""
    from fastdiff.serving.server import FIELDS

    shared = {"steps": int, "num_inference_steps": int, "guidance_scale": float, "seed": int, "sampler": str,
              "negative_prompt": str, "prompt": str, "cache_interval": int, "cache_depth": int}
    assert FIELDS["generate"] == {**shared, "height": int, "width": int}
    assert FIELDS["edit"] == {**shared, "image": str, "instruction": str, "image_guidance_scale": float}


def test_http_takes_the_step_cache_fields(pipes):
    """cache_interval and cache_depth over HTTP (JSON and multipart): the image the pipeline gives
    with them; bad values are a 422 naming the field."""
    generator, editor = pipes
    cached = dict(steps=4, sampler="euler", guidance_scale=3.0, seed=3, cache_interval=2, cache_depth=2)
    edit = dict(instruction="make it snowy", steps=4, seed=4, cache_interval=3, cache_depth=1)
    with serve_in_thread(create_app([generator, editor], max_wait_ms=0)) as url:
        made = httpx.post(f"{url}/v1/generate", json={"prompt": "a cat", "height": 64, "width": 64, **cached},
                          timeout=TIMEOUT_S)
        edited = httpx.post(f"{url}/v1/edit", files={"image": ("in.png", png_bytes(source_image(4)), "image/png")},
                            data={k: str(v) for k, v in edit.items()}, timeout=TIMEOUT_S)
        bad = [httpx.post(f"{url}/v1/generate", json={"prompt": "x", "steps": 2, "sampler": "euler", **body},
                          timeout=TIMEOUT_S) for body in ({"cache_interval": 0}, {"cache_depth": 9}, {"cache_interval": "often"})]
    assert made.status_code == 200 and edited.status_code == 200, (made.text, edited.text)
    alone = generator.generate("a cat", height=64, width=64, output_type="np", progress=False, **cached)[0]
    assert np.abs(decode_png(made.content).astype(int) - np.round(alone * 255)).max() <= 1
    alone = editor.edit(source_image(4), output_type="np", progress=False, **edit)
    assert np.abs(decode_png(edited.content).astype(int) - np.round(alone * 255)).max() <= 1
    assert not np.array_equal(alone, editor.edit(source_image(4), output_type="np", progress=False,
                                                 **{**edit, "cache_interval": 1}))  # the fields did something
    assert [(r.status_code, r.json()["field"]) for r in bad] == [(422, "cache_interval"), (422, "cache_depth"),
                                                                 (422, "cache_interval")]

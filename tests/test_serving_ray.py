"""fastdiff.serving on Ray Serve: one module-scoped local cluster (2 CPUs, no dashboard) with two
replicas of the small embedded models, one thread each. Ray's start-up is most of the time."""
import base64
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray  # the serve extra, which `make test` installs: missing, these tests fail rather than skip
from ray import serve

from fastdiff.default_model import default_pipeline
from fastdiff.serving.ray_serve import PROXY_CALLBACK, PROXY_CALLBACK_ENV, FastdiffServer, ServeArgs, build
from serving_util import decode_png, free_port, png_bytes, wait_healthy

TIMEOUT_S = 60  # per HTTP request: the fault test's bound on "nothing hangs"
CONFIG = Path(__file__).parent.parent / "examples" / "serve_config.yaml"
APP = "fastdiff"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cluster():
    previous = os.environ.get(PROXY_CALLBACK_ENV)
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK  # the proxy (started below) inherits it
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # half a CPU each: a replacement replica can start while its dead predecessor is reaped
        serve.run(build(ServeArgs(model="small", threads=1, max_batch=4), replicas=2, num_cpus=0.5),
                  name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        if previous is None:
            del os.environ[PROXY_CALLBACK_ENV]
        else:
            os.environ[PROXY_CALLBACK_ENV] = previous


def replica_names() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#"))


def edit_body(seed):
    image = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)
    return image, {"image": base64.b64encode(png_bytes(image)).decode(), "instruction": "snow", "steps": 3, "seed": seed}


def test_ray_replicas_give_the_pipeline_images(cluster):
    generator, editor = default_pipeline("generate", "small"), default_pipeline("edit", "small")
    expected, results = {}, {}
    for i in range(8):  # in this thread: a pipeline is not for concurrent use
        if i % 2:
            image, body = edit_body(i)
            expected[i] = editor.edit(image, progress=False, **{k: v for k, v in body.items() if k != "image"})
        else:
            expected[i] = generator.generate("a cat", seed=i, height=64, width=64, progress=False)[0]

    def send(i):
        if i % 2:
            response = httpx.post(f"{cluster}/v1/edit", json=edit_body(i)[1], timeout=TIMEOUT_S)
        else:
            response = httpx.post(f"{cluster}/v1/generate", json={"prompt": "a cat", "seed": i, "height": 64, "width": 64},
                                  timeout=TIMEOUT_S)
        results[i] = response.status_code, response.content

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 2)
    assert len(results) == 8
    for i, (status, content) in results.items():
        assert status == 200
        assert np.abs(decode_png(content) - np.asarray(expected[i], dtype=np.int16)).max() <= 1
    bad = httpx.post(f"{cluster}/v1/generate", json={"prompt": "x", "steps": 10**6}, timeout=TIMEOUT_S)
    assert bad.status_code == 422 and bad.json()["field"] == "steps"


def test_ray_replaces_a_killed_replica_and_answers_every_request(cluster, capsys):
    """8 clients send 48 requests; one replica's process is SIGKILLed after the first few answers:
    every request gets 200 or 503 within its timeout, and Ray starts a replacement."""
    before = replica_names()
    assert len(before) == 2
    victim = ray.get_actor(before[0], namespace="serve")
    pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()))
    answers, lock, killed = [], threading.Lock(), threading.Event()
    todo = list(range(48))

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            _, body = edit_body(i)
            try:
                response = httpx.post(f"{cluster}/v1/edit", json=body, timeout=TIMEOUT_S)
                status = response.status_code if response.status_code in (200, 503) else (response.status_code, response.text)
            except httpx.TransportError as exc:
                status = repr(exc)
            with lock:
                answers.append(status)
                if len(answers) == 6:
                    os.kill(pid, signal.SIGKILL)
                    killed.set()

    threads = [threading.Thread(target=client) for _ in range(8)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 7)  # 48 requests / 8 clients, each bounded by TIMEOUT_S
    assert killed.is_set() and len(answers) == 48
    assert all(status in (200, 503) for status in answers), sorted(map(str, answers))
    assert answers.count(200) >= 24  # the surviving replica kept serving
    deadline = time.monotonic() + 120
    while not (len(names := replica_names()) == 2 and before[0] not in names
               and httpx.get(f"{cluster}/healthz", timeout=TIMEOUT_S).status_code == 200):
        assert time.monotonic() < deadline, f"no replacement replica: {names}"
        time.sleep(0.5)
    with capsys.disabled():
        print(f"\nray fault test: {answers.count(200)} ok, {answers.count(503)} 503 in {time.monotonic() - start:.1f} s")


def test_config_file_builds_the_application():
    """examples/serve_config.yaml (the README's) is a valid Serve config whose import path and
    args build the application, as `serve run` does before deploying it."""
    import yaml
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (spec,) = config.applications
    application = call_user_app_builder_with_args_if_necessary(import_attr(spec.import_path), spec.args)
    assert isinstance(application, serve.Application)
    assert spec.deployments[0].name == FastdiffServer.name
    with pytest.raises(ValueError, match="modle"):  # an arg ServeArgs does not know is refused by name
        call_user_app_builder_with_args_if_necessary(import_attr(spec.import_path), {"modle": "small"})
    with pytest.raises(ValueError, match="quantize"):  # int8 or nothing
        ServeArgs(quantize="int4")
    assert ServeArgs(quantize="int8").quantize == "int8"

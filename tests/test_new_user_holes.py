"""Holes a new user found (issue 19, part 4), each closed with a clear error naming the argument."""
import json
import subprocess
import sys

import pytest

from fastdiff.default_model import WEIGHTS
from fastdiff.engine import Engine
from fastdiff.pipeline import Pipeline
from fastdiff.requests import PipelineError


@pytest.mark.parametrize("device, expected", [
    ("banana", "device: expected a device such as 'cpu', 'cuda' or 'cuda:1', got 'banana'"),
    ("meta", "device: 'meta' tensors hold no data"),
    (42, "device: expected a torch.device or a name such as 'cpu' or 'cuda', got"),
])
def test_a_device_that_cannot_hold_weights_is_refused_at_load(device, expected):
    with pytest.raises(PipelineError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        Pipeline.from_pretrained(WEIGHTS / "generate", device=device)


def test_engine_of_something_else_than_a_pipeline():
    with pytest.raises(TypeError, match="^pipe: expected a fastdiff.Pipeline, got str$"):
        Engine("str")


def test_first_calls_from_three_threads_build_one_pipeline_and_all_succeed():
    """In a fresh interpreter (nothing imported or cached yet), three threads call
    fastdiff.generate at the same moment: one pipeline is built, every call succeeds, and each
    image is the one a lone call gives."""
    code = """
import json, threading
import numpy as np
import fastdiff
from fastdiff.pipeline import Pipeline
built = []
init = Pipeline.__init__
def counting_init(self, *args, **kwargs):
    built.append(kwargs.get("name"))
    init(self, *args, **kwargs)
Pipeline.__init__ = counting_init
barrier, images, errors = threading.Barrier(3), {}, []
def call(i):
    barrier.wait()
    try:
        images[i] = np.asarray(fastdiff.generate("a big red circle at the top left on a white background", seed=i, steps=2))
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
[t.start() for t in threads]; [t.join(300) for t in threads]
alone = [np.asarray(fastdiff.generate("a big red circle at the top left on a white background", seed=i, steps=2)) for i in range(3)]
print(json.dumps({"built": built, "errors": errors, "same": [bool(np.array_equal(images.get(i), alone[i])) for i in range(3)]}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["errors"] == [] and len(report["built"]) == 1 and report["same"] == [True] * 3, report


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_is_scaled_as_a_viewer_shows_it(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) read as a file, as bytes (an upload) or as an opened
    image: mid-gray stays mid-gray (it used to come out almost white, every value over 255 clipped)."""
    import numpy as np
    from PIL import Image

    from fastdiff.images import load_image
    from fastdiff.serving.server import decode_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    sixteen = Image.fromarray(ramp)  # uint16: mode I;16
    sixteen.save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode in ("I;16", "I")
    expected = np.round(ramp / 257).astype(np.int16)
    for got in (load_image(tmp_path / "gray16.png"), load_image(Image.open(tmp_path / "gray16.png")),
                load_image(_png_bytes(sixteen)), decode_image((tmp_path / "gray16.png").read_bytes(), 10**6)):
        array = np.asarray(got, dtype=np.int16)
        assert got.mode == "RGB" and np.abs(array[..., 0] - expected).max() <= 1
        assert 120 <= array.mean() <= 135


def test_a_float_array_outside_0_1_is_refused_not_clipped_to_white():
    import numpy as np

    from fastdiff.images import load_image

    values = np.random.default_rng(0).uniform(0, 255, (16, 16, 3))
    with pytest.raises(PipelineError, match=r"^image: a float array must hold values in \[0, 1\], got [\d.e-]+\.\.25\d\.\d+ "
                                            r"\(for 0\.\.255 values pass a uint8 array, or divide by 255\)"):
        load_image(values)
    assert np.asarray(load_image(values / 255)).mean() == pytest.approx(values.mean(), abs=1)
    load_image(np.clip(values / 255, 0, 1) * (1 + 1e-4))  # a resampler's overshoot is clipped


@pytest.mark.parametrize("name", ["guidance_scale", "image_guidance_scale"])
def test_guidance_scales_are_bounded_at_the_door(name):
    """guidance_scale=1e30 returned a flat gray image with status 200 (latents finite, huge)."""
    from fastdiff.requests import MAX_GUIDANCE, EditRequest

    for bad in (1e30, MAX_GUIDANCE + 1, -1.0, float("nan")):
        with pytest.raises(PipelineError, match=rf"^{name}: expected a number in 0\.\.100, got "):
            EditRequest(image="in.png", instruction="x", **{name: bad})
    assert getattr(EditRequest(image="in.png", instruction="x", **{name: MAX_GUIDANCE}), name) == MAX_GUIDANCE


def test_validate_checks_the_model_folder_before_the_kernels(tmp_path, capsys):
    """`fastdiff validate --model DIR` ran minutes of kernel checks before finding DIR unusable."""
    from fastdiff.cli import main

    assert main(["validate", "--model", str(tmp_path)]) != 0
    out, err = capsys.readouterr()
    assert "is not a pipeline folder with unet/config.json" in err
    assert "attention" not in out  # no kernel row ran


def test_validate_checks_a_mobilediffusion_folder_against_the_reference_backend():
    """diffusers cannot build a MobileDiffusion UNet: the shipped default's is checked against
    fastdiff's reference backend (fast backends only), its VAE against diffusers."""
    from fastdiff.validate import compare_models

    rows = compare_models(WEIGHTS / "generate")
    assert {(r["model"], r["backend"], r["dtype"]) for r in rows if r["model"].startswith("unet")} == \
        {("unet (MobileDiffusion)", "cpp", "float32"), ("unet (MobileDiffusion)", "cpp", "bfloat16")}
    assert any(r["model"] == "vae decode" for r in rows)
    assert all(r["passed"] for r in rows), rows

"""The `fastdiff` command: generate/edit write images, validate reports PASS/FAIL, errors are one line."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastdiff import cli
from fastdiff.default_model import default_pipeline


def test_info_lists_backends_and_cpu(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "cpp", "triton"):
        assert f"backend {name}" in out
    assert "CPU:" in out


def test_info_names_the_cpp_simd_level(capsys):
    from fastdiff import ops

    assert cli.main(["info"]) == 0
    assert f"C++ SIMD level: {ops.cpp_simd_level()}" in capsys.readouterr().out
    assert ops.cpp_simd_level() in ("avx512_bf16", "avx512", "avx2", "scalar")


def test_console_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "fastdiff.cli", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fastdiff 0.1.0" in result.stdout


def test_generate_writes_an_image_of_the_model_size(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert cli.main(["generate", "a cat", "-o", str(out), "--model", "small", "--seed", "3"]) == 0
    image = Image.open(out)
    size = default_pipeline("generate", "small").defaults.size
    assert image.size == (size, size) and image.mode == "RGB"
    assert "UNTRAINED" in capsys.readouterr().out  # the embedded model says what it is


def test_generate_is_deterministic_for_a_seed(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, (5, 5, 6)):
        assert cli.main(["generate", "a cat", "-o", str(path), "--model", "small", "--seed", str(seed), "--sampler", "euler",
                         "--steps", "2"]) == 0
    a, b, c = (np.asarray(Image.open(p)) for p in paths)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_edit_keeps_the_input_size_rounded_to_8(tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 61, 3), dtype=np.uint8)).convert("L").save(source)
    out = tmp_path / "out.png"
    assert cli.main(["edit", str(source), "make it snowy", "-o", str(out), "--model", "small", "--steps", "2"]) == 0
    assert Image.open(out).size == (56, 64)


@pytest.mark.parametrize("command", ["generate", "edit"])
def test_cache_flags_reach_the_request(tmp_path, command):
    """--cache-interval 1 is the uncached image bit for bit; interval 2 changes it (its odd steps ran
    cached), more outer levels (--cache-depth) change it otherwise."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    inputs = ["generate", "a cat"] if command == "generate" else ["edit", str(tmp_path / "in.png"), "make it snowy"]

    def image(*flags):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        assert cli.main([*inputs, "-o", str(out), "--model", "small", "--sampler", "euler", "--steps", "4", *flags]) == 0
        return np.asarray(Image.open(out))

    plain = image()
    assert np.array_equal(image("--cache-interval", "1"), plain)
    shallow = image("--cache-interval", "2", "--cache-depth", "1")
    assert not np.array_equal(shallow, plain)
    assert not np.array_equal(image("--cache-interval", "2", "--cache-depth", "2"), shallow)


@pytest.mark.parametrize("command", ["generate", "edit"])
def test_cache_flags_are_in_the_help(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "-h"])
    out = capsys.readouterr().out
    assert "--cache-interval N" in out and "--cache-depth D" in out and "DeepCache" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "a cat", "-o", "{tmp}/o.png", "--model", "small", "--cache-interval", "0"],
         "cache_interval: expected a positive integer"),
        (["generate", "a cat", "-o", "{tmp}/o.png", "--model", "small", "--cache-interval", "2", "--cache-depth", "9"],
         "cache_depth: expected 1..3"),
        (["edit", "/no/such/image.png", "snow", "-o", "{tmp}/o.png", "--model", "small"], "image: cannot read"),
        (["generate", "a cat", "-o", "/no/such/folder/o.png", "--model", "small"], "-o/--output: folder"),
        (["generate", "a cat", "-o", "{tmp}/out.xyz", "--model", "small"], "-o/--output: cannot write images as '.xyz'"),
        (["generate", "a cat", "-o", "{tmp}/out", "--model", "small"], "-o/--output: cannot write images as a file"),
        (["generate", "a cat", "-o", "{tmp}/o.png", "--model", "small", "--height", "100000000"], "over the limit"),
        (["generate", "a cat", "-o", "{tmp}/o.png", "--model", "small", "--steps", "0"], "steps: expected a positive integer"),
        (["generate", "a cat", "-o", "{tmp}/o.png", "--model", "{tmp}/missing"], "model: '"),
        (["generate", "a cat", "-o", "{tmp}/o.png", "--model", "small", "--sampler", "plms"], "name: expected one of"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, capsys, argv, message):
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="steps"):
        cli.main(["--debug", "generate", "a cat", "-o", str(tmp_path / "o.png"), "--model", "small", "--steps", "0"])


def test_validate_passes_on_this_machine(capsys):
    assert cli.main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and " 0 failed" in out
    assert "unet (small random)" in out and "vae decode" in out


def test_bad_requests_fail_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    """The output path and the request's own values are checked first: nothing is loaded for them."""
    import fastdiff.api

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a request that was going to fail")

    monkeypatch.setattr(fastdiff.api, "get_pipeline", no_model)
    for argv in (["generate", "a cat", "-o", str(tmp_path / "out.xyz")],
                 ["generate", "a cat", "-o", str(tmp_path / "o.png"), "--steps", "0"],
                 ["generate", "a cat", "-o", str(tmp_path / "o.png"), "--guidance-scale", "-1"],
                 ["generate", "a cat", "-o", str(tmp_path / "o.png"), "--cache-depth", "0"],
                 ["edit", str(tmp_path / "missing.png"), "snow", "-o", str(tmp_path / "o.png")]):
        assert cli.main(argv) == 1
        assert "loaded for a request" not in capsys.readouterr().err


def test_version_and_help_of_every_subcommand(capsys):
    for argv in (["--version"], ["bench", "-h"], ["bench", "kernels", "-h"], ["generate", "-h"], ["edit", "-h"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 0, argv
    out = capsys.readouterr().out
    assert "fastdiff 0.1.0" in out and "usage: fastdiff bench" in out and "kernels" in out


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="steps"):
        cli.main(["generate", "a cat", "-o", str(tmp_path / "o.png"), "--model", "small", "--steps", "0", "--debug"])


def test_unknown_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["info", "--bogus"])
    assert exited.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_fastdiff_model_variable_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTDIFF_MODEL", "bogus")
    assert cli.main(["generate", "a cat", "-o", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert "FASTDIFF_MODEL: 'bogus' is neither an embedded default" in err


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16", "float32"])
def test_dtype_names(tmp_path, dtype):
    assert cli.main(["generate", "a cat", "-o", str(tmp_path / "o.png"), "--model", "small", "--steps", "1",
                     "--dtype", dtype]) == 0


@pytest.mark.parametrize("command", [["generate", "a cat"], ["edit", "in.png", "make it blue"], ["serve"]])
def test_dtype_choices_are_the_api_names(command, capsys):
    """--dtype offers the names dtype= takes (hardware.DTYPE_NAMES), in every command that has it."""
    from fastdiff import hardware

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*command, "--dtype", "fp8"])
    offered = capsys.readouterr().err.split("--dtype: invalid choice", 1)[1]
    assert all(repr(name) in offered for name in hardware.DTYPE_NAMES)


def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path, capsys):
    assert cli.main(["generate", "a cat", "-o", str(tmp_path / "o.png"), "--model", "small", "--dtype", "fp16"]) == 1
    assert "dtype: float16 does not run on cpu" in capsys.readouterr().err

"""fastdiff.train end to end at 2 steps a stage (batches of 4; the real models and code paths):
stage folders, resuming, the `all` orchestration, and the exported pipelines."""
import dataclasses
import json
import shutil

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from fastdiff import toyworld, train  # noqa: E402
from fastdiff.pipeline import Pipeline  # noqa: E402

STEPS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """(work, out): each stage run on its own for STEPS steps, then `all` (which finds them finished
    and only exports)."""
    work, out = tmp_path_factory.mktemp("train-runs"), tmp_path_factory.mktemp("weights")
    common = ["--steps", str(STEPS), "--work", str(work), "--out", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "CONFIGS", {k: dataclasses.replace(c, batch=4) for k, c in train.CONFIGS.items()})
        patch.setattr(train, "SNAPSHOT_EVERY", 1)
        for stage in ("tokenizer", "vae", "generate", "edit", "decoder"):
            assert train.main([stage, *common]) == 0
        assert train.main(["all", *common]) == 0
    return work, out


def state(work, stage):
    return torch.load(work / stage / "state.pt", weights_only=True)


def test_stage_folders(trained):
    work, _ = trained
    assert (work / "tokenizer" / "vocab.json").is_file() and (work / "tokenizer" / "merges.txt").is_file()
    for stage in ("vae", "generate", "edit", "decoder"):
        saved = state(work, stage)
        assert saved["step"] == saved["steps"] == STEPS
        assert len(saved["losses"]) == STEPS  # `all` found the stage finished: not run again
        assert all(loss > 0 for loss in saved["losses"])
        lines = (work / stage / "loss.csv").read_text().splitlines()
        assert lines[0] == "step,loss" and len(lines) == STEPS + 1
        assert Image.open(work / stage / "loss.png").size == (640, 360)
    assert state(work, "vae")["scaling_factor"] > 0
    assert set(state(work, "generate")["ema"]) == {"text_encoder", "unet"}


def test_generator_curriculum_starts_on_one_shape_on_white(trained):
    """The generate stage's first steps draw from their own cache: one shape on white, train split."""
    work, _ = trained
    firsts, worlds = (list((work / "cache").glob(pattern)) for pattern in ("generate-first-*.pt", "generate-[0-9]*.pt"))
    assert firsts and worlds
    for first in firsts:
        texts = torch.load(first, weights_only=True)["texts"]
        assert texts and all(t.endswith("on a white background") and " and a " not in t for t in texts)
        assert all(toyworld.split_of(t) == "train" for t in texts)
    for world in worlds:
        assert any(not t.endswith("on a white background") for t in torch.load(world, weights_only=True)["texts"])


def test_snapshots_and_learning_curve(trained, tmp_path, monkeypatch):
    """Every SNAPSHOT_EVERY steps the UNet stages keep their EMA weights; `curve` judges each on
    held-out samples and writes the rows as JSON and CSV."""
    from fastdiff.bench import quality

    work = tmp_path / "work"
    shutil.copytree(trained[0], work)
    for stage in ("generate", "edit"):
        steps = sorted(int(p.stem) for p in (work / stage / "snapshots").glob("*.pt"))
        assert steps == list(range(1, STEPS + 1))
        snapshot = torch.load(work / stage / "snapshots" / f"{STEPS}.pt", weights_only=True)
        assert snapshot["ema"]["unet"].keys() == state(work, stage)["ema"]["unet"].keys() and snapshot["seconds"] > 0
    monkeypatch.setattr(quality, "QUICK", dataclasses.replace(quality.QUICK, n_generate=3, n_edit=2))
    assert train.main(["curve", "--work", str(work)]) == 0
    rows = json.loads((work / "curve.json").read_text())
    assert [(r["stage"], r["step"]) for r in rows] == [(s, i) for s in ("generate", "edit") for i in range(1, STEPS + 1)]
    for row in rows:
        figures = ("color", "kind", "position") if row["stage"] == "generate" else ("success",)
        assert all(0 <= row[f] <= 1 for f in figures) and row["minutes"] >= 0
    lines = (work / "curve.csv").read_text().splitlines()
    assert lines[0].startswith("stage,step,minutes,color") and len(lines) == len(rows) + 1


def test_decoder_stage_keeps_the_encoder(trained):
    """The UNets train on the vae stage's latents: the decoder stage must change only the decoder."""
    vae, tuned = state(trained[0], "vae")["models"]["vae"], state(trained[0], "decoder")["models"]["vae"]
    changed = {k.split(".")[0] for k in vae if not torch.equal(vae[k], tuned[k])}
    assert changed == {"decoder", "post_quant_conv"}


def test_resume_continues_from_the_saved_step(trained, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(trained[0], work)
    before = state(work, "generate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "CONFIGS", {k: dataclasses.replace(c, batch=4) for k, c in train.CONFIGS.items()})
        assert train.main(["generate", "--steps", str(STEPS + 1), "--work", str(work)]) == 0
    after = state(work, "generate")
    assert after["step"] == after["steps"] == STEPS + 1
    assert after["losses"][:STEPS] == before["losses"] and len(after["losses"]) == STEPS + 1
    assert after["seconds"] >= before["seconds"]
    changed = [k for k, v in before["models"]["unet"].items() if not torch.equal(v, after["models"]["unet"][k])]
    assert changed  # one more optimizer step, from the saved weights

    # export refuses a stage that stopped before its end
    after["steps"] = STEPS + 5
    torch.save(after, work / "generate" / "state.pt")
    with pytest.raises(SystemExit, match=f"the generate stage stopped at step {STEPS + 1} of {STEPS + 5}"):
        train.main(["export", "--work", str(work), "--out", str(tmp_path / "out")])


def test_exported_pipelines_load_and_run(trained):
    _, out = trained
    for kind in ("generate", "edit"):
        assert json.loads((out / kind / "training.json").read_text())["trained_steps"] == STEPS
        assert (out / kind / "tokenizer" / "vocab.json").is_file() and (out / kind / "tokenizer" / "merges.txt").is_file()
        weights = list((out / kind).glob("*/*.safetensors"))
        assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
        for path in weights:
            tensors = load_file(path)
            assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}, path
    generator = Pipeline.from_pretrained(out / "generate")
    assert type(generator.unet).__name__ == "MobileDiffusionUNet" and not generator.is_editor
    assert generator.defaults.size == 128 and generator.defaults.steps == 20
    assert generator.scheduler_config["prediction_type"] == "v_prediction"
    image = generator.generate("a big red circle at the top left on a white background", steps=2, seed=0, progress=False)[0]
    assert image.size == (128, 128)
    editor = Pipeline.from_pretrained(out / "edit")
    assert editor.is_editor
    edited = editor.edit(image, "make the circle blue", steps=2, seed=0, progress=False)
    assert edited.size == (128, 128)


def test_step_data_is_deterministic():
    draw = lambda rng: [rng.random() for _ in range(5)]  # noqa: E731
    assert draw(train.step_rng("generate", 7)) == draw(train.step_rng("generate", 7))
    assert draw(train.step_rng("generate", 7)) != draw(train.step_rng("generate", 8))
    assert draw(train.step_rng("generate", 7)) != draw(train.step_rng("edit", 7))
    noise = lambda g: torch.randn(4, generator=g)  # noqa: E731
    assert torch.equal(noise(train.step_generator("edit", 3)), noise(train.step_generator("edit", 3)))
    assert not torch.equal(noise(train.step_generator("edit", 3)), noise(train.step_generator("edit", 4)))


def test_exported_folders_are_the_default_model(trained, tmp_path, monkeypatch):
    """fastdiff.generate/edit without a model load the trained default from default_model.WEIGHTS,
    where export writes; an empty WEIGHTS says to run `make train-default`."""
    import fastdiff
    from fastdiff import default_model
    from fastdiff.requests import PipelineError

    monkeypatch.delenv("FASTDIFF_MODEL", raising=False)
    monkeypatch.setattr(default_model, "WEIGHTS", trained[1])
    default_model.default_pipeline.cache_clear()
    try:
        image = fastdiff.generate("a small blue star in the center on a pink background", steps=1, seed=0, progress=False)[0]
        assert image.size == (128, 128)
        assert fastdiff.edit(image, "remove the star", steps=1, seed=0, progress=False).size == (128, 128)
        assert default_model.default_pipeline("edit").name == "fastdiff-toyworld-edit (trained on fastdiff.toyworld)"
        monkeypatch.setattr(default_model, "WEIGHTS", tmp_path)
        default_model.default_pipeline.cache_clear()
        with pytest.raises(PipelineError, match=rf"weights are missing from {tmp_path / 'generate'}; `make train-default`"):
            fastdiff.generate("a big red circle in the center on a white background")
        with pytest.raises(ValueError, match="vae: the toyworld models have their own VAE"):
            default_model.default_pipeline("generate", "toyworld", vae="tiny")
    finally:
        default_model.default_pipeline.cache_clear()


def test_conditioning_check_runs_judges_and_fails_below_target(tmp_path, monkeypatch, one_thread):
    """The check's plumbing at 2 steps (its real run is minutes: BENCHMARKS.md): a fresh generator
    on one-circle scenes, held-out samples judged by colour, exit code 1 below the target, the
    latent cache reused by a second run."""
    monkeypatch.setattr(train, "CHECK_SAMPLES", 6)
    assert train.main(["check", "--steps", "2", "--work", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "check" / "result.json").read_text())
    assert result["steps"] == 2 and result["target"] == train.CHECK_TARGET and 0 <= result["colour_accuracy"] < 1
    assert result["gflops"] > 0
    [cache] = (tmp_path / "cache").glob("check-*.pt")
    stamp = cache.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "check")
    train.main(["check", "--steps", "2", "--work", str(tmp_path)])
    assert cache.stat().st_mtime_ns == stamp


def test_check_scenes_vary_only_in_colour():
    import random

    scenes = [train.check_scene(random.Random(i)) for i in range(60)]
    assert {s.shapes[0].color for s in scenes} == set(toyworld.SHAPE_COLORS)
    assert {(s.shapes[0].kind, s.shapes[0].size, s.shapes[0].row, s.shapes[0].col, s.background) for s in scenes} == \
        {("circle", "big", 1, 1, ("white",))}


def test_vae_anchor_keeps_the_palette_apart():
    """The VAE latent's anchor: a flat 8x8 cell of each palette colour maps to its own point (the
    closest pair, white and pink, 1.3 apart)."""
    flats = torch.stack([torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1 for rgb in toyworld.PALETTE.values()])
    images = flats[:, :, None, None].expand(-1, -1, 8, 8)
    points = train.colour_thumbnail(images)[:, :, 0, 0]  # (colours, 3)
    assert points.shape == (len(toyworld.PALETTE), 3)
    distances = torch.cdist(points, points) + 10 * torch.eye(len(points))
    assert distances.min() > 1.0
    # luminance leads: white above gray above black
    names = list(toyworld.PALETTE)
    assert points[names.index("white"), 0] > points[names.index("gray"), 0] > points[names.index("black"), 0]

"""fastdiff.loading: pipeline folders written by save_pipeline read back identically (MobileDiffusion
and the SD-style editor), MGIE checkpoints, dtype on load, and errors naming the folder part.
(Folders written by diffusers itself are covered by tests/test_pipeline.py.)"""
import json
import shutil

import numpy as np
import pytest
import torch

from fastdiff.default_model import default_pipeline
from fastdiff.loading import save_pipeline
from fastdiff.models.edit_head import EditHead
from fastdiff.pipeline import Pipeline, PipelineError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The small default generator (MobileDiffusion) and editor, written with save_pipeline."""
    root = tmp_path_factory.mktemp("saved")
    for kind in ("generate", "edit"):
        save_pipeline(default_pipeline(kind, "small"), root / kind)
    return root


def image(side=64, seed=0):
    return np.random.default_rng(seed).random((side, side, 3))


def test_mobilediffusion_round_trip_is_identical(saved):
    original = default_pipeline("generate", "small")
    loaded = Pipeline.from_pretrained(saved / "generate")
    assert type(loaded.unet).__name__ == "MobileDiffusionUNet" and loaded.unet.config == original.unet.config
    assert loaded.defaults == original.defaults  # one-step x0 mode, 128 px: kept in model_index.json
    assert loaded.scheduler_config == original.scheduler_config
    for run in (dict(), dict(steps=3, sampler="euler", guidance_scale=4.0, negative_prompt="dull")):
        ours = loaded.generate("a cat", seed=3, output_type="np", progress=False, **run)
        np.testing.assert_array_equal(ours, original.generate("a cat", seed=3, output_type="np", progress=False, **run))
    assert ours.shape == (1, 128, 128, 3) and ours.std() > 0.01


def test_editor_round_trip_is_identical(saved):
    original = default_pipeline("edit", "small")
    loaded = Pipeline.from_pretrained(saved / "edit")
    assert loaded.is_editor and loaded.defaults == original.defaults
    run = dict(steps=3, seed=5, output_type="np", progress=False)
    np.testing.assert_array_equal(loaded.edit(image(), "make it snowy", **run), original.edit(image(), "make it snowy", **run))


def test_index_names_components(saved):
    index = json.loads((saved / "generate" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["fastdiff", "MobileDiffusionUNet"]
    assert index["fastdiff"]["defaults"]["sampler"] == "x0"
    edit_index = json.loads((saved / "edit" / "model_index.json").read_text())
    assert edit_index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    assert edit_index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_bfloat16_load(saved):
    pipe = Pipeline.from_pretrained(saved / "edit", dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    ours = pipe.edit(image(), "snow", steps=2, seed=1, output_type="np", progress=False)
    full = default_pipeline("edit", "small").edit(image(), "snow", steps=2, seed=1, output_type="np", progress=False)
    assert np.isfinite(ours).all() and np.abs(ours - full).mean() < 0.05  # bf16 rounding, not another image


def fake_mgie(root, editor, seed=0, llm_dim=48):
    """MGIE's two files for the small editor: unet.pt (perturbed UNet weights, wrapped in
    {"state_dict": ...} under "module." as DataParallel dumps are) and mllm.pt (embed_tokens, edit_head.*
    and emb, the [IMG] token embeddings: not embed_tokens' last rows, so a test sees which is used)."""
    folder = root / "mgie"
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    unet_state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in editor.unet.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in unet_state.items()}}, folder / "unet.pt")
    torch.manual_seed(seed)
    head = EditHead(llm_dim=llm_dim, hidden_dim=32, out_dim=editor.cross_attention_dim, num_queries=77, num_heads=4,
                    num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)
    mllm = {"model.embed_tokens.weight": torch.randn(20, llm_dim, generator=g), "emb": torch.randn(1, 8, llm_dim, generator=g)}
    mllm.update({f"edit_head.{k}": v for k, v in head.state_dict().items()})
    torch.save(mllm, folder / "mllm.pt")
    return folder, unet_state, mllm


def test_mgie_checkpoints_load(saved, tmp_path):
    editor = default_pipeline("edit", "small")
    folder, unet_state, mllm = fake_mgie(tmp_path, editor)
    pipe = Pipeline.from_pretrained(saved / "edit", mgie=folder)
    for name, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, unet_state[name], rtol=0, atol=0)
    # MGIE's inference conditions on mllm.pt's emb (apple/ml-mgie: edit_head(hidden, ckpt["emb"]))
    torch.testing.assert_close(pipe.img_token_embeddings, mllm["emb"][0], rtol=0, atol=0)
    torch.testing.assert_close(pipe.edit_head.query, mllm["edit_head.query"], rtol=0, atol=0)
    hidden = torch.randn(8, 48)
    out = pipe.edit(image(), img_hidden_states=hidden, steps=2, seed=0, output_type="np", progress=False)
    # the null branch is the head on zeros: the same as giving both embeddings explicitly
    with torch.no_grad():
        emb = pipe.img_token_embeddings[None]
        text, null = pipe.edit_head(hidden[None], emb), pipe.edit_head(torch.zeros(1, 8, 48), emb)
    explicit = pipe.edit(image(), instruction_embeds=text, negative_instruction_embeds=null, steps=2, seed=0,
                         output_type="np", progress=False)
    np.testing.assert_array_equal(out, explicit)
    with pytest.raises(PipelineError, match=r"^img_hidden_states: expected a float \(8, 48\)"):
        pipe.edit(image(), img_hidden_states=torch.randn(8, 47), steps=1, progress=False)


def test_mgie_head_width_must_match_embeddings(saved, tmp_path):
    folder, _, mllm = fake_mgie(tmp_path, default_pipeline("edit", "small"))
    mllm["emb"] = torch.randn(1, 8, 40)
    torch.save(mllm, folder / "mllm.pt")
    with pytest.raises(PipelineError, match=r"^mgie: emb in .*mllm\.pt is \(1, 8, 40\); expected \(8, 48\)"):
        Pipeline.from_pretrained(saved / "edit", mgie=folder)
    del mllm["emb"]
    torch.save(mllm, folder / "mllm.pt")
    with pytest.raises(PipelineError, match=r"^mgie: .*mllm\.pt has no 'emb'"):
        Pipeline.from_pretrained(saved / "edit", mgie=folder)


def test_mgie_head_output_must_match_the_unet(saved, tmp_path):
    editor = default_pipeline("edit", "small")
    folder, _, mllm = fake_mgie(tmp_path, editor)
    mllm["edit_head.hid2feat.weight"] = torch.randn(24, 32)
    mllm["edit_head.hid2feat.bias"] = torch.randn(24)
    torch.save(mllm, folder / "mllm.pt")
    with pytest.raises(PipelineError, match="^mgie: the edit head's output width 24"):
        Pipeline.from_pretrained(saved / "edit", mgie=folder)


def copy(saved, name, tmp_path):
    target = tmp_path / name
    shutil.copytree(saved / name, target)
    return target


def test_folder_errors(saved, tmp_path):
    folder = copy(saved, "generate", tmp_path)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(PipelineError, match="tokenizer/ part is missing"):
        Pipeline.from_pretrained(folder)
    shutil.rmtree(folder / "text_encoder")  # without both: a pipeline that takes embeddings only
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.text_encoder is None
    assert pipe.generate(prompt_embeds=torch.randn(77, 32), seed=0, progress=False)[0].size == (128, 128)

    folder = copy(saved, "edit", tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 5}))
    with pytest.raises(PipelineError, match="^unet: cannot load"):  # weights no longer fit
        Pipeline.from_pretrained(folder)

    folder = copy(saved, "generate", tmp_path / "md")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "wings": 2}))
    with pytest.raises(PipelineError, match="fields unknown to MobileDiffusionConfig: \\['wings'\\]"):
        Pipeline.from_pretrained(folder)

    folder = copy(saved, "generate", tmp_path / "index")
    index = json.loads((folder / "model_index.json").read_text())
    index["fastdiff"]["defaults"]["stepz"] = 3
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match="unknown fastdiff defaults \\['stepz'\\]"):
        Pipeline.from_pretrained(folder)

    folder = copy(saved, "generate", tmp_path / "sched")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler",
                                                                            "use_karras_sigmas": True}))
    with pytest.raises(PipelineError, match="^scheduler: .*use_karras_sigmas"):
        Pipeline.from_pretrained(folder, dtype=torch.float32)

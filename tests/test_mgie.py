"""fastdiff.MGIE end to end against MGIE's procedure re-done here with transformers and diffusers
on the same tiny random weights, saved in the real layouts: a LLaVA-v1 folder ("model_type":
"llava", pytorch_model-*.bin shards holding model.mm_projector.*), a CLIP vision folder, an
InstructPix2Pix diffusers folder (Euler ancestral, as timbrooks/instruct-pix2pix) and MGIE's
unet.pt / mllm.pt. Same expressive text, same image within PARITY (fp32), with the [IMG] tokens
generated and with the fallback position."""
import json
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from fastdiff import cli  # noqa: E402
from fastdiff.engine import Engine  # noqa: E402
from fastdiff.mgie import MGIE  # noqa: E402
from fastdiff.models.llava import LlavaV1  # noqa: E402
from fastdiff.requests import PipelineError  # noqa: E402
from test_pipeline import SD_SCHEDULER, make_image, perturbed, tiny_parts, tiny_unet  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

PARITY = 1e-3
WIDTH, VISION_WIDTH = 64, 32
IMG = [f"[IMG{i}]" for i in range(8)]
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
MISSING_TOWER = "fastdiff-tests/no-such-clip"  # in no Hugging Face cache: the folder must be passed
STEPS = 3
INSTRUCTION = "make it snowy"
IMG_BIAS = 0.3  # [IMG0]'s lm_head row: ones x this makes the tiny LLM write it after some text


def byte_tokenizer():
    """A byte-level BPE tokenizer (no merges) with LLaVA-v1's image tokens already added, as the real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_tokens(["<im_patch>", "<im_start>", "<im_end>"], special_tokens=True)
    return fast


def save_llava(folder, tokenizer, *, projector=True, seed=0):
    """LLaVA-v1 as on disk: LLaMA-v1-era config fields plus mm_*, weights in two .bin shards."""
    folder.mkdir()
    tokenizer.save_pretrained(folder)
    llama = dict(hidden_size=WIDTH, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-6,
                 vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, hidden_act="silu", initializer_range=0.02,
                 tie_word_embeddings=False)
    torch.manual_seed(seed)
    llm = perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)), seed)
    config = {**llama, "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "max_sequence_length": 2048,
              "torch_dtype": "float32", "use_cache": True, "mm_vision_tower": MISSING_TOWER, "mm_hidden_size": VISION_WIDTH,
              "mm_use_im_start_end": True, "mm_vision_select_layer": -2, "use_mm_proj": True}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.clone() for k, v in llm.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    if projector:
        state["model.mm_projector.weight"] = torch.randn(WIDTH, VISION_WIDTH, generator=g) / VISION_WIDTH**0.5
        state["model.mm_projector.bias"] = 0.1 * torch.randn(WIDTH, generator=g)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state


def save_vision(folder):
    torch.manual_seed(4)
    config = transformers.CLIPVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=40, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8)  # 16 patches
    perturbed(transformers.CLIPVisionModel(config), 4).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def save_mgie(folder, vocab, *, img_bias, seed=11):
    """unet.pt (another tiny IP2P UNet) and mllm.pt: full embed_tokens / lm_head with the 8 new rows,
    the edit head under edit_head.*, and emb. img_bias scales [IMG0]'s lm_head row: how readily the
    tiny LLM writes it."""
    from fastdiff.models.edit_head import EditHead

    folder.mkdir()
    torch.save(tiny_unet(8, seed).state_dict(), folder / "unet.pt")
    g = torch.Generator().manual_seed(seed)
    head = perturbed(EditHead(llm_dim=WIDTH, hidden_dim=32, out_dim=32, num_queries=77, num_heads=4, num_encoder_layers=1,
                               num_decoder_layers=2, dim_feedforward=48), seed)
    lm_head = torch.randn(vocab, WIDTH, generator=g) * 0.2
    lm_head[vocab - 8] = img_bias * torch.ones(WIDTH)
    mllm = {"model.embed_tokens.weight": torch.randn(vocab, WIDTH, generator=g), "lm_head.weight": lm_head,
            "emb": torch.randn(1, 8, WIDTH, generator=g)}
    mllm.update({f"edit_head.{k}": v.clone() for k, v in head.state_dict().items()})
    torch.save(mllm, folder / "mllm.pt")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mgie")
    tokenizer = byte_tokenizer()
    save_llava(root / "llava", tokenizer)
    save_vision(root / "clip")
    _, text_encoder, vae = tiny_parts(root)
    tokenizer_clip = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer_src")
    diffusers.StableDiffusionInstructPix2PixPipeline(
        unet=tiny_unet(8, 3), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer_clip,
        scheduler=diffusers.EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).save_pretrained(root / "ip2p")
    vocab = len(tokenizer) + 8
    save_mgie(root / "mgie_img", vocab, img_bias=IMG_BIAS)
    save_mgie(root / "mgie_fallback", vocab, img_bias=0.0)  # a zero logit: never the greedy choice
    return root


class EditMapper(torch.nn.Module):
    """MGIE's edit head, written here on torch.nn.Transformer (the reference for fastdiff's EditHead)."""

    def __init__(self, state):
        super().__init__()
        hidden, llm = state["llm2hid.weight"].shape
        self.llm2hid = torch.nn.Linear(llm, hidden)
        self.query = torch.nn.Parameter(state["query"].clone())
        self.mapper = torch.nn.Transformer(batch_first=True, norm_first=True, d_model=hidden, nhead=4, num_encoder_layers=1,
                                           num_decoder_layers=2, dim_feedforward=48, dropout=0.0)
        self.hid2feat = torch.nn.Linear(hidden, state["hid2feat.weight"].shape[0])
        self.load_state_dict(state)

    def forward(self, llm, emb):
        return self.hid2feat(self.mapper(self.llm2hid(llm + emb), self.query.repeat(llm.shape[0], 1, 1)))


def reference(root, mgie_name, image, instruction, seed):
    """MGIE's inference with transformers and diffusers: (expressive text, image (1, H, W, 3), sequence, prompt length)."""
    llava, mgie = root / "llava", root / mgie_name
    tokenizer = transformers.AutoTokenizer.from_pretrained(llava)
    tokenizer.add_tokens(IMG, special_tokens=True)
    fields = {k: v for k, v in json.loads((llava / "config.json").read_text()).items()
              if not k.startswith("mm_") and k not in ("model_type", "architectures", "max_sequence_length")}
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    state = {}
    for shard in sorted(llava.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, weights_only=True))
    projector = torch.nn.Linear(VISION_WIDTH, WIDTH)
    projector.load_state_dict({"weight": state.pop("model.mm_projector.weight"), "bias": state.pop("model.mm_projector.bias")})
    llm.load_state_dict(state)
    llm.resize_token_embeddings(len(tokenizer))
    mllm = torch.load(mgie / "mllm.pt", weights_only=True)
    llm.load_state_dict(mllm, strict=False)
    vision = transformers.CLIPVisionModel.from_pretrained(root / "clip").eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(root / "clip")

    image = image.copy()
    image.thumbnail((512, 512))
    w, h = image.size
    m = min(w, h)
    square = image.crop(((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m)).resize((512, 512))
    pixels = processor(images=square, return_tensors="pt").pixel_values
    prompt = (f"{SYSTEM} USER: what will this image be like if {instruction}\n<im_start>{'<im_patch>' * 16}<im_end> "
              f"ASSISTANT:")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        features = projector(vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        embeds = llm.get_input_embeddings()(ids)
        embeds[ids == tokenizer.convert_tokens_to_ids("<im_patch>")] = features[0]
        out = llm.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=torch.ones_like(ids), do_sample=False,
                           num_beams=1, max_new_tokens=96, no_repeat_ngram_size=3, return_dict_in_generate=True,
                           output_hidden_states=True)
    sequence = out.sequences[0].tolist()
    hid = torch.cat([step[-1] for step in out.hidden_states], dim=1)[0]
    img0 = tokenizer.convert_tokens_to_ids("[IMG0]")
    p = min(sequence.index(img0) - 1 if img0 in sequence else len(hid) - 9, len(hid) - 9)
    text = tokenizer.decode(sequence[ids.shape[1]:], skip_special_tokens=True).strip()

    head = EditMapper({k[len("edit_head."):]: v for k, v in mllm.items() if k.startswith("edit_head.")})
    with torch.no_grad():
        prompt_embeds = head(hid[p:p + 8][None], mllm["emb"])
        null = head(torch.zeros(1, 8, WIDTH), mllm["emb"])
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(root / "ip2p", safety_checker=None,
                                                                            requires_safety_checker=False)
    pipe.unet.load_state_dict(torch.load(mgie / "unet.pt", weights_only=True))
    pipe.set_progress_bar_config(disable=True)
    edited = pipe(image=image, prompt_embeds=prompt_embeds, negative_prompt_embeds=null, num_inference_steps=STEPS,
                  guidance_scale=7.5, image_guidance_scale=1.5, generator=torch.Generator().manual_seed(seed),
                  output_type="np").images
    return text, edited, sequence, ids.shape[1]


def load(root, mgie_name, **kwargs):
    return MGIE.from_pretrained(root / "llava", root / mgie_name, root / "ip2p", vision_dir=root / "clip", **kwargs)


@pytest.fixture(scope="module")
def loaded(folders):
    """fp32 MGIE per mgie folder, loaded once for the module."""
    cache = {}

    def get(mgie_name):
        if mgie_name not in cache:
            cache[mgie_name] = load(folders, mgie_name)
        return cache[mgie_name]

    return get


@pytest.mark.parametrize("mgie_name", ["mgie_img", "mgie_fallback"])
def test_edit_matches_mgie_procedure(folders, loaded, mgie_name):
    image = make_image(48, 32)  # not square: the MLLM sees its centre square
    text, theirs, sequence, prompt_length = reference(folders, mgie_name, image, INSTRUCTION, seed=13331)
    img0 = len(byte_tokenizer())
    if mgie_name == "mgie_img":  # the case is what it claims: [IMG0] written after some text
        assert img0 in sequence[prompt_length + 1:], sequence[prompt_length:]
    else:
        assert img0 not in sequence
    mgie = loaded(mgie_name)
    result = mgie.edit(image, INSTRUCTION, steps=STEPS, seed=13331, output_type="np")
    assert result.expressive_instruction == text and text
    diff = float(np.abs(result.image - theirs[0]).max())
    print(f"parity mgie {mgie_name}: max |diff| = {diff:.2e}, text {text!r}")
    assert result.image.shape == theirs[0].shape and diff <= PARITY
    assert set(result.timings) >= {"prefill_s", "decode_s", "unet_s", "vae_decode_s"}


def test_engine_batches_mgie_edits(loaded, monkeypatch):
    """Two MGIE edits through one Engine: their denoising shares UNet calls, each gets its own image."""
    mgie = loaded("mgie_img")
    image = make_image(32, 32)
    alone = [mgie.edit(image, instruction, steps=STEPS, seed=i, output_type="np") for i, instruction in
             enumerate(["make it snowy", "add a red hat"])]
    calls = []
    forward = mgie.pipe.unet.forward
    monkeypatch.setattr(mgie.pipe.unet, "forward",
                        lambda sample, *a, **k: calls.append(sample.shape[0]) or forward(sample, *a, **k))
    with Engine(mgie.pipe, max_batch=4, max_wait_ms=2000) as engine:
        futures = [mgie.submit(engine, image, instruction, steps=STEPS, seed=i, output_type="np")
                   for i, instruction in enumerate(["make it snowy", "add a red hat"])]
        results = [f.result() for f in futures]
    assert max(calls) == 6  # both edits' three guidance branches in one UNet call
    for one, batched in zip(alone, results):
        assert batched.expressive_instruction == one.expressive_instruction
        np.testing.assert_allclose(batched.image, one.image, atol=1e-4)


def test_bf16_from_safetensors(folders, tmp_path):
    """The same LLaVA folder with its weights in model.safetensors, loaded in bf16."""
    from safetensors.torch import save_file

    llava = shutil.copytree(folders / "llava", tmp_path / "llava")
    state = {}
    for shard in sorted(llava.glob("pytorch_model*")):
        state.update(torch.load(shard, weights_only=True) if shard.suffix == ".bin" else {})
        shard.unlink()
    save_file(state, llava / "model.safetensors")
    mgie = MGIE.from_pretrained(llava, folders / "mgie_img", folders / "ip2p", vision_dir=folders / "clip", dtype="bf16")
    dtypes = {p.dtype for p in (*mgie.llava.parameters(), *mgie.pipe.unet.parameters())}
    assert dtypes == {torch.bfloat16}
    torch.testing.assert_close(mgie.llava.mm_projector.weight.float(), state["model.mm_projector.weight"], rtol=1e-2, atol=1e-2)
    reading = mgie.describe(make_image(32, 32), INSTRUCTION)
    assert reading.img_hidden_states.shape == (8, WIDTH) and torch.isfinite(reading.img_hidden_states).all()


def test_bad_input(folders, loaded, tmp_path):
    no_projector = tmp_path / "llava"
    save_llava(no_projector, byte_tokenizer(), projector=False)
    with pytest.raises(PipelineError, match=r"^llava_dir: no model\.mm_projector\.weight/bias"):
        MGIE.from_pretrained(no_projector, folders / "mgie_img", folders / "ip2p", vision_dir=folders / "clip")
    no_emb = shutil.copytree(folders / "mgie_img", tmp_path / "mgie")
    mllm = torch.load(no_emb / "mllm.pt", weights_only=True)
    del mllm["emb"]
    torch.save(mllm, no_emb / "mllm.pt")
    with pytest.raises(PipelineError, match=r"^mgie_dir: .*mllm\.pt has no 'emb'"):
        load(folders, no_emb)
    missing_tower = rf"^vision_dir: the vision tower '{MISSING_TOWER}' .* not found locally.*pass vision_dir"
    with pytest.raises(PipelineError, match=missing_tower):
        MGIE.from_pretrained(folders / "llava", folders / "mgie_img", folders / "ip2p")
    with pytest.raises(PipelineError, match="^instruction: expected a non-empty string"):
        loaded("mgie_img").edit(make_image(), "  ")


def test_cli_prints_the_expressive_instruction_and_stage_timings(folders, tmp_path, capsys):
    make_image(32, 32).save(tmp_path / "in.png")
    code = cli.main(["edit", str(tmp_path / "in.png"), INSTRUCTION, "-o", str(tmp_path / "out.png"), "--steps", "2",
                     "--mgie", str(folders / "mgie_img"), "--llava", str(folders / "llava"), "--ip2p",
                     str(folders / "ip2p"), "--vision", str(folders / "clip"), "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "out.png").is_file()
    assert "expressive instruction: " in out
    for stage in ("MLLM prefill", "MLLM decode", "UNet", "VAE decode"):
        assert stage in out
    assert cli.main(["edit", str(tmp_path / "in.png"), INSTRUCTION, "-o", str(tmp_path / "x.png"), "--mgie", "m"]) == 1
    assert "--llava: needed for an MGIE edit" in capsys.readouterr().err


def test_each_edit_is_resolved_once(loaded, resolve_calls):
    """mgie.edit and mgie.submit resolve the edit once, before the MLLM runs; the MLLM's states then
    fill the Resolved (prepare and the engine check nothing again)."""
    mgie = loaded("mgie_img")
    mgie.edit(make_image(32, 32), INSTRUCTION, steps=1, seed=0)
    with Engine(mgie.pipe, max_wait_ms=0) as engine:
        mgie.submit(engine, make_image(32, 32), INSTRUCTION, steps=1, seed=0).result(timeout=120)
    assert [type(r).__name__ for r in resolve_calls] == ["EditRequest", "EditRequest"]
    with pytest.raises(PipelineError, match="^steps: expected a positive integer"):
        mgie.edit(make_image(32, 32), INSTRUCTION, steps=0)  # refused before the MLLM runs


def test_img_embeddings_are_mllm_emb_read_once(folders, monkeypatch):
    """MGIE's inference conditions its edit head on mllm.pt's emb (apple/ml-mgie: emb = ckpt['emb']),
    not on embed_tokens' last 8 rows (what its training passes; the released emb differs here):
    fastdiff.MGIE and Pipeline.from_pretrained(mgie=) take the same, and mllm.pt is read once."""
    from fastdiff.pipeline import Pipeline

    reads, torch_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: reads.append(str(path)) or torch_load(path, *a, **k))
    mgie = load(folders, "mgie_img")
    assert sum(path.endswith("mllm.pt") for path in reads) == 1
    mllm = torch_load(folders / "mgie_img" / "mllm.pt", weights_only=True)
    assert torch.equal(mgie.pipe.img_token_embeddings, mllm["emb"][0])
    assert not torch.equal(mllm["emb"][0], mllm["model.embed_tokens.weight"][-8:])  # the two answers differ here
    plain = Pipeline.from_pretrained(folders / "ip2p", mgie=folders / "mgie_img")
    assert torch.equal(plain.img_token_embeddings, mgie.pipe.img_token_embeddings)


def test_damaged_checkpoint_files_are_named(folders, tmp_path, monkeypatch):
    """Random bytes as mllm.pt got torch's advice about _use_new_zipfile_serialization; a damaged
    unet.pt an OSError [Errno 22] naming no file. Both now say what the file is, naming it."""
    damaged = shutil.copytree(folders / "mgie_img", tmp_path / "mgie")
    good_mllm = (damaged / "mllm.pt").read_bytes()
    (damaged / "mllm.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(PipelineError, match=rf"^mgie_dir: mllm\.pt: cannot load \({damaged / 'mllm.pt'}: not a torch "
                                            r"checkpoint") as error:
        load(folders, damaged)
    assert "_use_new_zipfile_serialization" not in str(error.value)
    (damaged / "mllm.pt").write_bytes(good_mllm)
    unet = (damaged / "unet.pt").read_bytes()
    (damaged / "unet.pt").write_bytes(unet[: len(unet) // 2])
    truncated = rf"^mgie_dir: unet\.pt: cannot load \({damaged / 'unet.pt'}: the torch checkpoint is truncated or corrupted"
    with pytest.raises(PipelineError, match=truncated):
        load(folders, damaged)
    (damaged / "unet.pt").write_bytes(unet)
    torch_load = torch.load

    def failing_load(path, *args, **kwargs):
        if str(path).endswith("unet.pt"):
            raise OSError(22, "Invalid argument")
        return torch_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(PipelineError, match=truncated + r".*OSError: \[Errno 22\] Invalid argument"):
        load(folders, damaged)


def test_result_is_the_shrunk_input(loaded):
    """MGIE edits the input shrunk to fit max_size (512: a 1024x700 input is edited, and comes back,
    at 512x350; the edit here at max_size=64, as 512x350 takes the tiny UNet a minute)."""
    mgie = loaded("mgie_img")
    assert mgie.describe(make_image(1024, 700), INSTRUCTION).image.size == (512, 350)
    assert mgie.edit(make_image(1024, 700), INSTRUCTION, steps=1, seed=0, max_size=64).image.size == (64, 44)
    assert mgie.edit(make_image(40, 24), INSTRUCTION, steps=1, seed=0, max_size=None).image.size == (40, 24)


def run_cli(folders, tmp_path, mgie_name, **flags):
    make_image(32, 32).save(tmp_path / "in.png")
    paths = {"--mgie": folders / mgie_name, "--llava": folders / "llava", "--ip2p": folders / "ip2p",
             "--vision": folders / "clip", **flags}
    argv = ["edit", str(tmp_path / "in.png"), INSTRUCTION, "-o", str(tmp_path / "out.png"), "--steps", "1", "--dtype", "fp32"]
    return cli.main(argv + [str(v) for flag, value in paths.items() for v in (flag, value)])


def test_cli_prints_the_expressive_instruction_without_img_tokens(folders, loaded, tmp_path, capsys, monkeypatch):
    """In MGIE's fallback (no [IMG] token written: the last states condition the edit) the CLI
    prints the expressive instruction and says it fell back; with no text at all it says that."""
    assert run_cli(folders, tmp_path, "mgie_fallback") == 0
    out = capsys.readouterr().out
    text = loaded("mgie_fallback").describe(make_image(32, 32), INSTRUCTION).expressive_instruction
    assert text and f"expressive instruction: {text}\n" in out
    assert "wrote no [IMG] token" in out and "(32x32: MGIE edits the input shrunk to fit 512x512)" in out
    greedy = LlavaV1.greedy

    def ends_at_once(self, ids, embeds, *, eos_token_id, **options):  # an MLLM whose first token is </s>
        _, hidden = greedy(self, ids, embeds, **{**options, "max_new_tokens": 1}, eos_token_id=eos_token_id)
        return [eos_token_id], hidden

    monkeypatch.setattr(LlavaV1, "greedy", ends_at_once)
    assert run_cli(folders, tmp_path, "mgie_fallback") == 0
    out = capsys.readouterr().out
    assert "expressive instruction: (none: the MLLM wrote no text)" in out and "wrote no [IMG] token" in out


def test_cli_errors_name_the_flags(folders, tmp_path, capsys):
    """MGIE's loading errors name --llava/--mgie/--ip2p/--vision, what the user typed, not llava_dir."""
    assert run_cli(folders, tmp_path, "mgie_img", **{"--llava": tmp_path / "nowhere"}) == 1
    err = capsys.readouterr().err
    assert "error: --llava: expected a folder" in err and "llava_dir" not in err
    damaged = shutil.copytree(folders / "mgie_img", tmp_path / "mgie")
    (damaged / "mllm.pt").write_bytes(b"not a checkpoint" * 100)
    assert run_cli(folders, tmp_path, "mgie_img", **{"--mgie": damaged}) == 1
    err = capsys.readouterr().err
    assert f"error: --mgie: mllm.pt: cannot load ({damaged / 'mllm.pt'}: not a torch checkpoint" in err


def test_mgie_edits_cache_steps_alone_and_in_the_engine(loaded):
    """cache_interval / cache_depth reach MGIE's edit and submit: a cached edit differs from the
    uncached one, and the same cached edit batched with an uncached one is the image it gets alone;
    a bad value is a PipelineError naming the field."""
    mgie = loaded("mgie_img")
    image, steps = make_image(32, 32), 4
    cached = dict(steps=steps, seed=1, output_type="np", cache_interval=2, cache_depth=1)
    alone = mgie.edit(image, "make it snowy", **cached)
    assert not np.array_equal(alone.image, mgie.edit(image, "make it snowy", **{**cached, "cache_interval": 1}).image)
    with Engine(mgie.pipe, max_batch=2, max_wait_ms=2000) as engine:
        futures = [mgie.submit(engine, image, "make it snowy", **cached),
                   mgie.submit(engine, image, "add a red hat", steps=steps, seed=2, output_type="np")]
        batched = futures[0].result()
        futures[1].result()
    np.testing.assert_allclose(batched.image, alone.image, atol=1e-4)
    with pytest.raises(PipelineError, match=r"^cache_depth: expected 1\.\."):
        mgie.edit(image, "make it snowy", cache_interval=2, cache_depth=99)


def test_cli_cache_flags_reach_the_mgie_edit(folders, tmp_path, capsys, monkeypatch):
    """--cache-interval / --cache-depth with --mgie reach MGIE.edit, whose resolve checks them."""
    edit, options = MGIE.edit, []
    monkeypatch.setattr(MGIE, "edit", lambda self, *args, **kwargs: options.append(kwargs) or edit(self, *args, **kwargs))
    assert run_cli(folders, tmp_path, "mgie_img", **{"--cache-interval": 2, "--cache-depth": 1}) == 0
    assert options[-1]["cache_interval"] == 2 and options[-1]["cache_depth"] == 1
    assert run_cli(folders, tmp_path, "mgie_img") == 0
    assert "cache_interval" not in options[-1] and "cache_depth" not in options[-1]  # unset: the pipeline's defaults
    capsys.readouterr()
    assert run_cli(folders, tmp_path, "mgie_img", **{"--cache-interval": 2, "--cache-depth": 99}) == 1
    assert "error: cache_depth: expected 1.." in capsys.readouterr().err

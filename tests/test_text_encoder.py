"""CLIPTextEncoder on a tiny CLIP (random weights) and a tiny BPE vocabulary written here: no hub."""
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdiff.models.text_encoder import CLIPTextEncoder  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A pipeline folder with tokenizer/ (vocab.json, merges.txt) and text_encoder/ (config + weights)."""
    root = tmp_path_factory.mktemp("tiny_sd")
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    tokens += [m.replace(" ", "") for m in MERGES]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}))

    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                                         num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


def test_encode_shape_padding_and_values(pipeline_folder):
    enc = CLIPTextEncoder.from_pretrained(pipeline_folder)
    assert enc.max_length == 77 and enc.hidden_size == 32
    prompts = ["red cat", "a dog", ""]
    ids = enc.tokenize(prompts)
    assert ids.shape == (3, 77)
    vocab = enc.tokenizer.get_vocab()
    assert ids[0, :4].tolist() == [vocab["<|startoftext|>"], vocab["red</w>"], vocab["cat</w>"], vocab["<|endoftext|>"]]
    assert (ids[0, 4:] == vocab["<|endoftext|>"]).all()  # padded with the pad token (<|endoftext|> here)

    out = enc.encode(prompts)
    assert out.shape == (3, 77, 32) and out.dtype == torch.float32
    # What diffusers' StableDiffusionPipeline.encode_prompt computes: no attention mask, last hidden state.
    model = transformers.CLIPTextModel.from_pretrained(pipeline_folder / "text_encoder")
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out[0], out[1])


def test_truncates_long_prompts_with_a_warning_naming_the_dropped_part(pipeline_folder):
    enc = CLIPTextEncoder.from_pretrained(pipeline_folder)
    vocab = enc.tokenizer.get_vocab()
    fits, too_long = "cat " * 75, "cat " * 75 + "red dog"  # <bos> + 75 tokens + <eos> = 77: the most that fits
    with pytest.warns(UserWarning, match=r"truncated because CLIP can only handle sequences up to 77 tokens: 'red dog'") as record:
        ids = enc.tokenize([fits, too_long])
    assert len(record) == 1  # the prompt that fits warns nothing
    assert ids.shape == (2, 77) and torch.equal(ids[0], ids[1])
    assert ids[1, -2].item() == vocab["cat</w>"] and ids[1, -1].item() == vocab["<|endoftext|>"]
    with pytest.warns(UserWarning, match="up to 77 tokens: 'cat cat"):
        assert enc.encode("cat " * 200).shape == (1, 77, 32)


def test_prompts_that_fit_warn_nothing(pipeline_folder):
    enc = CLIPTextEncoder.from_pretrained(pipeline_folder, max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["red dog", "cat " * 14])
    with pytest.warns(UserWarning, match="up to 16 tokens: 'cat'"):
        enc.encode("cat " * 15)


def test_dtype_and_max_length(pipeline_folder):
    enc = CLIPTextEncoder.from_pretrained(pipeline_folder, dtype=torch.bfloat16, max_length=16)
    out = enc.encode("red dog")
    assert out.shape == (1, 16, 32) and out.dtype == torch.bfloat16


def test_errors(pipeline_folder, tmp_path):
    enc = CLIPTextEncoder.from_pretrained(pipeline_folder)
    with pytest.raises(TypeError, match="prompts"):
        enc.encode(["cat", 3])
    with pytest.raises(ValueError, match="max_length"):
        CLIPTextEncoder(enc.model, enc.tokenizer, max_length=100)
    with pytest.raises(ValueError, match="folder"):
        CLIPTextEncoder.from_pretrained(tmp_path / "absent")


def test_tokenize_is_thread_safe():
    """Pipelines are called from several threads (servers): every call gets its own padded ids,
    though a fast tokenizer keeps its padding/truncation settings in one shared backend."""
    import threading

    from fastdiff.default_model import default_pipeline

    encoder = default_pipeline("generate", "small").text_encoder
    prompts = [f"prompt number {i} " * (1 + i % 7) for i in range(8)]
    expected = {p: encoder.tokenize(p) for p in prompts}
    wrong = []

    def worker(prompt):
        for _ in range(30):
            ids = encoder.tokenize(prompt)
            if ids.shape != expected[prompt].shape or not torch.equal(ids, expected[prompt]):
                wrong.append(prompt)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong

"""fastdiff.EditHead against MGIE's EditMapper (torch.nn.Transformer) with the same weights."""
import warnings

import pytest
import torch
import torch.nn as nn

import fastdiff
from fastdiff.models.checkpoint import CheckpointError
from fastdiff.models.edit_head import EditHead, extract_edit_head_state
from fastdiff import ops
from helpers import FP32_BOUND, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, backend_param, rel_error

# The model composes fastdiff.ops: check it on the reference twins and on the CPU kernels.
BACKENDS = [backend_param("reference"), backend_param("cpp")]

SMALL = dict(llm_dim=96, hidden_dim=64, out_dim=48, num_queries=77, num_heads=4, num_encoder_layers=2,
             num_decoder_layers=3, dim_feedforward=80)


class EditMapper(nn.Module):
    """apple/ml-mgie's EditMapper (mgie_llava.py), with its sizes made configurable."""

    def __init__(self, llm_dim=4096, hidden_dim=512, out_dim=768, num_queries=77, num_heads=4, num_encoder_layers=4,
                 num_decoder_layers=4, dim_feedforward=2048):
        super().__init__()
        self.llm2hid = nn.Linear(llm_dim, hidden_dim)
        self.query = nn.Parameter(torch.randn(1, num_queries, hidden_dim))
        self.mapper = nn.Transformer(batch_first=True, norm_first=True, d_model=hidden_dim, nhead=num_heads,
                                     num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
                                     dim_feedforward=dim_feedforward, dropout=0.0)
        self.hid2feat = nn.Linear(hidden_dim, out_dim)

    def forward(self, llm, emb):
        hid = self.llm2hid(llm + emb)
        hid = self.mapper(hid, self.query.repeat(llm.shape[0], 1, 1))
        return self.hid2feat(hid)


def twin_and_head(sizes, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # nn.Transformer: "enable_nested_tensor is True, but ... norm_first"
        warnings.simplefilter("ignore", UserWarning)
        twin = EditMapper(**sizes).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): perturb them so their weights matter
        for name, p in twin.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    head = EditHead(**sizes)
    head.load_state_dict(twin.state_dict())  # strict: every name of nn.Transformer's state_dict
    return twin, head.eval()


def inputs(batch, sizes, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    llm = torch.randn(batch, 8, sizes["llm_dim"], generator=g, dtype=torch.float64).to(dtype)
    emb = torch.randn(batch, 8, sizes["llm_dim"], generator=g, dtype=torch.float64).to(dtype)
    return llm, emb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_nn_transformer_fp32(batch, backend):
    twin, head = twin_and_head(SMALL)
    llm, emb = inputs(batch, SMALL)
    with torch.no_grad(), ops.use_backend(backend), ops.poison_outputs():
        truth = twin.double()(llm.double(), emb.double())
        out = head(llm, emb)
    assert out.shape == (batch, 77, SMALL["out_dim"]) and out.dtype == torch.float32
    err = rel_error(out, truth)
    assert err <= FP32_BOUND, f"relative error {err:.3e} > {FP32_BOUND}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_nn_transformer_bf16(backend):
    """bf16 weights and inputs: at most 2x the error of the torch twin run in bf16."""
    twin, head = twin_and_head(SMALL)
    llm, emb = inputs(2, SMALL)
    with torch.no_grad(), ops.use_backend(backend), ops.poison_outputs():
        truth = twin.double()(llm.double(), emb.double())
        torch_err = rel_error(twin.bfloat16()(llm.bfloat16(), emb.bfloat16()), truth)
        out = head.bfloat16()(llm.bfloat16(), emb.bfloat16())
    assert out.dtype == torch.bfloat16
    err = rel_error(out, truth)
    bound = max(LOW_PRECISION_FACTOR * torch_err, LOW_PRECISION_FLOOR[torch.bfloat16])
    assert err <= bound, f"bf16 relative error {err:.3e} > {bound:.3e} (torch's own: {torch_err:.3e})"


def test_mgie_sizes_batch_1():
    """MGIE-7B's real sizes (4096 -> 512, 4+4 layers, 77 x 768), shared emb as MGIE passes it."""
    twin, head = twin_and_head({})
    llm, emb = inputs(1, {"llm_dim": 4096})
    with torch.no_grad():
        truth = twin(llm, emb[0].expand(1, -1, -1))
        out = head(llm, emb[0])
    assert out.shape == (1, 77, 768)
    assert rel_error(out, truth) <= FP32_BOUND


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_emb_broadcasts_over_the_batch(backend):
    """MGIE calls the head with a batch of llm and one (1, 8, llm_dim) emb: each row must get
    what it gets alone, and what the torch twin (plain broadcasting) gives."""
    twin, head = twin_and_head(SMALL)
    llm, emb = inputs(3, SMALL)
    shared = emb[:1]  # (1, 8, llm_dim)
    with torch.no_grad(), ops.use_backend(backend):
        out = head(llm, shared)
        rows = torch.cat([head(llm[i:i + 1], shared) for i in range(3)])
        expanded = head(llm, shared.expand(3, -1, -1))
        unbatched = head(llm, shared[0])
        truth = twin.double()(llm.double(), shared.double())
    assert out.shape == (3, 77, SMALL["out_dim"])
    assert torch.equal(out, expanded) and torch.equal(out, unbatched)
    assert rel_error(out, rows) <= FP32_BOUND
    assert rel_error(out, truth) <= FP32_BOUND
    assert not torch.allclose(out[0], out[1])  # the rows differ: llm reaches each of them


def test_dense_products_run_on_ops_linear(monkeypatch):
    """Every product of the head goes through fastdiff.ops.linear (as the other models' do): per
    encoder layer the fused q/k/v, out_proj and the FFN's two; per decoder layer the same plus the
    cross-attention's q and k/v; llm2hid and hid2feat. No nn.Linear module is called."""
    _, head = twin_and_head(SMALL)
    calls = []
    linear = ops.linear
    monkeypatch.setattr(ops, "linear", lambda *args, **kwargs: calls.append(args[1].shape) or linear(*args, **kwargs))
    monkeypatch.setattr(nn.Linear, "forward", lambda *_: pytest.fail("an nn.Linear module was called"))
    head(*inputs(2, SMALL))
    assert len(calls) == 4 * SMALL["num_encoder_layers"] + 7 * SMALL["num_decoder_layers"] + 2


@pytest.mark.parametrize("emb_shape", [(2, 8, 96), (8, 8, 96), (1, 7, 96), (8, 95), (1, 1, 8, 96)])
def test_emb_of_another_batch_or_size_is_refused(emb_shape):
    _, head = twin_and_head(SMALL)
    with pytest.raises(ValueError, match=r"emb: expected \(3, 8, 96\), \(1, 8, 96\) or \(8, 96\)"):
        head(torch.randn(3, 8, 96), torch.randn(*emb_shape))


def test_called_outside_no_grad_it_runs_inference_only():
    """Parameters require grad (a fresh module): forward runs under no_grad, as the pipelines call it."""
    twin, head = twin_and_head(SMALL)
    assert all(p.requires_grad for p in head.parameters()) and torch.is_grad_enabled()
    llm, emb = inputs(2, SMALL)
    out = head(llm, emb)
    assert not out.requires_grad
    with torch.no_grad():
        assert rel_error(out, twin.double()(llm.double(), emb.double())) <= FP32_BOUND
    assert (head.dtype, head.device) == (torch.float32, torch.device("cpu"))
    assert head.bfloat16().dtype == torch.bfloat16


def test_load_from_mllm_pt(tmp_path):
    """mllm.pt as MGIE's extract_ckpt.ipynb writes it: fp16 LLM entries next to `edit_head.*`."""
    twin, _ = twin_and_head(SMALL)
    mllm = {f"edit_head.{k}": v.half() for k, v in twin.state_dict().items()}
    mllm["model.embed_tokens.weight"] = torch.randn(40, SMALL["llm_dim"]).half()
    mllm["lm_head.weight"] = torch.randn(40, SMALL["llm_dim"]).half()
    path = tmp_path / "mllm.pt"
    torch.save(mllm, path)

    head = EditHead.from_mgie(path)
    assert isinstance(head, fastdiff.EditHead)
    assert head.llm2hid.weight.dtype == torch.float32
    for name, value in head.state_dict().items():
        assert torch.equal(value, twin.state_dict()[name].half().float()), name
    llm, emb = inputs(3, SMALL)
    with torch.no_grad():
        twin.load_state_dict({k: v.half().float() for k, v in twin.state_dict().items()})
        assert rel_error(head(llm, emb), twin.double()(llm.double(), emb.double())) <= FP32_BOUND

    nested = {f"model.edit_head.{k[len('edit_head.'):]}" if k.startswith("edit_head.") else k: v for k, v in mllm.items()}
    assert sorted(extract_edit_head_state(nested)) == sorted(twin.state_dict())


def test_load_errors_name_keys():
    twin, _ = twin_and_head(SMALL)
    state = {f"edit_head.{k}": v for k, v in twin.state_dict().items()}
    del state["edit_head.mapper.decoder.layers.1.norm3.bias"]
    state["edit_head.mapper.decoder.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"missing keys.*norm3\.bias.*unexpected keys.*extra\.weight"):
        EditHead.from_mgie(state)
    with pytest.raises(CheckpointError, match="edit_head"):
        EditHead.from_mgie({"lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="llm"):
        EditHead(**SMALL)(torch.randn(1, 8, 5), torch.randn(1, 8, 5))

"""awq_nb.nf4 against the published NF4 table and an independent rounding, on real SmolLM2 weights."""
import math

import numpy as np
import pytest
import torch

from awq_nb import nf4
from awq_nb.arch import find_quantizable, weight_nk
from awq_nb.errors import AwqNbError
from awq_nb.evaluate import model_size_bytes
from tiny_models import tiny_model

# The NF4 code book as printed in the QLoRA paper (Dettmers et al., 2023, appendix E).
PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_levels_are_the_published_table():
    table = nf4.levels()
    assert table.dtype == torch.float32 and table.shape == (16,)
    assert torch.allclose(table, torch.tensor(PUBLISHED), atol=1e-6), (table - torch.tensor(PUBLISHED)).abs().max()


def _nearest_by_midpoints(w: np.ndarray, block: int) -> np.ndarray:
    """NF4 rounding written another way: bucket each scaled weight between the midpoints of the table."""
    table = np.array(PUBLISHED, dtype=np.float64)
    blocks = w.astype(np.float64).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)
    index = np.searchsorted((table[1:] + table[:-1]) / 2, scaled)
    return (table[index] * absmax).reshape(w.shape)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"])
def test_fake_quantize_matches_an_independent_rounding_on_real_weights(smollm2, name):
    model, _ = smollm2
    w = weight_nk(find_quantizable(model)[name]).detach()
    q = nf4.fake_quantize(w)
    assert q.shape == w.shape and q.dtype == w.dtype and not torch.equal(q, w)
    expected = _nearest_by_midpoints(w.numpy(), nf4.BLOCK)
    assert np.allclose(q.numpy(), expected, rtol=1e-6, atol=1e-9)
    # each block keeps its absmax exactly (the levels -1 and 1) and every value is a level times it
    blocks, qb = w.reshape(-1, 64), q.reshape(-1, 64)
    assert torch.equal(qb.abs().amax(1), blocks.abs().amax(1))
    assert torch.equal(nf4.fake_quantize(q), q)  # already on the grid


def test_fake_quantize_keeps_dtype_and_zero_blocks_and_checks_the_block():
    w = torch.zeros(4, 64, dtype=torch.float16)
    w[1] = torch.linspace(-3, 2, 64)
    q = nf4.fake_quantize(w)
    assert q.dtype == torch.float16 and torch.equal(q[0], w[0])
    with pytest.raises(AwqNbError, match="does not split"):
        nf4.fake_quantize(torch.ones(3, 10))


def test_sizes_count_codes_and_absmax():
    assert nf4.linear_bytes(576, 1536) == 576 * 1536 // 2 + 576 * 1536 // 64 * 4
    model = tiny_model("llama", layers=2)
    linears = find_quantizable(model)
    keep = tuple(n for n in linears if n.startswith("model.layers.1."))
    fp = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    packed = [weight_nk(m).numel() for n, m in linears.items() if n not in keep]
    expected = fp - 4 * sum(packed) + sum(n * 4.5 / 8 for n in packed)
    assert model_size_bytes(model, keep=keep, linear_bytes=nf4.linear_bytes) == math.ceil(expected)


def test_load_bitsandbytes_names_the_missing_package(monkeypatch):
    monkeypatch.setattr(nf4.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AwqNbError, match="pip install bitsandbytes"):
        nf4.load_bitsandbytes("smollm2-135m")

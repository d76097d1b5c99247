"""The search maths on plain tensors."""
import math

import pytest
import torch

from awq_nb.quantizer import pseudo_quantize
from awq_nb.search import (
    alpha_grid, apply_clip_, candidate_scales, clip_ratio_grid, gram, gram_diag_blocks, gram_loss,
    scaled_quantized, search_clip, search_scales,
)


def test_gram_loss_equals_direct_output_error():
    torch.manual_seed(0)
    x, w = torch.randn(300, 64), torch.randn(32, 64)
    wq = pseudo_quantize(w, 3, 32)
    direct = float(((x @ wq.T - x @ w.T) ** 2).sum())
    assert gram_loss(wq - w, gram(x)) == __import__("pytest").approx(direct, rel=1e-4)


def test_gram_diag_blocks_match_full_gram():
    x = torch.randn(50, 96)
    full, blocks = gram(x), gram_diag_blocks(x, 32)
    for i in range(3):
        torch.testing.assert_close(blocks[i], full[32 * i : 32 * (i + 1), 32 * i : 32 * (i + 1)])


def test_candidate_scales_normalised_and_alpha0_is_rtn():
    x = torch.rand(64) * 10 + 0.01
    s = candidate_scales(x, 0.5)
    assert math.isclose(float(s.max() * s.min()), 1.0, rel_tol=1e-4)
    assert torch.allclose(candidate_scales(x, 0.0), torch.ones(64))
    w = torch.randn(8, 64)
    assert torch.equal(scaled_quantized(w, candidate_scales(x, 0.0), 4, 32, True), pseudo_quantize(w, 4, 32))


def test_scale_search_picks_argmin_and_skips_nonfinite():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.linspace(0.1, 8, 64)  # a few channels carry large activations
    w = torch.randn(16, 64)
    sigma = gram(x)
    x_mean = x.abs().mean(0)
    calls = []

    def loss(eff, bound=math.inf):
        calls.append(1)
        if len(calls) == 3:
            return float("nan"), True  # a broken candidate must be skipped, not chosen or raised
        return gram_loss(eff[0] - w, sigma), True

    alphas, losses, best, s, pruned = search_scales(x_mean, [w], loss, 3, 32, True, n_grid=10)
    assert alphas == alpha_grid(10) and len(losses) == 10 and not any(pruned)
    assert sum(l == math.inf for l in losses) == 1
    finite = [l for l in losses if math.isfinite(l)]
    assert best == alphas[losses.index(min(finite))]
    assert min(finite) < losses[0], "activation-aware scales should beat RTN on outlier channels"
    torch.testing.assert_close(s, candidate_scales(x_mean, best))


def test_clip_search_never_worse_and_applies():
    torch.manual_seed(1)
    x = torch.randn(400, 128)
    w = torch.randn(24, 128)
    w[0, 5] = 12.0  # an outlier weight: clipping should help its group
    ratios = clip_ratio_grid(20, 0.5)
    assert ratios[0] == 1.0 and len(ratios) == 10 and ratios[-1] > 0.5
    max_val, best_r, before, after, min_val, _ = search_clip(w, gram_diag_blocks(x, 64), 3, 64, True, ratios, chunk=7)
    assert max_val.shape == (24, 2) and after <= before and min_val is None
    assert best_r[0, 0] < 1.0
    wc = w.clone()
    apply_clip_(wc, max_val, 64)
    assert float(wc.abs().max()) <= float(max_val.max()) + 1e-6
    err = lambda v: gram_loss(pseudo_quantize(v, 3, 64) - w, gram(x))  # noqa: E731
    assert err(wc) < err(w)
    # the reported loss is that of the weights apply_clip_ gives, summed per group as searched
    d = (pseudo_quantize(wc, 3, 64) - w).reshape(24, 2, 64)
    assert float(torch.einsum("ngi,gij,ngj->", d, gram_diag_blocks(x, 64), d)) == pytest.approx(after, rel=1e-4)


def test_asymmetric_clip_search_shrinks_each_end_on_its_own_and_is_never_worse():
    # One large positive weight per group makes its two ends unlike: a shared ratio must shrink
    # both by the same factor, separate ratios shrink each as far as it pays.
    torch.manual_seed(3)
    x = torch.randn(512, 128)
    w = torch.randn(32, 128) * 0.5
    w[:, ::64] = 4.0  # the first weight of every group
    sig = gram_diag_blocks(x, 64)
    ratios = clip_ratio_grid(20, 0.5)
    shared = search_clip(w, sig, 3, 64, True, ratios, chunk=8)
    apart = search_clip(w, sig, 3, 64, True, ratios, chunk=8, asym=True)
    assert apart.loss_before == pytest.approx(shared.loss_before, rel=1e-6)
    assert apart.loss_after < shared.loss_after  # the pairs include every shared ratio
    assert apart.min_val.shape == apart.max_val.shape == (32, 2)
    assert float((apart.ratios != apart.min_ratios).float().mean()) > 0.5  # most groups: two different ratios
    # the loss reported is that of the weights apply_clip_ then gives (summed per group, as searched)
    wc = w.clone()
    apply_clip_(wc, apart.max_val, 64, apart.min_val)
    assert float((wc.reshape(32, 2, 64).amax(-1) - apart.max_val).abs().max()) < 1e-6
    d = (pseudo_quantize(wc, 3, 64) - w).reshape(32, 2, 64)
    per_group = torch.einsum("ngi,gij,ngj->", d, sig, d)
    assert float(per_group) == pytest.approx(apart.loss_after, rel=1e-4)
    # without a zero point the quantizer only sees max |w|: asym falls back to the shared search
    sym = search_clip(w, sig, 3, 64, False, ratios, chunk=8, asym=True)
    assert sym.min_val is None


def test_cross_group_clip_refinement_lowers_the_full_output_error():
    # Channels sharing a common component (as real activations do) correlate across groups, so the
    # full error sum_n d_n^T Sigma d_n has cross-group terms that a per-group search ignores.
    torch.manual_seed(4)
    x = torch.randn(2048, 256) + torch.randn(2048, 1)
    x[:, :3] *= 10
    w = torch.randn(48, 256) * 0.1
    sig = gram(x)
    blocks = gram_diag_blocks(x, 64)
    ratios = clip_ratio_grid(20, 0.5)

    def full_err(found):
        wc = w.clone()
        apply_clip_(wc, found.max_val, 64, found.min_val)
        d = pseudo_quantize(wc, 3, 64) - w
        return gram_loss(d, sig)

    per_group = search_clip(w, blocks, 3, 64, True, ratios, chunk=16, asym=True)
    cross = search_clip(w, sig, 3, 64, True, ratios, chunk=16, asym=True)
    assert full_err(cross) < 0.97 * full_err(per_group)
    assert cross.loss_after == pytest.approx(full_err(cross), rel=1e-4)  # reported on the full Gram
    assert cross.loss_before == pytest.approx(gram_loss(pseudo_quantize(w, 3, 64) - w, sig), rel=1e-4)
    # with no cross-group correlation there is nothing to gain: the per-group choice is kept
    block_diag = torch.block_diag(*blocks)
    same = search_clip(w, block_diag, 3, 64, True, ratios, chunk=16, asym=True)
    assert torch.equal(same.ratios, per_group.ratios) and torch.equal(same.min_ratios, per_group.min_ratios)


def test_pruned_scale_search_is_exact_and_stops_losers_early():
    # loss = sum over 16 "sequences" of non-negative errors; with prune=True a candidate may stop
    # once its partial sum passes the bound, and the search must still return the full-grid argmin.
    torch.manual_seed(2)
    xs = [torch.randn(64, 64) * torch.linspace(0.1, 8, 64) for _ in range(16)]
    w = torch.randn(16, 64)
    sigmas = [gram(x) for x in xs]
    x_mean = torch.cat(xs).abs().mean(0)
    summed = {"full": 0, "pruned": 0}

    def loss(eff, bound=math.inf, mode="full"):
        total = 0.0
        for j, sig in enumerate(sigmas):
            total += gram_loss(eff[0] - w, sig)
            summed[mode] += 1
            if total > bound:
                break
        return total, j == len(sigmas) - 1

    full = search_scales(x_mean, [w], lambda e, b=math.inf: loss(e, b, "full"), 3, 32, True, n_grid=20)
    fast = search_scales(x_mean, [w], lambda e, b=math.inf: loss(e, b, "pruned"), 3, 32, True, n_grid=20,
                         prune=True, first_alpha=full[2])
    assert fast[2] == full[2]
    torch.testing.assert_close(fast[3], full[3])
    assert not fast[4][0] and fast[1][0] == full[1][0], "alpha = 0 (RTN) is always measured in full"
    for lf, lp, cut in zip(full[1], fast[1], fast[4]):
        if cut:
            assert min(full[1]) < lp < lf, "a pruned loss is a lower bound above the best"
        else:
            assert lp == pytest.approx(lf, rel=1e-12)
    assert any(fast[4]) and summed["pruned"] < summed["full"]


def test_scale_search_breaks_ties_towards_the_smaller_alpha():
    x_mean = torch.rand(64) + 0.5
    w = torch.randn(8, 64)
    flat = lambda eff, bound=math.inf: (1.0, True)  # noqa: E731  every candidate equally good
    for prune in (False, True):
        _, losses, best, s, pruned = search_scales(x_mean, [w], flat, 4, 32, True, n_grid=10, prune=prune, first_alpha=0.7)
        assert best == 0.0 and not any(pruned)
        torch.testing.assert_close(s, candidate_scales(x_mean, 0.0))


def test_row_gram_gives_the_searches_what_the_matrix_gives():
    # With fewer tokens than channels the trace keeps X instead of X^T X (RowGram). Every use the
    # searches make of a Gram matrix must give the same numbers from the rows: losses, diagonal
    # blocks, unscaling, the clip search with its cross-group sweeps, and the dense form GPTQ takes.
    from awq_nb.rounding import round_weight
    from awq_nb.search import RowGram, as_dense, gram_blocks, gram_rows, unscale_gram_, unscaled_gram

    torch.manual_seed(5)
    x = torch.randn(96, 256) + torch.randn(96, 1)  # 96 tokens < 256 channels
    x[:, :3] *= 10
    w = torch.randn(48, 256) * 0.1
    rows, dense = RowGram(x.clone()), gram(x)
    d = pseudo_quantize(w, 3, 64) - w
    assert gram_loss(d, rows) == pytest.approx(gram_loss(d, dense), rel=1e-4)
    torch.testing.assert_close(d @ rows, d @ dense, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gram_blocks(rows, 64), gram_blocks(dense, 64), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gram_rows(d[:, 64:128], rows, slice(64, 128)), d[:, 64:128] @ dense[64:128, :], rtol=1e-4, atol=1e-3)
    ratios = clip_ratio_grid(20, 0.5)
    a = search_clip(w, rows, 3, 64, True, ratios, chunk=16, asym=True)
    b = search_clip(w, dense, 3, 64, True, ratios, chunk=16, asym=True)
    assert (a.ratios == b.ratios).float().mean() > 0.98 and (a.min_ratios == b.min_ratios).float().mean() > 0.98
    assert a.loss_after == pytest.approx(b.loss_after, rel=1e-3)
    s = torch.rand(256) + 0.5
    torch.testing.assert_close(as_dense(unscaled_gram(rows, s)), unscaled_gram(dense, s), rtol=1e-4, atol=1e-3)
    assert unscale_gram_(rows, s) is rows
    torch.testing.assert_close(as_dense(rows), unscaled_gram(dense, s), rtol=1e-4, atol=1e-3)
    g1 = round_weight("gptq", w * s, 4, 64, gram=rows)
    g2 = round_weight("gptq", w * s, 4, 64, gram=unscaled_gram(dense, s))
    assert (g1.codes == g2.codes).float().mean() > 0.99

"""The rounding step (awq_nb/rounding): one interface, RTN and GPTQ, and codes that travel unchanged
from the search to fake quantization, WQLinear and the checkpoint."""
import copy

import pytest
import torch

import awq_nb
from awq_nb.arch import find_quantizable, weight_nk
from awq_nb.checkpoint import load_quantized, save_quantized
from awq_nb.errors import AwqNbError
from awq_nb.packing import unpack_linear
from awq_nb.quantizer import pseudo_quantize, quant_params
from awq_nb.rounding import ROUNDERS, Rounder, from_int_codes, round_weight
from awq_nb.rounding.gptq import DAMP, DESCENT, SHRINK, conditioned, round_weight as gptq_codes
from awq_nb.wqlinear import WQLinear
from tiny_models import tiny_model


def _correlated(n=48, k=128, tokens=600, seed=0):
    """A weight and inputs whose channels move together, as real activations do."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix * torch.linspace(0.2, 3.0, k)
    return w, x


def _output_error(x, w, wq):
    return float(((x @ (wq - w).T) ** 2).sum())


def _obq_reference(w, h, scale, zero, bits, group_size, damp=DAMP, order=None, shrink=SHRINK):
    """GPTQ's greedy pass written the slow, direct way (float64): round column j, spread its error
    over the columns not yet rounded with the inverse Hessian, then remove column j from the
    inverse by a Schur complement. No Cholesky, no blocks, no permuted copies: ``order`` (default
    natural) is the order the columns are visited in, each on its own group's grid and stored in
    its own place."""
    w = w.double().clone()
    h = h.double().clone()
    h.diagonal().mul_(1.0 + shrink)
    h.diagonal()[h.diagonal() <= 0] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    hinv = torch.linalg.inv(h)
    n, k = w.shape
    order = list(range(k)) if order is None else [int(j) for j in order]
    q = torch.empty(n, k, dtype=torch.int32)
    for t, j in enumerate(order):
        later = order[t + 1:]
        s, z = scale[:, j // group_size].double(), zero[:, j // group_size].double()
        qj = (torch.round(w[:, j] / s) + z).clamp(0, 2**bits - 1)
        q[:, j] = qj.int()
        err = (w[:, j] - (qj - z) * s) / hinv[j, j]
        w[:, later] -= err[:, None] * hinv[j, later][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q


def test_rtn_rounding_is_the_quantizer():
    w, _ = _correlated()
    r = round_weight("rtn", w, 4, 32)
    scale, zero = quant_params(w, 4, 32)
    assert torch.equal(r.scale, scale) and torch.equal(r.zero, zero) and r.codes.dtype == torch.uint8
    assert torch.equal(r.dequantize(), pseudo_quantize(w, 4, 32))
    sym = round_weight("rtn", w, 3, 32, zero_point=False)
    assert torch.equal(sym.dequantize(), pseudo_quantize(w, 3, 32, zero_point=False))


def test_gptq_matches_the_direct_greedy_pass_and_lowers_the_output_error():
    w, x = _correlated()
    h = x.T @ x
    scale, zero = quant_params(w, 4, 32)
    q = gptq_codes(w, scale, zero, 4, 32, h, act_order=False, descent=0)
    ref = _obq_reference(w, h, scale, zero, 4, 32)
    assert (q != ref).float().mean() < 0.005  # fp32 vs float64: a few ties at .5 may round apart
    r = round_weight("gptq", w, 4, 32, gram=h)
    assert torch.equal(r.int_codes(), gptq_codes(w, scale, zero, 4, 32, h))  # the default order
    q = r.int_codes()
    assert int(q.min()) >= 0 and int(q.max()) <= 15  # on the fixed grid
    assert torch.equal(r.scale, scale) and torch.equal(r.zero, zero)
    rtn = _output_error(x, w, pseudo_quantize(w, 4, 32))
    gptq = _output_error(x, w, r.dequantize())
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_act_order_visits_columns_by_input_energy_on_the_static_grid():
    # Act-order with static groups: the columns are visited in descending diag(H), each on its own
    # group's fixed scale and zero, and each code stays in its own column (no g_idx to ship).
    w, x = _correlated(k=96, seed=1)
    x = x[:, torch.randperm(96, generator=torch.Generator().manual_seed(2))]  # energy not sorted by column
    h = x.T @ x
    scale, zero = quant_params(w, 3, 32)
    q = gptq_codes(w, scale, zero, 3, 32, h, act_order=True, block=32, descent=0)
    order = torch.argsort(h.diagonal(), descending=True)
    assert not torch.equal(order, torch.arange(96))
    ref = _obq_reference(w, h, scale, zero, 3, 32, order=order)
    assert (q != ref).float().mean() < 0.005
    assert (q != _obq_reference(w, h, scale, zero, 3, 32)).float().mean() > 0.05  # the order matters
    assert int(q.min()) >= 0 and int(q.max()) <= 7
    wq = (q.float() - zero.repeat_interleave(32, dim=1)) * scale.repeat_interleave(32, dim=1)  # the gemm format's reading
    assert _output_error(x, w, wq) < 0.8 * _output_error(x, w, pseudo_quantize(w, 3, 32))


def test_a_shared_gram_is_factorised_once(monkeypatch):
    # q/k/v (and gate/up) read one input: the engine hands them one Gram tensor and one ``factors``
    # dict, so its inverse factor is computed once, and the codes are those computed without it.
    import awq_nb.rounding.gptq as gptq

    _, x = _correlated()
    h = x.T @ x
    weights = [_correlated(seed=s)[0] for s in (3, 4, 5)]
    alone = [round_weight("gptq", w, 4, 32, gram=h) for w in weights]
    calls = []
    real = gptq.inverse_factor
    monkeypatch.setattr(gptq, "inverse_factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    factors = {}
    shared = [round_weight("gptq", w, 4, 32, gram=h, factors=factors) for w in weights]
    assert len(calls) == 1
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(alone, shared))
    h.mul_(2.0)  # changed in place (as the engine's unscaling does): factorised again
    round_weight("gptq", weights[0], 4, 32, gram=h, factors=factors)
    assert len(calls) == 2


def _objective(w, wq, h):
    e = (w - wq).double()
    return float(((e @ h.double()) * e).sum())


def _descent_reference(w, q, scale, zero, bits, group_size, h, order, sweeps):
    """Coordinate descent written the slow, direct way (float64): one weight at a time, each set to
    the grid point nearest its optimum with every other weight held, the residual recomputed."""
    w, h = w.double(), h.double()
    s = scale.double().repeat_interleave(group_size, dim=1)
    z = zero.double().repeat_interleave(group_size, dim=1)
    q = q.double().clone()
    for _ in range(sweeps):
        for c in [int(j) for j in order]:
            e = w - (q - z) * s
            best = (q[:, c] - z[:, c]) * s[:, c] + (e @ h[:, c]) / h[c, c]
            q[:, c] = (torch.round(best / s[:, c]) + z[:, c]).clamp(0, 2**bits - 1)
    return q.int()


def test_descent_after_the_column_pass_lowers_gptqs_objective_on_the_same_grid():
    # After GPTQ's greedy pass, each sweep of coordinate descent sets every column, in turn, to the
    # grid point nearest its optimum given all the others: the objective tr(E H E^T) GPTQ minimises
    # never rises (here it settles after two sweeps), the grid (scale, zero, 0..15) stays, and the codes are those of the
    # slow one-weight-at-a-time reference.
    w, x = _correlated(n=32, k=96, seed=3)
    h = x.T @ x
    hc = conditioned(h)
    scale, zero = quant_params(w, 4, 32)
    deq = lambda q: from_int_codes(q, scale, zero, 4, 32, "gptq").dequantize()  # noqa: E731
    sweeps = [gptq_codes(w, scale, zero, 4, 32, h, descent=d, block=32) for d in range(4)]
    objectives = [_objective(w, deq(q), hc) for q in sweeps]
    assert DESCENT > 0
    assert all(b <= a for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[1] < 0.99 * objectives[0] and objectives[2] < objectives[1], objectives
    assert all(int(q.min()) >= 0 and int(q.max()) <= 15 for q in sweeps)
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    ref = _descent_reference(w, sweeps[0], scale, zero, 4, 32, hc, order, 2)
    assert (sweeps[2] != ref).float().mean() < 0.005  # fp32 vs float64: a few ties may round apart
    assert (sweeps[2] != sweeps[0]).float().mean() > 0.01  # it moved codes
    assert torch.equal(round_weight("gptq", w, 4, 32, gram=h).int_codes(),
                       gptq_codes(w, scale, zero, 4, 32, h, descent=DESCENT))  # the default


def test_gptq_after_clipping_aims_at_the_unclipped_weight():
    # The grid is the clipped weight's; the codes aim at the weight before clipping, so the error
    # clipping adds is compensated like any rounding error.
    w, x = _correlated()
    h = x.T @ x
    wc = w.clamp(-1.5, 1.5)
    aimed = round_weight("gptq", wc, 3, 32, gram=h, target=w)
    plain = round_weight("gptq", wc, 3, 32, gram=h)
    scale, zero = quant_params(wc, 3, 32)
    assert torch.equal(aimed.scale, scale) and torch.equal(aimed.zero, zero)
    assert _output_error(x, w, aimed.dequantize()) < 0.95 * _output_error(x, w, plain.dequantize())
    with pytest.raises(AwqNbError, match="differ in shape"):
        round_weight("gptq", wc, 3, 32, gram=h, target=w[:, :64])


def test_shrinking_the_gram_trades_fit_on_the_calibration_tokens_for_fit_on_new_ones():
    # When the Gram matrix's correlations carry over only in part to new tokens (here: a sample of
    # barely more tokens than inputs), GPTQ's error feedback fits the calibration tokens. Raising
    # the diagonal (SHRINK) gives up some error on them and gains more on tokens it has not seen.
    w, x = _correlated(n=64, k=128, tokens=160 + 4000, seed=1)
    seen, new = x[:160], x[160:]
    h = seen.T @ seen
    scale, zero = quant_params(w, 4, 32)
    plain = from_int_codes(gptq_codes(w, scale, zero, 4, 32, h, shrink=0.0), scale, zero, 4, 32, "gptq").dequantize()
    shrunk = from_int_codes(gptq_codes(w, scale, zero, 4, 32, h), scale, zero, 4, 32, "gptq").dequantize()
    assert SHRINK > 0
    assert _output_error(seen, w, shrunk) > 1.1 * _output_error(seen, w, plain)
    assert _output_error(new, w, shrunk) < 0.95 * _output_error(new, w, plain)
    assert _output_error(new, w, shrunk) < 0.9 * _output_error(new, w, pseudo_quantize(w, 4, 32))


def test_gptq_blocks_are_exact_and_uncorrelated_inputs_round_to_nearest():
    w, x = _correlated(k=96)
    h = x.T @ x
    scale, zero = quant_params(w, 4, 32)
    one = gptq_codes(w, scale, zero, 4, 32, h, block=96)
    small = gptq_codes(w, scale, zero, 4, 32, h, block=16)  # lazy updates across 6 blocks
    assert (one != small).float().mean() < 0.005
    diag = torch.diag(h.diagonal())  # no correlation: nothing to push, every column rounds to nearest
    assert torch.equal(gptq_codes(w, scale, zero, 4, 32, diag), round_weight("rtn", w, 4, 32).int_codes())


def test_gptq_survives_dead_channels_and_needs_a_gram():
    w, x = _correlated(k=64)
    x[:, 5] = 0  # a channel that never fires
    r = round_weight("gptq", w, 4, 32, gram=x.T @ x)
    assert torch.isfinite(r.dequantize()).all()
    with pytest.raises(AwqNbError, match="Gram matrix"):
        round_weight("gptq", w, 4, 32)
    with pytest.raises(AwqNbError, match="choose one of"):
        awq_nb.AWQConfig(rounding="gtpq")


def _calib(n=4, t=32, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def test_gptq_search_codes_reach_fake_quant_wqlinear_and_the_checkpoint(tmp_path):
    model = tiny_model("llama", layers=2)
    cfg = awq_nb.AWQConfig(w_bit=4, group_size=32, n_grid=4, clip_grid=4, rounding="gptq",
                           modules_to_not_convert=["layers.1.mlp.down_proj"])
    result = awq_nb.search(model, _calib(), cfg, progress=lambda *a: None)
    quantized = {n for n in find_quantizable(model) if "layers.1.mlp.down_proj" not in n}
    assert set(result.rounded) == quantized
    errs = result.layer_errors
    assert all(set(errs[n]) == {"rtn", "awq", "awq_rtn"} for n in quantized)
    assert sum(e["awq"] for e in errs.values()) < sum(e["awq_rtn"] for e in errs.values())
    awq_nb.apply_awq(model, result)
    shipped = copy.deepcopy(model)
    fq = awq_nb.fake_quantize(copy.deepcopy(model), cfg, keep=result.config["modules_to_not_convert"],
                              rounded=result.rounded)
    rtn = awq_nb.fake_quantize(copy.deepcopy(model), awq_nb.AWQConfig(**{**result.config, "rounding": "rtn"}))
    differs = 0
    for name in quantized:
        r = result.rounded[name]
        assert torch.equal(weight_nk(fq.get_submodule(name)), r.dequantize())
        differs += not torch.equal(weight_nk(rtn.get_submodule(name)), r.dequantize())
        wq = WQLinear.from_linear(model.get_submodule(name), 4, 32, rounded=r)
        q, _, zero = unpack_linear(wq.qweight, wq.qzeros, wq.scales, 32)
        assert torch.equal(q, r.int_codes()) and torch.equal(zero, r.zero.int())
    assert differs == len(quantized)  # GPTQ moved codes in every layer
    out = save_quantized(shipped, None, tmp_path / "ck", cfg, rounded=result.rounded)
    loaded, _ = load_quantized(out)
    for name in quantized:
        m = loaded.get_submodule(name)
        q, _, _ = unpack_linear(m.qweight, m.qzeros, m.scales, 32)
        assert torch.equal(q, result.rounded[name].int_codes()), name


def test_gptq_without_its_codes_is_an_error_not_a_silent_rtn(tmp_path):
    model = tiny_model("llama", layers=2)
    cfg = awq_nb.AWQConfig(group_size=32, n_grid=2, clip_grid=4, rounding="gptq")
    result = awq_nb.search(model, _calib(), cfg, progress=lambda *a: None)
    result.save(tmp_path / "r.safetensors")
    loaded = awq_nb.AWQResult.load(tmp_path / "r.safetensors")  # scales and clips only
    assert loaded.rounded == {} and loaded.config["rounding"] == "gptq"
    awq_nb.apply_awq(model, loaded)
    with pytest.raises(AwqNbError, match="rounded=result.rounded"):
        awq_nb.fake_quantize(copy.deepcopy(model), cfg)
    with pytest.raises(AwqNbError, match="rounded=result.rounded"):
        save_quantized(model, None, tmp_path / "ck", cfg)
    assert not (tmp_path / "ck").exists()  # nothing half-written
    codes = result.rounded["model.layers.0.mlp.down_proj"]  # [64, 128]: not a [32, 64] Linear's
    with pytest.raises(AwqNbError, match="another search"):
        WQLinear.from_linear(torch.nn.Linear(64, 32), 4, 32, rounded=codes)


def test_a_new_rounding_method_is_one_registry_entry(monkeypatch):
    def toward_zero_point(w, scale, zero, bits, group_size, gram=None):  # a deliberately odd method
        n, k = w.shape
        return zero.repeat_interleave(group_size, dim=1).to(torch.int32).expand(n, k).clone()

    monkeypatch.setitem(ROUNDERS, "zero", Rounder(toward_zero_point, False, "every weight to 0"))
    model = tiny_model("llama", layers=1)
    cfg = awq_nb.AWQConfig(group_size=32, rounding="zero")
    awq_nb.fake_quantize(model, cfg)
    for name, m in find_quantizable(model).items():
        assert float(weight_nk(m).abs().max()) == 0.0, name

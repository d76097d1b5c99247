"""awq_nb.compare: each row against the same method run by hand on a tiny random Llama."""
import copy
import math
from dataclasses import replace

import pytest
import torch

import awq_nb
from awq_nb.arch import find_quantizable, weight_nk
from awq_nb.compare import compare_methods, format_table, method_label
from awq_nb.errors import AwqNbError
from awq_nb.evaluate import perplexity
from tiny_models import tiny_model

CONFIG = awq_nb.AWQConfig(w_bit=3, group_size=32, n_grid=4, clip_grid=4, search_samples=2,
                          modules_to_not_convert=["model.layers.1."])


def _tokens(n, t, seed):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _silent(*args):
    pass


def test_each_row_is_the_method_run_by_hand():
    model = tiny_model("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib, windows = _tokens(4, 32, 0), _tokens(2, 40, 1)
    seen, descs = {}, []
    rows = compare_methods(model, None, [CONFIG], methods=("fp", "rtn", "awq", "awq+gptq"), calib=calib,
                           windows=windows, progress=lambda d, t, desc="": descs.append(desc), log=None,
                           on_model=lambda row, m, result: seen.setdefault(row["method"], (m, result)))
    assert [r["method"] for r in rows] == ["fp", "rtn", "awq", "awq+gptq"]
    assert [r["config"] for r in rows] == ["fp32", "w3g32", "w3g32", "w3g32"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"compare_methods modified {k}"

    rtn = awq_nb.fake_quantize(copy.deepcopy(model), CONFIG)
    by_hand = {"fp": model, "rtn": rtn}
    for method, rounding in (("awq", "rtn"), ("awq+gptq", "gptq")):
        by_hand[method] = copy.deepcopy(model)
        awq_nb.quantize(by_hand[method], None, replace(CONFIG, rounding=rounding), calib=calib, progress=_silent)
        assert seen[method][1].config["rounding"] == rounding
    for row in rows:
        expected = perplexity(by_hand[row["method"]], windows=windows)["perplexity"]
        assert math.isclose(row["perplexity"], expected, rel_tol=1e-6), row
        assert (row["windows"], row["tokens"]) == (2, 2 * 39)
    assert seen["fp"] == (model, None) and seen["rtn"][1] is None
    assert torch.equal(weight_nk(find_quantizable(seen["awq"][0])["model.layers.0.mlp.down_proj"]),
                       weight_nk(find_quantizable(by_hand["awq"])["model.layers.0.mlp.down_proj"]))

    # sizes: the Linears of block 1 stay in floating point and count as such
    kept = [n for n in find_quantizable(model) if n.startswith("model.layers.1.")]
    fp_bytes = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    expected_q = fp_bytes
    for name, m in find_quantizable(model).items():
        if name not in kept:  # 3-bit codes, an fp16 scale and a 3-bit zero per group of 32
            numel = weight_nk(m).numel()
            expected_q += -4 * numel + math.ceil(numel * 3 / 8) + (numel // 32) * 2 + math.ceil(numel // 32 * 3 / 8)
    assert rows[0]["size_bytes"] == fp_bytes and all(r["size_bytes"] == expected_q for r in rows[1:])
    assert rows[0]["search_seconds"] is None and rows[2]["search_seconds"] > 0
    assert any(d.startswith("awq+gptq w3g32: ") for d in descs)
    assert any(d.startswith("rtn w3g32 perplexity: ") for d in descs)


def test_methods_are_checked_before_any_work():
    model = tiny_model("llama", layers=1)
    called = []
    with pytest.raises(AwqNbError, match="unknown method 'nf4'"):
        compare_methods(model, None, [CONFIG], methods=("fp", "nf4"), windows=_tokens(1, 16, 0), log=None,
                        on_model=lambda *a: called.append(a))
    with pytest.raises(AwqNbError, match="gptq"):  # the error lists the roundings there are
        compare_methods(model, None, [CONFIG], methods=("fp", "awq+magic"), windows=_tokens(1, 16, 0), log=None,
                        on_model=lambda *a: called.append(a))
    assert not called


def test_method_label_names_what_ran():
    gptq = replace(CONFIG, rounding="gptq")
    assert [method_label(m, CONFIG) for m in ("fp", "rtn", "awq", "awq+rtn", "awq+gptq")] == [
        "fp", "rtn", "awq", "awq", "awq+gptq"]
    assert method_label("awq", gptq) == "awq+gptq" and method_label("awq+rtn", gptq) == "awq"


def test_format_table_signs_the_gap_to_fp():
    rows = [{"method": "fp", "config": "fp32", "perplexity": 10.0, "size_bytes": 2e6, "search_seconds": None},
            {"method": "rtn", "config": "w4g64", "perplexity": 12.25, "size_bytes": 1e6, "search_seconds": None},
            {"method": "awq", "config": "w4g64", "perplexity": 9.5, "size_bytes": 1e6, "search_seconds": 3.4}]
    lines = format_table(rows).splitlines()
    assert lines[3] == "| rtn | w4g64 | 12.250 | +2.250 | 1.0 |  |"
    assert lines[4] == "| awq | w4g64 | 9.500 | -0.500 | 1.0 | 3 |"

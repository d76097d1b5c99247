"""Each plot returns a Figure whose artists hold exactly the data it was given.

Records are synthetic but shaped like a SmolLM2 run: K=576 channels with a handful of outliers,
four scaling groups per block (one skipped under GQA), convex loss-vs-alpha curves.
"""
import math

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from awq_nb import viz
from awq_nb.errors import AwqNbError
from awq_nb.results import AWQResult, ChannelStats, ClipRecord, ScaleRecord

K = 576
ALPHAS = [i / 20 for i in range(20)]
GROUPS = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn"),
    ("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"),
    ("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj"),
]


def _stats(k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean_abs = torch.rand(k, generator=g) * 0.2 + 0.05
    mean_abs[torch.randperm(k, generator=g)[:5]] *= 40  # outlier channels
    return ChannelStats(mean_abs=mean_abs, max_abs=mean_abs * 6, tokens=1024)


def _scale_records(n_blocks=3, skip=(1, 1)):
    recs = []
    for b in range(n_blocks):
        for gi, (prev, layers, inspect) in enumerate(GROUPS):
            if (b, gi) == skip:
                continue
            best = ALPHAS[(3 + 2 * b + 3 * gi) % 20]
            losses = [1e-3 * (1 + (a - best) ** 2) for a in ALPHAS]
            losses[-1] = float("inf")  # a skipped candidate
            if best == ALPHAS[-1]:
                losses[-1] = 1e-3
            recs.append(ScaleRecord(b, prev, layers, inspect, ALPHAS, losses, best, torch.ones(K)))
    return recs


def _clips(n_blocks=3):
    out = []
    for b in range(n_blocks):
        for name in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            ratios = torch.full((8, 9), 1.0)
            ratios[0, :3] = 0.85 - 0.05 * b
            rec = ClipRecord(b, name, torch.ones(8, 9), ratios, [1 - i / 40 for i in range(20)], 2.0, 1.5)
            if b == 2:  # min and max searched apart: both ends' ratios are plotted
                rec.min_val, rec.min_ratios = -torch.ones(8, 9), torch.full((8, 9), 0.9)
            out.append(rec)
    return out


def _layer_errors(n_blocks=3):
    return {f"model.layers.{b}.{name}": {"rtn": 1e-3 * (b + 1), "awq": 6e-4 * (b + 1)}
            for b in range(n_blocks)
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def _gid(ax, gid, kind=None):
    arts = [a for a in ax.get_children() if getattr(a, "get_gid", lambda: None)() == gid]
    return [a for a in arts if kind is None or isinstance(a, kind)]


def test_channel_saliency_marks_top_one_percent():
    st = _stats()
    fig = viz.plot_channel_saliency(st, name="model.layers.0.mlp.down_proj")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    (sal,) = _gid(ax, "salient", PathCollection)
    offs = sal.get_offsets()
    assert len(offs) == math.ceil(0.01 * K) == 6
    top = set(torch.topk(st.mean_abs, 6).indices.tolist())
    assert set(int(x) for x in offs[:, 0]) == top
    (line,) = _gid(ax, "data")
    np.testing.assert_allclose(line.get_ydata(), st.mean_abs.numpy(), rtol=1e-6)


def test_plots_draw_into_a_given_ax():
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    assert viz.plot_channel_saliency(_stats(), ax=ax2) is fig
    assert len(_gid(ax2, "salient")) == 1 and not _gid(ax1, "salient")


def test_weight_vs_activation():
    st = _stats()
    w = torch.randn(64, K)
    fig = viz.plot_weight_vs_activation(st, w)
    ax = fig.axes[0]
    (data,) = _gid(ax, "data", PathCollection)
    np.testing.assert_allclose(data.get_offsets()[:, 1], w.abs().mean(0).numpy(), rtol=1e-5)
    assert len(_gid(ax, "salient")[0].get_offsets()) == 6
    with pytest.raises(AwqNbError, match="same Linear"):
        viz.plot_weight_vs_activation(st, torch.randn(64, K + 1))


def test_quant_error_before_after():
    before, after = torch.rand(K) + 0.5, torch.rand(K) * 0.5 + 0.1
    fig = viz.plot_quant_error(before, after, stats=_stats())
    lines = _gid(fig.axes[0], "data")
    assert len(lines) == 2
    np.testing.assert_allclose(lines[1].get_ydata(), after.numpy(), rtol=1e-6)
    with pytest.raises(AwqNbError):
        viz.plot_quant_error(before, after[:-1])


def test_alpha_search_one_block():
    recs = _scale_records()
    fig = viz.plot_alpha_search(recs, block=0)
    ax = fig.axes[0]
    block0 = [r for r in recs if r.block == 0]
    assert len(_gid(ax, "data")) == len(block0) == 4
    (best,) = _gid(ax, "best_alpha")
    np.testing.assert_allclose(best.get_offsets()[:, 0], [r.best_alpha for r in block0])
    np.testing.assert_allclose(best.get_offsets()[:, 1], 1 / (1 + np.array([r.best_alpha for r in block0]) ** 2), rtol=1e-6)
    assert ax.get_legend() is not None


def test_alpha_search_all_blocks_and_empty_selection():
    recs = _scale_records()
    fig = viz.plot_alpha_search(recs, relative=False)
    assert len(_gid(fig.axes[0], "data")) == len(recs) == 11
    with pytest.raises(AwqNbError, match="block 7"):
        viz.plot_alpha_search(recs, block=7)


def test_alpha_heatmap_grid_and_skipped_group():
    recs = _scale_records()
    fig = viz.plot_alpha_heatmap(AWQResult(config={}, scales=recs))
    ax = fig.axes[0]
    m = np.asarray(ax.images[0].get_array(), dtype=float)
    assert m.shape == (3, 4)
    for r in recs:
        assert m[r.block, GROUPS.index(next(g for g in GROUPS if g[0] == r.prev))] == r.best_alpha
    assert np.isnan(m[1, 1])  # skipped group stays blank
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "input_ln -> q,k,v"
    assert len(fig.axes) == 2  # colorbar


def test_clip_ratios_heat_and_hist():
    clips = _clips()
    fig = viz.plot_clip_ratios(clips)
    m = np.asarray(fig.axes[0].images[0].get_array(), dtype=float)
    assert m.shape == (3, 5)
    np.testing.assert_allclose(m[2, 0], float(torch.cat([clips[10].ratios, clips[10].min_ratios]).mean()))
    fig = viz.plot_clip_ratios(clips, kind="hist")
    heights = sum(p.get_height() for p in fig.axes[0].patches if p.get_height() > 0)
    assert heights == pytest.approx(sum(c.all_ratios().numel() for c in clips))  # stacked bars
    with pytest.raises(AwqNbError):
        viz.plot_clip_ratios(clips, kind="pie")


def test_layer_errors():
    errs = _layer_errors()
    fig = viz.plot_layer_errors(errs)
    rtn, awq = _gid(fig.axes[0], "data")
    np.testing.assert_allclose(rtn.get_ydata(), [v["rtn"] for v in errs.values()])
    np.testing.assert_allclose(awq.get_ydata(), [v["awq"] for v in errs.values()])
    assert "21 of 21" in fig.axes[0].get_title(loc="left")
    many = _layer_errors(n_blocks=6)
    ticks = [t.get_text() for t in viz.plot_layer_errors(many).axes[0].get_xticklabels()]
    assert ticks[:2] == ["0", "1"]


def test_layer_errors_with_a_rounding_other_than_nearest():
    errs = _layer_errors()
    for i, e in enumerate(errs.values()):  # "awq" is now the GPTQ-rounded error, "awq_rtn" the same AWQ rounded to nearest
        e["awq_rtn"], e["awq"] = e["awq"], e["awq"] * (0.8 if i % 3 else 1.1)
    ax = viz.plot_layer_errors(errs, rounding="gptq").axes[0]
    rtn, nearest, gptq = _gid(ax, "data")
    np.testing.assert_allclose(rtn.get_ydata(), [v["rtn"] for v in errs.values()])
    np.testing.assert_allclose(nearest.get_ydata(), [v["awq_rtn"] for v in errs.values()])
    np.testing.assert_allclose(gptq.get_ydata(), [v["awq"] for v in errs.values()])
    assert [l.get_label() for l in (rtn, nearest, gptq)] == ["RTN", "AWQ + RTN rounding", "AWQ + GPTQ rounding"]
    assert to_rgb(gptq.get_color()) == to_rgb(viz.ROUNDED_COLOR) != to_rgb(nearest.get_color())
    assert "GPTQ rounding below rounding to nearest (same AWQ scales and clips) on 14 of 21" in ax.get_title(loc="left")
    del errs["model.layers.0.mlp.up_proj"]["awq_rtn"]  # a Linear without the series is a gap in it
    (_, nearest, _) = _gid(viz.plot_layer_errors(errs).axes[0], "data")
    assert np.isnan(nearest.get_ydata()).sum() == 1
    assert len(_gid(viz.plot_layer_errors(_layer_errors()).axes[0], "data")) == 2  # without "awq_rtn": two lines


def test_methods_bars_and_sizes():
    rows = [{"method": "FP16", "perplexity": 12.3, "size_bytes": 270 * 2**20},
            {"method": "RTN w4g64", "perplexity": 15.1, "size_bytes": 90 * 2**20},
            {"method": "AWQ w4g64", "perplexity": 13.4, "size_bytes": 90 * 2**20}]
    ax = viz.plot_methods(rows).axes[0]
    assert [p.get_height() for p in ax.patches] == [12.3, 15.1, 13.4]
    assert [t.get_text() for t in ax.texts] == ["270 MB", "90 MB", "90 MB"]
    assert [p.get_facecolor()[:3] for p in ax.patches] == [to_rgb(viz.FP_COLOR), to_rgb(viz.RTN_COLOR), to_rgb(viz.AWQ_COLOR)]
    ax = viz.plot_methods([{"method": "awq", "perplexity": 13.4}, {"method": "awq+gptq", "perplexity": 13.1}]).axes[0]
    assert [p.get_facecolor()[:3] for p in ax.patches] == [to_rgb(viz.AWQ_COLOR), to_rgb(viz.ROUNDED_COLOR)]
    ax = viz.plot_methods([{"method": "RTN + 1% salient in fp16", "perplexity": 14.0}]).axes[0]
    assert ax.patches[0].get_facecolor()[:3] == to_rgb(viz.RTN_COLOR) and not ax.texts


def test_kernel_speedup_lines_per_shape():
    rows = [{"shape": (4096, 4096), "M": m, "speedup": 3.0 / m ** 0.3} for m in (16, 1, 4)]
    rows += [{"shape": "11008x4096", "M": m, "speedup": 2.0} for m in (1, 16)]
    ax = viz.plot_kernel_speedup(rows).axes[0]
    lines = _gid(ax, "data")
    assert [l.get_label() for l in lines] == ["4096x4096", "11008x4096"]
    assert list(lines[0].get_xdata()) == [1, 4, 16]
    assert len(_gid(ax, "reference")) == 1


def test_results_table_html():
    rows = [{"method": "FP16", "perplexity": 12.345, "size_bytes": 270 * 2**20},
            {"method": "AWQ <w4>", "perplexity": float("nan"), "size_bytes": None}]
    t = viz.results_table(rows, caption="SmolLM2")
    assert isinstance(t, str) and t._repr_html_() == t
    assert "class='awq-nb-results'" in t and "<th style='text-align:left;padding:2px 10px'>size</th>" in t
    assert "12.35" in t and "270 MB" in t and "AWQ &lt;w4&gt;" in t and "nan" in t
    assert viz.results_table(rows, columns=["method"]).count("<td") == 2


def test_every_plot_renders_to_png(tmp_path):
    recs = _scale_records()
    figs = [viz.plot_channel_saliency(_stats()), viz.plot_alpha_search(recs), viz.plot_alpha_heatmap(recs),
            viz.plot_clip_ratios(_clips()), viz.plot_layer_errors(_layer_errors())]
    for i, fig in enumerate(figs):
        fig.savefig(tmp_path / f"{i}.png", dpi=50)
        assert (tmp_path / f"{i}.png").stat().st_size > 1000


def test_viz_module_is_only_a_consumer():
    import awq_nb.results as results
    src = open(results.__file__).read()
    assert "matplotlib" not in src


def test_alpha_search_marks_pruned_losses_as_bounds():
    recs = _scale_records()
    r = recs[0]
    r.pruned = [a > 0.5 for a in r.alphas]
    fig = viz.plot_alpha_search([r], relative=False)
    ax = fig.axes[0]
    (line,) = _gid(ax, "data")
    y = np.asarray(line.get_ydata(), dtype=float)
    assert np.isnan(y[np.array(r.pruned)]).all() and np.isfinite(y[~np.array(r.pruned)]).all()
    (hollow,) = _gid(ax, "pruned")
    np.testing.assert_allclose(hollow.get_offsets()[:, 0], [a for a in r.alphas if a > 0.5])

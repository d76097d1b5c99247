"""Plots of what AWQ found. Each function reads result records and draws; none computes AWQ.

Every plot takes its data and an optional matplotlib ``ax``, and returns the Figure. Without
``ax`` a new :class:`matplotlib.figure.Figure` is made without pyplot, so it works under the Agg
backend (CI, scripts) and a notebook shows it once, as the cell's value.

Artists that tests and notebooks may want to find carry a ``gid``: ``"data"`` for the plotted
series, ``"salient"`` for marked channels, ``"best_alpha"`` for chosen alphas, ``"reference"``
for guide lines.
"""
from __future__ import annotations

import html
import math
import re

import numpy as np
import torch
from matplotlib.figure import Figure

from .errors import AwqNbError
from .results import AWQResult, ChannelStats, ClipRecord, ScaleRecord
from .saliency import SALIENT_FRACTION, n_salient, top_channels

RTN_COLOR, AWQ_COLOR, FP_COLOR, SALIENT_COLOR = "#8c8c8c", "#1f77b4", "#2ca02c", "#d62728"
ROUNDED_COLOR = "#9467bd"  # AWQ with a rounding other than nearest (e.g. GPTQ)
MAX_LEGEND_ENTRIES = 12
MAX_ANNOTATED_CELLS = 80  # write values into heatmap cells up to this many cells


def _axes(ax, figsize=(7.0, 3.6)):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _finish(ax, title: str, xlabel: str, ylabel: str, grid: bool = True) -> None:
    """The one house style: titled axes, labels that say units, light grid, no top/right spines."""
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    if grid:
        ax.grid(True, alpha=0.3, linewidth=0.5)


def _np(x) -> np.ndarray:
    """A tensor or array-like as a float64 numpy vector/matrix (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def salient_channels(values, fraction: float = SALIENT_FRACTION) -> np.ndarray:
    """Indices of the ``ceil(fraction * K)`` largest entries of ``values [K]``, largest first
    (:func:`awq_nb.saliency.top_channels`, as a numpy array)."""
    v = torch.from_numpy(_np(values))
    return top_channels(v, n_salient(v.numel(), fraction)).numpy()


def short_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q``; ``post_attention_layernorm`` -> ``post_attention_ln``."""
    last = name.split(".")[-1]
    return last.removesuffix("_proj").replace("layernorm", "ln")


def group_label(record: ScaleRecord) -> str:
    """``input_ln -> q,k,v``: the op that absorbs 1/s, then the Linears scaled by s."""
    return f"{short_name(record.prev)} -> {','.join(short_name(n) for n in record.layers)}"


# -- activations and weights ------------------------------------------------------------------

def plot_channel_saliency(stats: ChannelStats, ax=None, name: str = "", fraction: float = SALIENT_FRACTION):
    """Mean |activation| of each input channel of one Linear, top ``fraction`` marked in red."""
    fig, ax = _axes(ax)
    v = _np(stats.mean_abs)
    top = salient_channels(v, fraction)
    ax.plot(np.arange(v.size), v, color=AWQ_COLOR, linewidth=0.7, gid="data")
    ax.scatter(top, v[top], color=SALIENT_COLOR, s=18, zorder=3, gid="salient",
               label=f"top {fraction:.0%}: {top.size} channels")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    _finish(ax, f"Activation magnitude per input channel{': ' + name if name else ''}\n"
                f"a few channels dominate; AWQ scales their weights up before rounding "
                f"({stats.tokens} tokens)", "input channel", "mean |x|")
    return fig


def plot_weight_vs_activation(stats: ChannelStats, weight, ax=None, name: str = "",
                              fraction: float = SALIENT_FRACTION):
    """Per input channel: mean |w| (over output rows of ``weight [N, K]``) against mean |x|.

    Salience comes from activations, not weights: the red channels need not have large weights.
    """
    w = _np(weight)
    x = _np(stats.mean_abs)
    if w.ndim != 2 or w.shape[1] != x.size:
        raise AwqNbError(f"weight has shape {w.shape} but the channel stats have K={x.size}: "
                         f"pass the [N, K] weight of the same Linear as the stats.")
    w_mag = np.abs(w).mean(axis=0)
    top = salient_channels(x, fraction)
    fig, ax = _axes(ax, figsize=(5.0, 4.0))
    ax.scatter(x, w_mag, s=5, color=AWQ_COLOR, alpha=0.5, gid="data", label="channel")
    ax.scatter(x[top], w_mag[top], s=20, color=SALIENT_COLOR, gid="salient",
               label=f"top {fraction:.0%} by activation")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=8, frameon=False)
    _finish(ax, f"Weight vs activation magnitude{': ' + name if name else ''}\n"
                "salient channels are found from activations, not weights",
            "mean |x| (activation)", "mean |w| (weight column)")
    return fig


def plot_quant_error(err_before, err_after, ax=None, name: str = "", stats: ChannelStats | None = None):
    """Per-input-channel quantization error with plain rounding vs after AWQ scaling.

    ``err_before``/``err_after`` are ``[K]`` vectors (e.g. mean |W x - Q(W) x| contributions per
    channel); with ``stats`` the salient channels are marked on the "after" curve.
    """
    b, a = _np(err_before), _np(err_after)
    if b.shape != a.shape or b.ndim != 1:
        raise AwqNbError(f"error vectors must both be [K]; got {b.shape} and {a.shape}.")
    fig, ax = _axes(ax)
    k = np.arange(b.size)
    ax.plot(k, b, color=RTN_COLOR, linewidth=0.7, label=f"RTN (mean {b.mean():.3g})", gid="data")
    ax.plot(k, a, color=AWQ_COLOR, linewidth=0.7, label=f"AWQ scaled (mean {a.mean():.3g})", gid="data")
    if stats is not None:
        top = salient_channels(stats.mean_abs)
        ax.scatter(top, a[top], color=SALIENT_COLOR, s=16, zorder=3, gid="salient", label="salient channels")
    ax.set_yscale("log")
    ax.legend(fontsize=8, frameon=False)
    _finish(ax, f"Quantization error per input channel{': ' + name if name else ''}\n"
                "scaling salient channels up shrinks their relative rounding error",
            "input channel", "error")
    return fig


# -- scale search -----------------------------------------------------------------------------

def plot_alpha_search(records: list[ScaleRecord], ax=None, block: int | None = None, relative: bool = True):
    """Output loss against alpha, one line per scaling group; the chosen alpha is a dot, and losses
    the pruned search only bounded from below (``ScaleRecord.pruned``) are hollow marks.

    ``relative``: divide each curve by its alpha=0 loss (plain RTN), so 1.0 means "no better than
    RTN" and groups of different size share one axis. ``block`` keeps one decoder block.
    """
    recs = [r for r in records if block is None or r.block == block]
    if not recs:
        raise AwqNbError(f"no scale records{'' if block is None else f' for block {block}'}: run awq_nb.search first.")
    fig, ax = _axes(ax)
    labels = list(dict.fromkeys(group_label(r) for r in recs))
    colors = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    best_x, best_y, seen = [], [], set()
    bound_x, bound_y = [], []
    for r in recs:
        y = _np(r.losses)
        y[~np.isfinite(y)] = np.nan  # skipped candidates
        base = r.loss_rtn
        if relative and math.isfinite(base) and base > 0:
            y = y / base
        cut = np.array(r.pruned, dtype=bool) if len(r.pruned) == len(y) else np.zeros(len(y), dtype=bool)
        bound_x += [a for a, c in zip(r.alphas, cut) if c]
        bound_y += list(y[cut])
        y = np.where(cut, np.nan, y)  # a pruned loss is only a lower bound: drawn as a hollow mark
        lab = group_label(r)
        ax.plot(r.alphas, y, color=colors[lab], linewidth=1.0, alpha=0.8, marker=".", markersize=3, gid="data",
                label=lab if lab not in seen else None)
        seen.add(lab)
        best_x.append(r.best_alpha)
        best_y.append(y[r.alphas.index(r.best_alpha)] if r.best_alpha in r.alphas else np.nanmin(y))
    if bound_x:
        ax.scatter(bound_x, bound_y, facecolors="none", edgecolors="gray", s=14, linewidths=0.8, gid="pruned",
                   label="at least this (search stopped early)")
    ax.scatter(best_x, best_y, color="black", s=16, zorder=3, gid="best_alpha", label="chosen alpha")
    if relative:
        ax.axhline(1.0, color=RTN_COLOR, linestyle="--", linewidth=0.8, gid="reference")
    if len(labels) <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize=8, frameon=False)
    where = f"block {block}" if block is not None else f"{len({r.block for r in recs})} blocks"
    _finish(ax, f"Scale search ({where}) over the exponent alpha of the per-channel scales\n"
                "alpha=0 is plain rounding; the dot is the alpha with the least output error",
            "alpha", "output MSE / RTN MSE" if relative else "output MSE")
    return fig


def _grid(items, row_of, col_of, value_of):
    """A [rows x cols] matrix (NaN where missing) with sorted row keys and first-seen column keys."""
    rows = sorted({row_of(i) for i in items})
    cols = list(dict.fromkeys(col_of(i) for i in items))
    m = np.full((len(rows), len(cols)), np.nan)
    for i in items:
        m[rows.index(row_of(i)), cols.index(col_of(i))] = value_of(i)
    return m, rows, cols


def _heatmap(ax, m, rows, cols, cmap, vmin, vmax, cbar_label):
    im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    step = max(1, len(rows) // 16)
    ax.set_yticks(range(0, len(rows), step), [str(r) for r in rows[::step]], fontsize=8)
    if m.size <= MAX_ANNOTATED_CELLS:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (vmin + vmax) / 2 else "black")
    ax.figure.colorbar(im, ax=ax, label=cbar_label)
    return im


def plot_alpha_heatmap(result: AWQResult | list[ScaleRecord], ax=None):
    """Chosen alpha for every (decoder block, scaling group); blank where a group was skipped."""
    recs = result.scales if isinstance(result, AWQResult) else result
    if not recs:
        raise AwqNbError("no scale records to plot: run awq_nb.search first.")
    m, rows, cols = _grid(recs, lambda r: r.block, group_label, lambda r: r.best_alpha)
    fig, ax = _axes(ax, figsize=(6.0, max(3.0, 0.12 * len(rows) + 1.5)))
    _heatmap(ax, m, rows, cols, "viridis", 0.0, 1.0, "chosen alpha")
    _finish(ax, "Chosen alpha per block and scaling group\n"
                "0 = plain rounding, 1 = scale fully by activation magnitude",
            "scaling group (absorbing op -> scaled Linears)", "decoder block", grid=False)
    return fig


def plot_clip_ratios(clips: list[ClipRecord], ax=None, kind: str = "heat"):
    """Chosen clipping ratios (clip max |w| to ratio x max, and min |w| likewise where the two ends
    were searched apart): mean per (block, Linear) as a heatmap,
    or with ``kind="hist"`` the distribution over all groups, one histogram per Linear name."""
    if not clips:
        raise AwqNbError("no clip records to plot: run the search with AWQConfig(clip=True).")
    fig, ax = _axes(ax, figsize=(6.0, 3.6) if kind == "hist" else (6.0, max(3.0, 0.12 * len({c.block for c in clips}) + 1.5)))
    lo = min(min(c.ratio_grid) for c in clips)
    if kind == "heat":
        m, rows, cols = _grid(clips, lambda c: c.block, lambda c: short_name(c.layer),
                              lambda c: float(_np(c.all_ratios()).mean()))
        _heatmap(ax, m, rows, cols, "magma", lo, 1.0, "mean clip ratio")
        _finish(ax, "Weight clipping per block and Linear\n"
                    "1.0 = no clipping; lower = outlier weights clamped to cut rounding error",
                "Linear", "decoder block", grid=False)
    elif kind == "hist":
        grid = sorted({round(g, 6) for c in clips for g in c.ratio_grid})
        step = (grid[-1] - grid[0]) / max(1, len(grid) - 1) or 0.05
        bins = np.append(np.array(grid) - step / 2, grid[-1] + step / 2)
        by_layer: dict[str, list[np.ndarray]] = {}
        for c in clips:
            by_layer.setdefault(short_name(c.layer), []).append(_np(c.all_ratios()).ravel())
        names = list(by_layer)
        ax.hist([np.concatenate(by_layer[n]) for n in names], bins=bins, stacked=True, label=names)
        ax.legend(fontsize=8, frameon=False)
        _finish(ax, "Distribution of chosen clip ratios over weight groups\n"
                    "most groups keep their full range; a tail is clipped",
                "clip ratio (fraction of max |w| kept)", "weight groups")
    else:
        raise AwqNbError(f"kind={kind!r}: choose 'heat' or 'hist'.")
    return fig


# -- outcomes ---------------------------------------------------------------------------------

def _block_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot_layer_errors(layer_errors: dict[str, dict[str, float]], ax=None, rounding: str = "gptq"):
    """Output error of every quantized Linear on calibration tokens, RTN vs AWQ (log scale).

    ``layer_errors``: ``AWQResult.layer_errors``. When its entries also have ``"awq_rtn"`` (a
    search with a rounding other than nearest), three series are drawn: RTN, AWQ rounded to
    nearest (``"awq_rtn"``) and AWQ with the final rounding (``"awq"``), named ``rounding`` in the
    legend; a Linear without ``"awq_rtn"`` is a gap in that series.
    """
    if not layer_errors:
        raise AwqNbError("no per-layer errors to plot: AWQResult.layer_errors is empty.")
    names = list(layer_errors)
    rtn = np.array([layer_errors[n]["rtn"] for n in names], dtype=float)
    awq = np.array([layer_errors[n]["awq"] for n in names], dtype=float)
    fig, ax = _axes(ax, figsize=(8.0, 3.6))
    x = np.arange(len(names))
    ax.plot(x, rtn, "o-", color=RTN_COLOR, markersize=3, linewidth=0.6, label="RTN", gid="data")
    nearest = None
    if any("awq_rtn" in e for e in layer_errors.values()):
        nearest = np.array([layer_errors[n].get("awq_rtn", np.nan) for n in names], dtype=float)
        ax.plot(x, nearest, "o-", color=AWQ_COLOR, markersize=3, linewidth=0.6, label="AWQ + RTN rounding", gid="data")
        ax.plot(x, awq, "o-", color=ROUNDED_COLOR, markersize=3, linewidth=0.6,
                label=f"AWQ + {rounding.upper()} rounding", gid="data")
    else:
        ax.plot(x, awq, "o-", color=AWQ_COLOR, markersize=3, linewidth=0.6, label="AWQ", gid="data")
    ax.set_yscale("log")
    if len(names) <= 24:
        ax.set_xticks(x, [n.split(".", 2)[-1] if _block_of(n) is None else f"{_block_of(n)}.{short_name(n)}"
                          for n in names], rotation=60, ha="right", fontsize=7)
    else:  # one tick at the first Linear of each block
        blocks = [_block_of(n) for n in names]
        firsts = [i for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)]
        step = max(1, len(firsts) // 12)
        ax.set_xticks(firsts[::step], [str(blocks[i]) for i in firsts[::step]], fontsize=8)
    ax.legend(fontsize=8, frameon=False)
    final = "AWQ" if nearest is None else f"AWQ + {rounding.upper()} rounding"
    title = f"Output MSE per quantized Linear: {final} below RTN on {int((awq < rtn).sum())} of {len(names)}"
    if nearest is not None:
        both = np.isfinite(nearest)
        title += (f"\n{rounding.upper()} rounding below rounding to nearest (same AWQ scales and clips) on "
                  f"{int((awq[both] < nearest[both]).sum())} of {int(both.sum())}")
    _finish(ax, title, "Linear (by decoder block)" if len(names) > 24 else "Linear", "output MSE")
    return fig


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.0f} KB"


def plot_methods(rows: list[dict], ax=None):
    """Perplexity of each method (bars, lower is better), its size written on the bar."""
    if not rows:
        raise AwqNbError("no rows to plot: pass [{'method', 'perplexity', 'size_bytes'}, ...].")
    fig, ax = _axes(ax, figsize=(5.0, 3.4))
    def color(method: str) -> str:
        m = method.lower()
        if m.startswith(("fp", "bf16", "float")):
            return FP_COLOR
        if "awq+" in m:  # AWQ with another rounding, e.g. "awq+gptq"
            return ROUNDED_COLOR
        return AWQ_COLOR if "awq" in m else RTN_COLOR

    colors = [color(r["method"]) for r in rows]
    bars = ax.bar([r["method"] for r in rows], [r["perplexity"] for r in rows], color=colors, gid="data")
    for bar, r in zip(bars, rows):
        if r.get("size_bytes"):
            ax.annotate(_mb(r["size_bytes"]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.margins(y=0.12)
    _finish(ax, "Perplexity (lower is better) and size on disk", "method", "perplexity")
    return fig


def plot_kernel_speedup(rows: list[dict], ax=None):
    """Speedup of the INT4 kernel over the fp16 matmul against batch rows M, one line per shape."""
    if not rows:
        raise AwqNbError("no rows to plot: pass [{'shape', 'M', 'speedup'}, ...].")
    fig, ax = _axes(ax, figsize=(6.0, 3.6))
    shapes: dict[str, list[dict]] = {}
    for r in rows:
        s = r["shape"] if isinstance(r["shape"], str) else "x".join(str(d) for d in r["shape"])
        shapes.setdefault(s, []).append(r)
    for s, rs in shapes.items():
        rs = sorted(rs, key=lambda r: r["M"])
        ax.plot([r["M"] for r in rs], [r["speedup"] for r in rs], "o-", markersize=3, label=s, gid="data")
    ax.axhline(1.0, color=RTN_COLOR, linestyle="--", linewidth=0.8, gid="reference")
    ax.set_xscale("log", base=2)
    ax.legend(title="N x K", fontsize=8, title_fontsize=8, frameon=False)
    _finish(ax, "INT4 kernel speedup over fp16 matmul\n"
                "small M: memory-bound, 4x smaller weights win; large M: compute-bound",
            "M (tokens per matmul)", "speedup (x)")
    return fig


# -- tables -----------------------------------------------------------------------------------

class HTMLText(str):
    """A string of HTML that notebooks render as HTML (``display(results_table(rows))``)."""

    def _repr_html_(self) -> str:
        return str(self)


def _cell(key: str, v) -> str:
    if v is None:
        return ""
    if key.endswith("bytes") and isinstance(v, (int, float)):
        return _mb(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    return str(v)


def results_table(rows: list[dict], columns: list[str] | None = None, caption: str = "") -> HTMLText:
    """An HTML table (class ``awq-nb-results``) of ``rows``; no pandas needed.

    ``columns`` picks and orders keys (default: keys in first-seen order); ``*bytes`` columns
    are shown in MB, floats with 2 decimals.
    """
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th style='text-align:left;padding:2px 10px'>{html.escape(c.removesuffix('_bytes'))}</th>"
                   for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td style='padding:2px 10px'>{html.escape(_cell(c, r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows)
    cap = f"<div style='font-size:90%;opacity:0.75'>{html.escape(caption)}</div>" if caption else ""
    return HTMLText(f"<div>{cap}<table class='awq-nb-results'><thead><tr>{head}</tr></thead>"
                    f"<tbody>{body}</tbody></table></div>")

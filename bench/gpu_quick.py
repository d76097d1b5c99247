"""The short GPU check of the INT4 kernels: one command, under 5 minutes, side by side in one run.

    python bench/gpu_quick.py              # on a CUDA GPU: markdown table, then one JSON line
    python bench/gpu_quick.py --dry-run    # on CPU: builds every tensor and checks shapes, times nothing

For M = 1 and 16 on 4096x4096, 8192x8192 and 4096x14336 (K x N, g = 128, fp16 activations):

* ``fp16``: ``F.linear`` with the dense fp16 weight (cuBLAS);
* ``ours``: the kernel ``awq_matmul`` dispatches to, on the native layout made once
  (``to_native``), with its fixed launch configuration (no autotuning);
* ``torch int4``: torch's own tinygemm kernel ``aten._weight_int4pack_mm`` (bf16 activations,
  the same codes, scales and zeros mapped to its ``(q - 8) * s + (8 - z) * s`` form);
* ``copy``: a device-to-device copy of a 1 GiB buffer, the bandwidth ceiling (read + write).

Times are CUDA-graph replays of calls that rotate over copies of the weight sized to overflow
L2 three times (bench/kernels.py ``Timer``), so weights stream from HBM as in a real model.
Every output of ours and of torch's kernel is checked against ``gemm_ref`` (the run fails above a
relative error of 1e-2). ``bench/gpu_check.sh`` keeps the full sweep (8 shapes x 12 batch sizes)
and 7B-shaped decode.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

DRY_SHAPE = (512, 256)  # the dry run checks the kernels' results here (the interpreter is slow)

SHAPES = ((4096, 4096), (8192, 8192), (4096, 14336))
BATCHES = (1, 16)
GROUP_SIZE = 128
MAX_REL_ERR = 1e-2
INNER_K_TILES = 8  # torch's int4 kernel: K must be a multiple of 16 * this


def torch_int4_weight(codes_nk: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """torch's tinygemm operands for codes ``[N, K]`` (0..15), scales/zeros ``[K/g, N]``:
    ``(packed, scale_and_zero [K/g, N, 2] bf16)`` with ``w = (q - 8) * s + (8 - z) * s``."""
    packed = (codes_nk[:, ::2] << 4 | codes_nk[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed, INNER_K_TILES)
    scale_and_zero = torch.stack([scales.float(), (8 - zeros.float()) * scales.float()], dim=-1).to(torch.bfloat16)
    return packed, scale_and_zero.contiguous()


def build(k: int, n: int, device: str, seed: int = 0) -> dict:
    """Every tensor one shape needs: AWQ tensors, native layout, dense fp16, torch int4 operands."""
    from awq_nb.kernels.layout import pack_awq
    from awq_nb.kernels.native import to_native

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // GROUP_SIZE, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // GROUP_SIZE, n, generator=gen) * 0.002 + 0.001).half()
    qweight, qzeros = pack_awq(codes).to(device), pack_awq(zeros).to(device)
    scales = scales.to(device)
    t = {"qweight": qweight, "qzeros": qzeros, "scales": scales,
         "native": to_native(qweight, qzeros, scales, GROUP_SIZE)}
    from awq_nb.kernels.reference import dequantize_ref

    t["dense"] = dequantize_ref(qweight, qzeros, scales, GROUP_SIZE).t().contiguous()  # [N, K] fp16
    if device == "cuda":
        try:  # the peer's API has moved between torch versions: report, do not stop our measurement
            t["int4"] = torch_int4_weight(codes.t().contiguous().to(device), scales, zeros.to(device))
        except (RuntimeError, TypeError) as e:
            t["int4"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return t


def clone(t: dict) -> dict:
    """Another copy of every tensor of ``build`` (timing rotates over copies that overflow L2)."""
    from awq_nb.kernels.native import NativeInt4

    def copy(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, NativeInt4):
            return NativeInt4(v.qweight.clone(), v.zeros.clone(), v.scales.clone(), v.group_size)
        if isinstance(v, tuple):
            return tuple(copy(u) for u in v)
        return v

    return {k: copy(v) for k, v in t.items()}


def check_shapes(t: dict, k: int, n: int) -> None:
    w = t["native"]
    assert w.qweight.shape == (k // 8, n) and w.zeros.shape == (k // GROUP_SIZE, n), "native layout shapes"
    assert t["dense"].shape == (n, k) and t["qweight"].shape == (k, n // 8)


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def copy_gbs() -> float:
    import triton.testing

    src = torch.empty(2**29, dtype=torch.float16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() * 2 / ms / 1e6


def bench_kernels_module():
    """bench/kernels.py, loaded under another name (a top-level module called ``kernels`` would
    shadow the PyPI package that transformers probes for)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("awq_nb_bench_kernels", os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(device: str) -> list[dict]:
    bench = bench_kernels_module()
    Timer, copies_for = bench.Timer, bench.copies_for
    from awq_nb.kernels import dispatch
    from awq_nb.kernels.reference import gemm_ref

    timer = Timer(device)
    rows = []
    if device != "cuda":  # dry run: every tensor of every shape, then the kernels on a small one
        for k, n in SHAPES:
            check_shapes(build(k, n, device), k, n)
    for k, n in (SHAPES if device == "cuda" else (DRY_SHAPE,)):
        base = build(k, n, device)
        check_shapes(base, k, n)
        weight_bytes = base["native"].nbytes()
        copies = [base] + [clone(base) for _ in range(1, copies_for(weight_bytes, device))]
        for m in BATCHES:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half().to(device)
            ref = gemm_ref(x, base["qweight"], base["qzeros"], base["scales"], GROUP_SIZE)
            kind = dispatch.cuda_strategy(m, torch.cuda.get_device_capability() if device == "cuda" else (9, 0))
            ours = [functools.partial(dispatch.native_matmul, x, c["native"]) for c in copies]
            row = {"shape": f"{k}x{n}", "m": m, "kernel": kind, "err_ours": rel_err(ours[0](), ref)}
            if device != "cuda":
                assert ours[0]().shape == (m, n)
                rows.append(row)
                continue
            row["fp16_ms"] = timer.ms([functools.partial(F.linear, x, c["dense"]) for c in copies])
            row["ours_ms"] = timer.ms(ours)
            row["x_fp16"] = row["fp16_ms"] / row["ours_ms"]
            if isinstance(base["int4"], str):
                row["torch_int4_error"] = base["int4"]
            else:
                xb = x.bfloat16()
                torch_int4 = [functools.partial(torch.ops.aten._weight_int4pack_mm, xb, c["int4"][0], GROUP_SIZE,
                                                c["int4"][1]) for c in copies]
                row["err_torch_int4"] = rel_err(torch_int4[0](), ref)
                row["torch_int4_ms"] = timer.ms(torch_int4)
                row["x_torch_int4"] = row["torch_int4_ms"] / row["ours_ms"]
            row["ours_gbs"] = (weight_bytes + 2 * m * (k + n)) / row["ours_ms"] / 1e6
            rows.append(row)
            print(markdown_row(row), flush=True)
        del copies, base
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


HEADER = ("| K x N | M | our kernel | fp16 ms | ours ms | torch int4 ms | x fp16 | x torch int4 | ours GB/s | "
          "rel err ours | rel err torch int4 |\n|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(r: dict) -> str:
    f = lambda key, spec=".4f": format(r[key], spec) if key in r else "-"  # noqa: E731
    return (f"| {r['shape']} | {r['m']} | {r['kernel']} | {f('fp16_ms')} | {f('ours_ms')} | {f('torch_int4_ms')} | "
            f"{f('x_fp16', '.2f')} | {f('x_torch_int4', '.2f')} | {f('ours_gbs', '.0f')} | {f('err_ours', '.1e')} | "
            f"{f('err_torch_int4', '.1e')} |")


def ensure_package() -> None:
    """Make ``awq_nb`` (with ``kernels/`` as ``awq_nb.kernels``) importable from a bare checkout, as
    on the device machine, which has no editable install: assemble it in a temporary folder."""
    if os.environ.get("AWQ_NB_ASSEMBLE") != "1":
        try:
            import awq_nb.kernels.native  # noqa: F401
            return
        except ImportError:
            pass
    import shutil
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site = tempfile.mkdtemp(prefix="awq_nb_site_")
    shutil.copytree(os.path.join(root, "awq_nb"), os.path.join(site, "awq_nb"),
                    ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    shutil.copytree(os.path.join(root, "kernels"), os.path.join(site, "awq_nb", "kernels"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, site)
    for name in [m for m in sys.modules if m == "awq_nb" or m.startswith("awq_nb.")]:
        del sys.modules[name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: build every tensor, check shapes, time nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: the kernels' twins run on CPU
    ensure_package()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    start = time.time()
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: nothing timed)"}
    if device == "cuda":
        import triton

        env["triton"] = triton.__version__
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["copy_gbs"] = round(copy_gbs(), 1)
    print(", ".join(f"{k}: {v}" for k, v in env.items()))
    print(HEADER)
    rows = run(device)
    if device != "cuda":
        for r in rows:
            print(markdown_row(r))
    bad = [r for r in rows if not (r["err_ours"] <= MAX_REL_ERR and r.get("err_torch_int4", 0) <= MAX_REL_ERR)]
    env["seconds"] = round(time.time() - start, 1)
    print(json.dumps({"environment": env, "rows": rows, "failed": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

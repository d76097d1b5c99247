"""Benchmark the AWQ INT4 matmuls against dense matmul, per Linear shape and batch size, plus decode.

    python bench/kernels.py                      # GPU: all shapes x all M, then decode tokens/s
    python bench/kernels.py --quick              # CPU: a small subset in under a minute
    python bench/kernels.py --json out.json --markdown out.md
    python bench/kernels.py --cpu-paths          # CPU strategies behind the dispatcher's CPU branch
    python bench/kernels.py --compile-report 90  # no GPU needed: registers/spills of every candidate

Per (K x N, M) row, side by side in one run:

* ``awq``: ``awq_matmul`` (what the dispatcher picks, named in the ``kernel`` column);
* ``dense``: ``F.linear`` with the dense weight in the activation dtype (fp16 on GPU; bf16 on CPU,
  where fp16 matmul has no fast kernel);
* ``deq+mm``: dequantize every call, then the dense matmul (the naive INT4 path);
* ``gemv`` / ``gemm``: the two Triton kernels forced (GPU only), to place the dispatch thresholds.

Bytes for GB/s are the fewest a kernel must move: activations + packed weight + zeros + scales +
output for AWQ (the dense weight for ``dense``). TFLOP/s counts ``2*M*N*K``. GPU times are medians
of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); CPU times are the fastest of
CPU_REPS ``time.perf_counter`` runs (the CPU boxes are shared, so the minimum is the stable figure).

Decode: a random Llama with Llama-7B widths (hidden 4096, intermediate 11008, 32 heads; fewer
layers than 32, as printed) decodes greedily with a KV cache, fp16 vs AWQ (Linear layers of the
decoder replaced; lm_head stays dense). ``--quick`` uses a tiny Llama on CPU.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from awq_nb.kernels import awq_matmul, choose_kernel, int4_cpu_supported, prepare_cpu_int4
from awq_nb.kernels.cpu import dequantize_cpu
from awq_nb.kernels.layout import pack_awq
from awq_nb.quantizer import quant_params, quantize_int

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096), (8192, 8192),
          (8192, 28672), (28672, 8192)]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
QUICK_SHAPES = [(4096, 4096)]
QUICK_BATCHES = [1, 8, 64]
GROUP_SIZE = 128
CPU_REPS = 5
GEMV_FORCED_MAX_M = 8      # the GEMV kernel's limit (kernels/gemv.py MAX_ROWS)
DECODE_LAYERS_GPU = 8      # of Llama-7B's 32: enough to be weight-bound, quick to build
DECODE_TOKENS_GPU = 64
DECODE_PROMPT = 16


@dataclass
class Row:
    shape: str
    m: int
    kernel: str
    awq_ms: float
    dense_ms: float
    deq_mm_ms: float
    gemv_ms: float | None = None
    gemm_ms: float | None = None
    awq_gbps: float = 0.0
    awq_tflops: float = 0.0
    dense_gbps: float = 0.0
    speedup_vs_dense: float = 0.0
    speedup_vs_deq_mm: float = 0.0


@dataclass
class Decode:
    layers: int
    tokens: int
    device: str
    fp_tokens_per_s: float
    awq_tokens_per_s: float
    linear: str
    speedup: float = field(init=False)

    def __post_init__(self):
        self.speedup = self.awq_tokens_per_s / self.fp_tokens_per_s


# ---------------------------------------------------------------------------------------------
# weights


def quantize_weight(w: torch.Tensor, group_size: int = GROUP_SIZE):
    """AWQ "gemm" tensors of an ``nn.Linear`` weight ``w [N, K]`` (round-to-nearest, no search)."""
    scale, zero = quant_params(w, 4, group_size, zero_point=True)        # [N, K/g] each
    codes = quantize_int(w, scale, zero, 4, group_size)                  # int32 [N, K]
    qweight = pack_awq(codes.t().contiguous())                           # [K, N/8]
    qzeros = pack_awq(zero.t().to(torch.int32).contiguous())             # [K/g, N/8]
    return qweight, qzeros, scale.t().contiguous().to(w.dtype)


class AwqLinear(nn.Module):
    """Minimal 4-bit Linear for the benchmark: buffers of the AWQ format, forward = ``awq_matmul``."""

    def __init__(self, linear: nn.Linear, group_size: int = GROUP_SIZE):
        super().__init__()
        self.group_size = group_size
        qweight, qzeros, scales = quantize_weight(linear.weight.detach(), group_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else linear.bias.detach()
        on_cpu = qweight.device.type == "cpu" and int4_cpu_supported(scales.shape[1], group_size)
        self.cpu_weight = prepare_cpu_int4(qweight, qzeros, scales, group_size) if on_cpu else None

    def forward(self, x):
        return awq_matmul(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias,
                          cpu_weight=self.cpu_weight)


def quantize_decoder(model: nn.Module) -> str:
    """Replace every Linear inside ``model.model.layers`` in place; returns which module was used.

    Uses the package's ``WQLinear`` when it routes through the kernels' dispatcher (with its CPU
    int4 weight prepared on CPU), else the minimal :class:`AwqLinear` above."""
    make, label = AwqLinear, "bench AwqLinear (awq_matmul)"
    try:
        from awq_nb import wqlinear
        from awq_nb.kernels import dispatch

        if getattr(wqlinear, "awq_matmul", None) is dispatch.awq_matmul:
            def make(linear):
                module = wqlinear.WQLinear.from_linear(linear, 4, GROUP_SIZE)
                if module.qweight.device.type == "cpu":
                    module.prepare_cpu_int4()
                return module
            label = "awq_nb WQLinear (awq_matmul)"
    except ImportError:
        pass
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            model.model.layers.set_submodule(name, make(module))
    return label


# ---------------------------------------------------------------------------------------------
# timing


def time_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    times = []
    for _ in range(CPU_REPS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)  # the CPU box is shared: the fastest run estimates the uncontended time


def bench_shape(k: int, n: int, batches: list[int], device: str, dtype: torch.dtype) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
    qweight, qzeros, scales = quantize_weight(w)
    dense = w  # the fp weight (same FLOPs as AWQ, 4x the bytes)
    cpu_weight = prepare_cpu_int4(qweight, qzeros, scales, GROUP_SIZE) if device == "cpu" else None
    if device == "cuda":
        from awq_nb.kernels.dequant import awq_dequantize
        from awq_nb.kernels.gemm import awq_gemm
        from awq_nb.kernels.gemv import awq_gemv

        def deq_mm(x):
            return x @ awq_dequantize(qweight, qzeros, scales, GROUP_SIZE)
    else:
        def deq_mm(x):
            return (x.float() @ dequantize_cpu(qweight, qzeros, scales, GROUP_SIZE)).to(x.dtype)

    weight_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * scales.element_size()
    rows = []
    for m in batches:
        x = torch.randn(m, k, generator=gen, device=device).to(dtype)
        awq = time_ms(lambda: awq_matmul(x, qweight, qzeros, scales, GROUP_SIZE, cpu_weight=cpu_weight), device)
        dense_ms = time_ms(lambda: F.linear(x, dense), device)
        deq = time_ms(lambda: deq_mm(x), device)
        gemv_ms = gemm_ms = None
        if device == "cuda":
            if m <= GEMV_FORCED_MAX_M:
                gemv_ms = time_ms(lambda: awq_gemv(x, qweight, qzeros, scales, GROUP_SIZE), device)
            gemm_ms = time_ms(lambda: awq_gemm(x, qweight, qzeros, scales, GROUP_SIZE), device)
        act_bytes = (m * k + m * n) * x.element_size()
        row = Row(shape=f"{k}x{n}", m=m, kernel=choose_kernel(m, x.device, cpu_weight is not None),
                  awq_ms=awq, dense_ms=dense_ms, deq_mm_ms=deq, gemv_ms=gemv_ms, gemm_ms=gemm_ms,
                  awq_gbps=(act_bytes + weight_bytes) / awq / 1e6,
                  awq_tflops=2 * m * n * k / awq / 1e9,
                  dense_gbps=(act_bytes + dense.numel() * dense.element_size()) / dense_ms / 1e6,
                  speedup_vs_dense=dense_ms / awq, speedup_vs_deq_mm=deq / awq)
        rows.append(row)
        print(markdown_row(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# decode


def llama(layers: int, hidden: int, intermediate: int, heads: int, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=32000,
                         max_position_embeddings=2048)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, tokens: int, device: str) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (1, DECODE_PROMPT), device=device)

    def run():
        out = model(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        return tokens / (time.perf_counter() - start)

    run()  # warm-up: autotuning and compilation happen here
    return statistics.median(run() for _ in range(3))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_decode(device: str, quick: bool) -> Decode:
    if quick:
        layers, tokens, dims = 2, 8, (256, 768, 4)
    else:
        layers, tokens, dims = DECODE_LAYERS_GPU, DECODE_TOKENS_GPU, (4096, 11008, 32)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    model = llama(layers, *dims, device=device, dtype=dtype)
    fp = decode_tokens_per_s(model, tokens, device)
    quantized = copy.deepcopy(model)
    del model
    label = quantize_decoder(quantized)
    awq = decode_tokens_per_s(quantized, tokens, device)
    return Decode(layers=layers, tokens=tokens, device=device, fp_tokens_per_s=fp, awq_tokens_per_s=awq, linear=label)


# ---------------------------------------------------------------------------------------------
# CPU strategies (the measurement behind the CPU branch of kernels/dispatch.py)


def cpu_paths(k: int, n: int, batches: list[int]) -> str:
    """Markdown table: per-call ms of each CPU strategy, and the one-time cost of the cached ones."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    qweight, qzeros, scales = quantize_weight(w.half())
    start = time.perf_counter()
    cached32 = dequantize_cpu(qweight, qzeros, scales, GROUP_SIZE)
    prep_dense = (time.perf_counter() - start) * 1e3
    cached16 = cached32.bfloat16()
    start = time.perf_counter()
    int4_bf16 = prepare_cpu_int4(qweight, qzeros, scales, GROUP_SIZE, torch.bfloat16)
    prep_int4 = (time.perf_counter() - start) * 1e3
    int4_fp32 = prepare_cpu_int4(qweight, qzeros, scales, GROUP_SIZE, torch.float32)
    from awq_nb.kernels.cpu import matmul_int4_cpu

    strategies = {
        "(a) dequantize every call + fp32 matmul (stateless)":
            lambda x: awq_matmul(x, qweight, qzeros, scales, GROUP_SIZE),
        "(b) cached dequantized fp32 weight": lambda x: x @ cached32,
        "(b) cached dequantized bf16 weight": lambda x: (x.bfloat16() @ cached16).float(),
        "(c) torch int4 kernel, bf16": lambda x: matmul_int4_cpu(x, int4_bf16),
        "(c) torch int4 kernel, fp32": lambda x: matmul_int4_cpu(x, int4_fp32),
    }
    lines = [f"CPU strategies for a {k}x{n} Linear (g={GROUP_SIZE}), ms per call (fastest of {CPU_REPS}); "
             f"one-time cost: dequantize {prep_dense:.0f} ms, int4 conversion {prep_int4:.0f} ms", "",
             "| strategy | " + " | ".join(f"M={m}" for m in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for name, fn in strategies.items():
        cells = []
        for m in batches:
            x = torch.randn(m, k, generator=gen)
            cells.append(f"{time_ms(lambda: fn(x), 'cpu'):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# compile report (needs no GPU: triton compiles for a named target; ptxas -v gives registers)


def compile_report(capability: int) -> str:
    """Compile every GPU autotune candidate (g=128, fp16, no bias) for sm_<capability>; list shared
    memory, registers and spills. Run without TRITON_INTERPRET."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from awq_nb.kernels import dequant, gemm, gemv

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = [os.path.join(bin_dir, name) for name in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bin_dir, name))]
    args = {"x_ptr": "*fp16", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "bias_ptr": "*fp16",
            "out_ptr": "*fp16", "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
            "stride_xk": "i32", "stride_qk": "i32", "stride_zk": "i32", "stride_sk": "i32", "stride_om": "i32"}
    jobs = [("gemm", gemm._gemm_kernel, {**args, "M_BUCKET": "i32"},
             {"GROUP_SIZE": 128, "HAS_BIAS": False, "DOT_DTYPE": tl.float16}, c) for c in gemm.configs(False)]
    jobs += [("gemv", gemv._gemv_kernel, args, {"GROUP_SIZE": 128, "HAS_BIAS": False, "BLOCK_M": 1}, c)
             for c in gemv.configs(False)]
    jobs += [("dequant", dequant._dequantize_kernel,
              {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "out_ptr": "*fp16", "K": "i32",
               "N": "i32", "stride_qk": "i32", "stride_zk": "i32", "stride_sk": "i32", "stride_ok": "i32"},
              {"GROUP_SIZE": 128}, c) for c in dequant.configs(False)]
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    lines = [f"Compile report for {arch} (triton {triton.__version__}; g=128, fp16, no bias, GEMV at BLOCK_M=1)", "",
             "| kernel | config | warps | stages | shared bytes | registers | spill bytes |", "|---|---|---|---|---|---|---|"]
    for name, fn, signature, fixed, config in jobs:
        constexprs = {**fixed, **config.kwargs}
        signature = {**signature, **{key: "constexpr" for key in constexprs}}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        regs = spills = "?"
        for tool in ptxas:
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(compiled.asm["ptx"])
                f.flush()
                done = subprocess.run([tool, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                                      capture_output=True, text=True)
            if done.returncode == 0:
                regs = (re.findall(r"Used (\d+) registers", done.stderr) or ["?"])[0]
                spills = (re.findall(r"(\d+) bytes spill stores", done.stderr) or ["?"])[0]
                break
        lines.append(f"| {name} | {config.kwargs} | {config.num_warps} | {config.num_stages} | "
                     f"{compiled.metadata.shared} | {regs} | {spills} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# output


HEADER = ("| K x N | M | kernel | awq ms | dense ms | deq+mm ms | gemv ms | gemm ms | awq GB/s | awq TFLOP/s "
          "| dense GB/s | x dense | x deq+mm |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def markdown_row(r: Row) -> str:
    return (f"| {r.shape} | {r.m} | {r.kernel} | {_fmt(r.awq_ms)} | {_fmt(r.dense_ms)} | {_fmt(r.deq_mm_ms)} | "
            f"{_fmt(r.gemv_ms)} | {_fmt(r.gemm_ms)} | {r.awq_gbps:.1f} | {r.awq_tflops:.3f} | {r.dense_gbps:.1f} | "
            f"{r.speedup_vs_dense:.2f} | {r.speedup_vs_deq_mm:.2f} |")


def environment(device: str, dtype: torch.dtype) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "device": device,
           "dtype": str(dtype), "group_size": GROUP_SIZE}
    if device == "cuda":
        import triton

        env.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def markdown(env: dict, rows: list[Row], decode: Decode | None) -> str:
    lines = ["## INT4 matmul benchmark", "", ", ".join(f"{k}: {v}" for k, v in env.items()), "", HEADER]
    lines += [markdown_row(r) for r in rows]
    if decode is not None:
        lines += ["", "## Decode", "",
                  "| device | layers | new tokens | fp tokens/s | awq tokens/s | speed-up | quantized Linear |",
                  "|---|---|---|---|---|---|---|",
                  f"| {decode.device} | {decode.layers} | {decode.tokens} | {decode.fp_tokens_per_s:.1f} | "
                  f"{decode.awq_tokens_per_s:.1f} | {decode.speedup:.2f} | {decode.linear} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset on CPU, under a minute")
    parser.add_argument("--json", metavar="FILE", help="also write rows and decode results as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write the markdown tables to FILE")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode tokens/s measurement")
    parser.add_argument("--shapes", nargs="*", metavar="KxN", help="override the Linear shapes, e.g. 4096x4096")
    parser.add_argument("--batches", nargs="*", type=int, metavar="M", help="override the batch sizes")
    parser.add_argument("--cpu-paths", action="store_true",
                        help="only compare the CPU strategies (dequantize, cached dense, torch int4) and exit")
    parser.add_argument("--compile-report", type=int, metavar="SM",
                        help="compile the GPU candidates for sm_SM (e.g. 90) without a GPU, list registers/spills, exit")
    args = parser.parse_args(argv)
    if args.compile_report:
        text = compile_report(args.compile_report)
        print("\n" + text)
        return 0
    if args.cpu_paths:
        k, n = tuple(map(int, args.shapes[0].lower().split("x"))) if args.shapes else QUICK_SHAPES[0]
        text = cpu_paths(k, n, args.batches or QUICK_BATCHES)
        print("\n" + text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        return 0

    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shapes] if args.shapes else (
        QUICK_SHAPES if device == "cpu" else SHAPES)
    batches = args.batches or (QUICK_BATCHES if device == "cpu" else BATCHES)
    env = environment(device, dtype)
    print(", ".join(f"{k}: {v}" for k, v in env.items()))
    print(HEADER, flush=True)
    rows = []
    for k, n in shapes:
        rows += bench_shape(k, n, batches, device, dtype)
    decode = None if args.no_decode else bench_decode(device, quick=device == "cpu")
    text = markdown(env, rows, decode)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": [asdict(r) for r in rows],
                       "decode": None if decode is None else asdict(decode)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

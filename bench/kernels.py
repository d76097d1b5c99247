"""Benchmark the AWQ INT4 matmuls against dense matmul, per Linear shape and batch size, plus decode.

    python bench/kernels.py                      # GPU: all shapes x all M, then decode tokens/s
    python bench/kernels.py --quick              # CPU: a small subset in under a minute
    python bench/kernels.py --json out.json --markdown out.md
    python bench/kernels.py --cpu-paths          # CPU strategies behind the dispatcher's CPU branch
    python bench/kernels.py --compile-report 90 --json  # no GPU: SASS per weight of every kernel

Per (K x N, M) row, side by side in one run:

* every INT4 strategy (GPU: ``gemv`` up to 8 rows, ``gemm``, ``dequant+matmul``; CPU: the torch int4
  kernel and dequantize + matmul), each checked against ``x @ dequantized W`` in fp32 (the run
  fails on a relative error above MAX_REL_ERR) and timed; ``kernel`` names what ``awq_matmul``'s
  dispatcher picks and ``awq ms`` is that strategy's time, ``fastest`` the best one measured;
* ``dense``: ``F.linear`` with the dense weight in the activation dtype (fp16 on GPU; bf16 on CPU,
  where fp16 matmul has no fast kernel).

Bytes for GB/s are the fewest a kernel must move: activations + packed weight + zeros + scales +
output for AWQ (the dense weight for ``dense``). TFLOP/s counts ``2*M*N*K``. GPU times are CUDA-graph
replays over weight copies that overflow L2 (see :class:`Timer`), plus one eager call per row to
show the Python launch cost; CPU times are the fastest of CPU_REPS runs. A GPU run ends with the
fastest strategy per batch size (to place the dispatch thresholds) and the launch configs.

Decode (batch 1, greedy): random Llama models with Llama-7B and SmolLM2-135M shapes, fp16 vs AWQ
(decoder Linears replaced by ``WQLinear``; lm_head stays dense), through transformers' eager loop
and through ``awq_nb.graph_decode.StaticDecoder`` (one CUDA graph per token on GPU). ``--quick``
uses a tiny Llama on CPU; ``--dry-run`` runs the GPU code path under Triton's interpreter.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
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
DRY_SHAPES = [(256, 512)]
DRY_BATCHES = [1, 3, 17]
MAX_REL_ERR = 1e-2          # any strategy above this (vs x @ dequantized W in fp32) fails the run
GROUP_SIZE = 128
CPU_REPS = 5
GEMV_FORCED_MAX_M = 8      # the GEMV kernel's limit (kernels/gemv.py MAX_ROWS)
DECODE_TOKENS_GPU = 64
DECODE_PROMPT = 16


@dataclass
class Row:
    shape: str
    m: int
    kernel: str                 # what awq_matmul's dispatcher picks for this M
    awq_ms: float               # the time of that kernel
    dense_ms: float
    times_ms: dict              # every INT4 strategy timed for this row
    rel_err: dict               # ||out - ref|| / ||ref|| per strategy, ref = x @ dequantized W in fp32
    best: str = ""
    eager_awq_ms: float | None = None   # one awq_matmul call from Python (GPU: includes the launch cost)
    eager_dense_ms: float | None = None
    awq_gbps: float = 0.0
    awq_tflops: float = 0.0
    dense_gbps: float = 0.0
    speedup_vs_dense: float = 0.0
    speedup_vs_deq_mm: float = 0.0


@dataclass
class Decode:
    model: str
    layers: int
    tokens: int
    device: str
    mode: str                   # "cuda graph" (StaticDecoder) or "eager" (transformers forward + KV cache)
    fp_tokens_per_s: float
    awq_tokens_per_s: float
    linear: str
    note: str = ""
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


def quantize_decoder(model: nn.Module, group_size: int = GROUP_SIZE) -> str:
    """Replace every Linear inside ``model.model.layers`` in place by ``awq_nb.WQLinear`` (RTN
    weights: the speed does not depend on how the scales were searched); lm_head stays dense."""
    from awq_nb.wqlinear import WQLinear

    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            q = WQLinear.from_linear(module, 4, group_size)
            if q.qweight.device.type == "cpu":
                q.prepare_cpu_int4()
            model.model.layers.set_submodule(name, q)
    return f"awq_nb WQLinear g{group_size}"


# ---------------------------------------------------------------------------------------------
# timing


class Timer:
    """GPU: kernel time from CUDA-graph replay (``awq_nb.kernels.common.graph_bench``): the Python
    launch cost is left out, as in a served model. Each measured call uses the next of several
    copies of the weights, enough copies to overflow L2 three times, so weights come from HBM.
    ``eager_ms`` is ``triton.testing.do_bench`` of one call from Python (L2 flushed), which is
    bounded below by the launch cost. CPU (``--quick``, ``--dry-run``): the fastest of ``reps``
    perf_counter runs of the first copy (the CPU boxes are shared: the minimum is the stable figure)."""

    def __init__(self, device: str, reps: int = CPU_REPS):
        self.device, self.reps = device, reps

    def ms(self, fns) -> float:
        """Time per call; ``fns`` is one callable per weight copy."""
        if self.device == "cuda":
            from awq_nb.kernels.common import graph_bench

            def rotate():
                for fn in fns:
                    fn()

            calls = max(1, 24 // len(fns))
            return graph_bench(rotate, calls=calls, flush_l2=False) / len(fns)  # the copies already overflow L2
        fn = fns[0]
        fn()
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return min(times)

    def eager_ms(self, fn) -> float | None:
        if self.device != "cuda":
            return None
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def copies_for(nbytes: int, device: str) -> int:
    """How many copies of a weight of ``nbytes`` overflow the GPU's L2 three times (1 on CPU)."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(32, -(-3 * l2 // nbytes)))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def int4_strategies(device: str, triton_kernels: bool, qweight, qzeros, scales, group_size: int) -> dict:
    """name -> fn(x): every INT4 path that can serve ``x`` on this device (names as in dispatch)."""
    from awq_nb.kernels import dispatch

    if triton_kernels:
        from awq_nb.kernels.dequant import awq_dequantize
        from awq_nb.kernels.gemm import awq_gemm
        from awq_nb.kernels.gemv import MAX_ROWS, awq_gemv
        from awq_nb.kernels.native import to_native

        native = to_native(qweight, qzeros, scales, group_size)  # once, as WQLinear does at load

        def gemv(x):
            return awq_gemv(x, native) if x.shape[0] <= MAX_ROWS else None

        return {dispatch.GEMV: gemv,
                dispatch.GEMM: lambda x: awq_gemm(x, native),
                dispatch.DEQUANT_MATMUL: lambda x: x @ awq_dequantize(native)}
    cpu_weight = prepare_cpu_int4(qweight, qzeros, scales, group_size) if int4_cpu_supported(
        scales.shape[1], group_size) else None
    paths = {dispatch.CPU_DEQUANT_MATMUL: lambda x: awq_matmul(x, qweight, qzeros, scales, group_size)}
    if cpu_weight is not None:
        paths[dispatch.CPU_INT4] = lambda x: awq_matmul(x, qweight, qzeros, scales, group_size, cpu_weight=cpu_weight)
    return paths


def chosen_strategy(m: int, device: str, triton_kernels: bool, has_cpu_int4: bool) -> str:
    from awq_nb.kernels import dispatch

    if device == "cuda":
        return choose_kernel(m, torch.device("cuda"))
    if triton_kernels:  # --dry-run: the CUDA rule, as on an sm90 GPU
        return dispatch.cuda_strategy(m, (9, 0))
    return choose_kernel(m, torch.device("cpu"), has_cpu_int4)


def bench_shape(k: int, n: int, batches: list[int], device: str, dtype: torch.dtype, timer: Timer,
                triton_kernels: bool) -> list[Row]:
    from awq_nb.kernels import dequantize_ref

    gen = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
    qweight, qzeros, scales = quantize_weight(w)
    w_ref = dequantize_ref(qweight, qzeros, scales, GROUP_SIZE).float()  # [K, N], what every path computes
    weight_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * scales.element_size()
    q_copies = [(qweight, qzeros, scales)] + [tuple(t.clone() for t in (qweight, qzeros, scales))
                                             for _ in range(copies_for(weight_bytes, device) - 1)]
    dense = [w] + [w.clone() for _ in range(copies_for(w.numel() * w.element_size(), device) - 1)]
    paths = [int4_strategies(device, triton_kernels, *c, GROUP_SIZE) for c in q_copies]
    rows = []
    for m in batches:
        x = torch.randn(m, k, generator=gen, device=device).to(dtype)
        ref = x.float() @ w_ref
        times, errors = {}, {}
        for name, fn in paths[0].items():
            out = fn(x)
            if out is None:  # e.g. the GEMV kernel above its row limit
                continue
            errors[name] = rel_err(out, ref)
            times[name] = timer.ms([functools.partial(p[name], x) for p in paths])
        dense_ms = timer.ms([functools.partial(F.linear, x, d) for d in dense])
        kernel = chosen_strategy(m, device, triton_kernels, "cpu-int4" in paths[0])
        awq = times[kernel]
        deq_name = next(name for name in times if "dequant" in name)
        act_bytes = (m * k + m * n) * x.element_size()
        row = Row(shape=f"{k}x{n}", m=m, kernel=kernel, awq_ms=awq, dense_ms=dense_ms, times_ms=times, rel_err=errors,
                  best=min(times, key=times.get),
                  eager_awq_ms=timer.eager_ms(lambda: awq_matmul(x, qweight, qzeros, scales, GROUP_SIZE)),
                  eager_dense_ms=timer.eager_ms(lambda: F.linear(x, w)),
                  awq_gbps=(act_bytes + weight_bytes) / awq / 1e6,
                  awq_tflops=2 * m * n * k / awq / 1e9,
                  dense_gbps=(act_bytes + w.numel() * w.element_size()) / dense_ms / 1e6,
                  speedup_vs_dense=dense_ms / awq, speedup_vs_deq_mm=times[deq_name] / awq)
        rows.append(row)
        print(markdown_row(row), flush=True)
    return rows


def launch_choices(shapes: list[tuple[int, int]], batches: list[int]) -> str:
    """The launch configuration of each Triton kernel per shape and M (printed after a GPU run)."""
    from awq_nb.kernels import gemm, gemv
    from awq_nb.kernels.common import sm_count

    sms = sm_count(torch.device("cuda"))
    lines = []
    for k, n in shapes:
        for m in batches:
            if m <= gemv.MAX_ROWS:
                lines.append(f"gemv {k}x{n} M={m}: {gemv.launch_config(m, n, k, GROUP_SIZE, sms)}")
            lines.append(f"gemm {k}x{n} M={m}: {gemm.launch_config(m, n, k, GROUP_SIZE, sms)}")
    return "\n".join(lines)


def run_matmul(shapes: list[tuple[int, int]], batches: list[int], device: str | None = None) -> list[Row]:
    """The matmul table for ``shapes`` (K, N) x ``batches`` on ``device`` (default: CUDA when there is
    one), each row printed as it is measured; what notebooks/05_int4_kernels.ipynb calls."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    timer = Timer(device)
    print(HEADER, flush=True)
    return [r for k, n in shapes for r in bench_shape(k, n, batches, device, dtype, timer, device == "cuda")]


def threshold_summary(rows: list[Row]) -> str:
    """Per M: how often each strategy was fastest, and its geometric-mean speed-up over dense."""
    lines = ["| M | fastest strategy (shapes won) | dispatcher's pick | pick's geo-mean x dense | best's geo-mean x dense |",
             "|---|---|---|---|---|"]
    for m in sorted({r.m for r in rows}):
        group = [r for r in rows if r.m == m]
        wins = {}
        for r in group:
            wins[r.best] = wins.get(r.best, 0) + 1
        pick = statistics.geometric_mean([r.speedup_vs_dense for r in group])
        best = statistics.geometric_mean([r.dense_ms / r.times_ms[r.best] for r in group])
        lines.append(f"| {m} | " + ", ".join(f"{k} {v}/{len(group)}" for k, v in sorted(wins.items(), key=lambda kv: -kv[1]))
                     + f" | {group[0].kernel} | {pick:.2f} | {best:.2f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# decode


def llama(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, device: str,
          dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=vocab == 49152)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# name: (layers, hidden, intermediate, heads, kv_heads, vocab, group size)
DECODE_MODELS = {
    "Llama-7B shapes (random weights)": (32, 4096, 11008, 32, 32, 32000, 128),
    "SmolLM2-135M shapes (random weights)": (30, 576, 1536, 9, 3, 49152, 64),
}
QUICK_DECODE = {"tiny Llama (random weights)": (2, 256, 768, 4, 4, 32000, 128)}


@torch.no_grad()
def eager_tokens_per_s(model: nn.Module, tokens: int, device: str) -> float:
    """transformers forward with its dynamic KV cache, one token at a time (what generate() does)."""
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

    run()  # warm-up: compilation happens here
    return statistics.median(run() for _ in range(3))


def static_tokens_per_s(model: nn.Module, tokens: int, graph: bool) -> tuple[float, list[int], list[int]]:
    """StaticDecoder replaying one CUDA graph per token (``graph``; else its eager step, as on CPU);
    also its eager and timed tokens for one prompt (with a graph they should agree: it replays the
    same kernels)."""
    from awq_nb.graph_decode import StaticDecoder

    decoder = StaticDecoder(model, max_len=DECODE_PROMPT + tokens)
    prompt = list(range(1, DECODE_PROMPT + 1))
    eager = decoder.generate(prompt, tokens, graph=False)
    timed = decoder.generate(prompt, tokens, graph=graph)
    rates = [decoder.tokens_per_s]
    for _ in range(2):
        decoder.generate(prompt, tokens, graph=graph)
        rates.append(decoder.tokens_per_s)
    return statistics.median(rates), eager, timed


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_decode(device: str, quick: bool) -> list[Decode]:
    """fp vs AWQ tokens/s per model: transformers' eager forward, and the StaticDecoder loop (one
    CUDA graph per token on GPU; its eager step on CPU)."""
    tokens = 8 if quick else DECODE_TOKENS_GPU
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    static_mode = "cuda graph" if device == "cuda" else "static cache, eager"
    results = []
    for name, (layers, *dims, group_size) in (QUICK_DECODE if quick else DECODE_MODELS).items():
        model = llama(layers, *dims, device=device, dtype=dtype)
        fp_eager = eager_tokens_per_s(model, tokens, device)
        fp_static = static_tokens_per_s(model, tokens, graph=device == "cuda")[0]
        label = quantize_decoder(model, group_size)
        awq_eager = eager_tokens_per_s(model, tokens, device)
        results.append(Decode(name, layers, tokens, device, "transformers eager", fp_eager, awq_eager, label))
        print(decode_row(results[-1]), flush=True)
        awq_static, eager_ids, timed_ids = static_tokens_per_s(model, tokens, graph=device == "cuda")
        same = sum(a == b for a, b in zip(eager_ids, timed_ids))
        results.append(Decode(name, layers, tokens, device, static_mode, fp_static, awq_static, label,
                              note=f"AWQ tokens, timed vs eager step: {same}/{tokens} agree"))
        print(decode_row(results[-1]), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def ceilings() -> str:
    """Measured copy bandwidth and fp16 matmul rate of this GPU (the two numbers METHOD.md asks for)."""
    import triton.testing

    src = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda").normal_()  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    src = dst = None
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms = triton.testing.do_bench(lambda: x @ y, warmup=10, rep=50, return_mode="median")
    return (f"ceilings: device-to-device copy {2 * 2 * 1024**3 / copy_ms / 1e6:.0f} GB/s (read + write), "
            f"fp16 8192^3 matmul {2 * 8192**3 / mm_ms / 1e9:.0f} TFLOP/s")


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
            cells.append(f"{Timer('cpu').ms(lambda: fn(x)):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# compile report (needs no GPU: triton compiles for a named target; ptxas -v gives registers)


REPORT_SHAPES = ((4096, 4096), (8192, 8192))  # (K, N) whose CTA counts the report gives
REPORT_CASES = (("gemv", 1), ("gemv", 4), ("gemm", 16), ("gemm", 64), ("dequant", 0))


def compile_case(name: str, m: int, capability: int, k: int = 4096, n: int = 4096, group_size: int = GROUP_SIZE,
                 dtype: torch.dtype = torch.float16):
    """Compile kernel ``name`` exactly as a launch for ``x [m, k]`` on an sm_<capability> GPU with 132
    SMs would (its launch configuration, the JIT's specialization, the asm path); returns
    ``(KernelReport, Compiled)``. No GPU needed."""
    from awq_nb.kernels import dequant, gemm, gemv, sass
    from awq_nb.kernels.common import REFERENCE_SMS, launch_buffers

    w = sass.example_native(k, n, group_size, dtype)
    if name == "dequant":
        args, meta = dequant.kernel_args(w, torch.empty(k, n, dtype=dtype), use_asm=True)
        compiled = sass.compile_launch(dequant._dequantize_kernel, args, meta, capability)
        per_step, ctas, config = dequant.BLOCK_K * dequant.BLOCK_N // (32 * dequant.NUM_WARPS), (
            lambda kk, nn: -(-kk // dequant.BLOCK_K) * -(-nn // dequant.BLOCK_N)), "one tile per program"
        loop = None
    else:
        module = {"gemv": gemv, "gemm": gemm}[name]
        x = torch.zeros(m, k, dtype=dtype)
        cfg = module.launch_config(m, n, k, group_size, REFERENCE_SMS)
        out, workspace, tickets = launch_buffers(x, n)
        args, meta = module.kernel_args(x, w, None, out, workspace, tickets, cfg, use_asm=True)
        kernel = gemv._gemv_kernel if name == "gemv" else gemm._gemm_kernel
        compiled = sass.compile_launch(kernel, args, meta, capability)
        per_step = cfg.block_k * cfg.block_n // (32 * cfg.num_warps)
        ctas = (lambda kk, nn: module.launch_config(m, nn, kk, group_size, REFERENCE_SMS).ctas(nn)) if name == "gemv" else (
            lambda kk, nn: module.launch_config(m, nn, kk, group_size, REFERENCE_SMS).ctas(m, nn))
        config = str(cfg)
        loop = sass.hottest_loop(compiled.sass)
    if loop is None:  # straight-line kernel: the whole program is one step
        instrs, _ = sass.instructions(compiled.sass)
        loop = sass.loop_stats(instrs)
    per_weight = loop.instructions / per_step
    report = sass.KernelReport(
        name=name, sm=capability, m=m, registers=compiled.registers, spill_bytes=compiled.spill_bytes,
        smem_bytes=compiled.smem_bytes, weight_load_bits=loop.widest_load_bits,
        loop_instructions_per_weight=round(per_weight, 3), loop_shared_or_barrier=loop.shared_or_barrier,
        ctas_4096=ctas(*REPORT_SHAPES[0]), ctas_8192=ctas(*REPORT_SHAPES[1]), config=config,
        loop_instructions=loop.instructions, weights_per_thread_per_step=per_step,
        ceiling_tb_s=round(sass.issue_ceiling_tb_s(per_weight), 2))
    return report, compiled


def compile_report(capabilities: list[int], as_json: bool = False) -> str:
    """Compile every kernel's launch for each capability (fp16, g=128, 4096x4096) and report what
    its machine code does per weight; the last line is one JSON object when ``as_json``."""
    import triton

    from awq_nb.kernels import sass

    reason = sass.tools_available()
    if reason:
        raise SystemExit(f"compile report: {reason}")
    reports = [compile_case(name, m, cap)[0] for cap in capabilities for name, m in REPORT_CASES]
    lines = [f"Compile report (triton {triton.__version__}; fp16, g={GROUP_SIZE}, K=N=4096, launch configs for 132 SMs; "
             f"budget {sass.BUDGET_PER_WEIGHT} instructions per weight at 4.3 TB/s)", "",
             "| kernel | sm | M | registers | spill B | smem B | widest load | instr / weight (loop) | "
             "shared/barrier in loop | CTAs 4096^2 | CTAs 8192^2 | issue ceiling TB/s | config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.name} | {r.sm} | {r.m} | {r.registers} | {r.spill_bytes} | {r.smem_bytes} | "
                     f"{r.weight_load_bits} | {r.loop_instructions_per_weight:.2f} | {r.loop_shared_or_barrier} | "
                     f"{r.ctas_4096} | {r.ctas_8192} | {r.ceiling_tb_s:.2f} | {r.config} |")
    text = "\n".join(lines) + "\n"
    if as_json:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        text += "\n" + json.dumps({"kernels": [r.as_json() for r in reports], "triton": triton.__version__,
                                   "date": stamp}) + "\n"
    return text


# ---------------------------------------------------------------------------------------------
# output


HEADER = ("| K x N | M | kernel | awq ms | dense ms | gemv ms | gemm ms | deq+mm ms | fastest | max rel err | awq GB/s "
          "| awq TFLOP/s | dense GB/s | x dense | x deq+mm | eager awq ms | eager dense ms |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def markdown_row(r: Row) -> str:
    def t(*names):
        return next((r.times_ms[n] for n in names if n in r.times_ms), None)

    return (f"| {r.shape} | {r.m} | {r.kernel} | {_fmt(r.awq_ms)} | {_fmt(r.dense_ms)} | {_fmt(t('gemv'))} | "
            f"{_fmt(t('gemm', 'cpu-int4'))} | {_fmt(t('dequant+matmul', 'cpu-dequant+matmul'))} | {r.best} | "
            f"{max(r.rel_err.values()):.1e} | {r.awq_gbps:.1f} | {r.awq_tflops:.3f} | {r.dense_gbps:.1f} | "
            f"{r.speedup_vs_dense:.2f} | {r.speedup_vs_deq_mm:.2f} | {_fmt(r.eager_awq_ms)} | {_fmt(r.eager_dense_ms)} |")


DECODE_HEADER = ("| model | layers | new tokens | mode | fp tokens/s | awq tokens/s | speed-up | quantized Linear | note |\n"
                 "|---|---|---|---|---|---|---|---|---|")


def decode_row(d: Decode) -> str:
    return (f"| {d.model} | {d.layers} | {d.tokens} | {d.mode} | {d.fp_tokens_per_s:.1f} | {d.awq_tokens_per_s:.1f} | "
            f"{d.speedup:.2f} | {d.linear} | {d.note} |")


def environment(device: str, dtype: torch.dtype, dry_run: bool = False) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "device": device,
           "dtype": str(dtype), "group_size": GROUP_SIZE}
    if device == "cuda":
        import triton

        env.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    if dry_run:
        env["mode"] = "dry run: Triton kernels in the interpreter (times mean nothing)"
    return env


def markdown(env: dict, rows: list[Row], decode: list[Decode], extra: str = "") -> str:
    lines = ["## INT4 matmul benchmark", "", ", ".join(f"{k}: {v}" for k, v in env.items())]
    if extra:
        lines += ["", extra]
    if rows:
        lines += ["", HEADER] + [markdown_row(r) for r in rows]
        lines += ["", "### Fastest strategy per batch size", "", threshold_summary(rows).rstrip()]
    if decode:
        lines += ["", "## Decode (batch 1, greedy)", "", DECODE_HEADER] + [decode_row(d) for d in decode]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset on CPU, under a minute")
    parser.add_argument("--json", metavar="FILE", nargs="?", const="-",
                        help="also write rows and decode results as JSON (with --compile-report: print the JSON line; "
                             "FILE also gets it)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the markdown tables to FILE")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode tokens/s measurement")
    parser.add_argument("--decode-only", action="store_true", help="only the decode tokens/s measurement")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the GPU code path on CPU with Triton's interpreter, on a tiny shape (checks the "
                             "script before a GPU session; the times mean nothing)")
    parser.add_argument("--shapes", nargs="*", metavar="KxN", help="override the Linear shapes, e.g. 4096x4096")
    parser.add_argument("--batches", nargs="*", type=int, metavar="M", help="override the batch sizes")
    parser.add_argument("--cpu-paths", action="store_true",
                        help="only compare the CPU strategies (dequantize, cached dense, torch int4) and exit")
    parser.add_argument("--compile-report", type=int, nargs="*", metavar="SM",
                        help="compile every kernel's launch for sm_SM (default: 90 80 75) without a GPU; report registers, "
                             "spills, load widths and SASS instructions per weight, exit (with --json: a JSON last line)")
    args = parser.parse_args(argv)
    if args.compile_report is not None:
        os.environ.pop("TRITON_INTERPRET", None)
        text = compile_report(args.compile_report or [90, 80, 75], as_json=args.json is not None)
        print(text, end="")
        if args.json and args.json != "-":
            with open(args.json, "w") as f:
                f.write(text.rstrip().splitlines()[-1] + "\n")
        return 0
    if args.cpu_paths:
        k, n = tuple(map(int, args.shapes[0].lower().split("x"))) if args.shapes else QUICK_SHAPES[0]
        text = cpu_paths(k, n, args.batches or QUICK_BATCHES)
        print("\n" + text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        return 0

    if args.dry_run:  # before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cpu" if args.quick or args.dry_run or not torch.cuda.is_available() else "cuda"
    triton_kernels = device == "cuda" or args.dry_run
    dtype = torch.float16 if triton_kernels else torch.bfloat16
    default_shapes, default_batches = {"cuda": (SHAPES, BATCHES), "cpu": (QUICK_SHAPES, QUICK_BATCHES)}[device]
    if args.dry_run:
        default_shapes, default_batches = DRY_SHAPES, DRY_BATCHES
    shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shapes] if args.shapes else default_shapes
    batches = args.batches or default_batches
    env = environment(device, dtype, args.dry_run)
    print(", ".join(f"{k}: {v}" for k, v in env.items()))
    extra = ceilings() if device == "cuda" else ""
    print(extra)
    rows, decode = [], []

    def save():
        text = markdown(env, rows, decode, extra)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "ceilings": extra, "rows": [asdict(r) for r in rows],
                           "decode": [asdict(d) for d in decode]}, f, indent=1)
        return text

    timer = Timer(device, reps=1 if args.dry_run else CPU_REPS)
    if not args.decode_only:
        print(HEADER, flush=True)
        for k, n in shapes:
            rows += bench_shape(k, n, batches, device, dtype, timer, triton_kernels)
            save()
        print("\n" + threshold_summary(rows), flush=True)
        if device == "cuda":
            print(launch_choices(shapes, batches), flush=True)
    if not args.no_decode:
        print(DECODE_HEADER, flush=True)
        decode += bench_decode(device, quick=device == "cpu")
    print("\n" + save())
    bad = [(r.shape, r.m, name, e) for r in rows for name, e in r.rel_err.items() if not e <= MAX_REL_ERR]
    if bad:
        print(f"FAILED: relative error above {MAX_REL_ERR:g} (or NaN): {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

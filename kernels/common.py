"""Pieces shared by the Triton kernels: the in-register AWQ dequantization and launch helpers.

Loading one weight tile
-----------------------
A kernel that needs ``W^T[k, n]`` for the BLOCK_K rows from ``k_start`` and the BLOCK_N columns
from ``n_start`` (both multiples of their block, BLOCK_N a multiple of 8) reads three tensors
(``g = GROUP_SIZE``):

* ``qweight [K, N/8]``: columns ``n_start .. n_start + BLOCK_N`` live in the BLOCK_N/8 words from
  ``n_start / 8``, so the tile of *packed* words is
  ``qweight_ptr + offs_k[:, None] * stride_qk + offs_w[None, :]`` with
  ``offs_w = n_start / 8 + arange(BLOCK_N / 8)``. Loading packed words (not one word per column)
  keeps the bytes staged in shared memory by the software pipeline at 4 bits per weight.
  Three ``tl.interleave(w, w)`` then repeat every word 8 times in a row, giving the
  ``[BLOCK_K, BLOCK_N]`` tile in which column ``n`` holds the word that contains it.
* ``qzeros [K/g, N/8]`` and ``scales [K/g, N]``: row ``k // g``. When ``g`` is a multiple of
  BLOCK_K the whole tile sits in one group, so one row ``[1, BLOCK_N]`` is loaded and broadcast;
  otherwise the row index is gathered per ``k``.

Dequantization is ``(q - z) * s`` in float32, rounded once to the dtype of ``scales``: the same
rounding as :func:`awq_nb.kernels.reference.dequantize_ref`.

Split-K output protocol (GEMM and GEMV)
---------------------------------------
With ``SPLIT_K == 1`` a program owns its output tile: it adds the bias and stores ``x.dtype``
into ``out``. With ``SPLIT_K > 1`` several programs add float32 partial sums into a workspace
with ``tl.atomic_add``; the config's ``pre_hook`` zeroes that workspace before every launch
(also during autotuning), and the wrapper finishes with ``(workspace + bias).to(x.dtype)``.
Which of the two happened is read from the autotuner's ``best_config`` after the launch.

Configs
-------
Under the interpreter (``TRITON_INTERPRET=1``) ``@triton.autotune`` works with exactly one
config, so every kernel module has ``configs(interpret: bool)`` (a plain, cached function) and its
wrapper launches ``_tuned(configs(is_interpreting()))``: the flag is read at call time, and one
autotuner is built per tuple of candidates. Nothing probes the device at import.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from awq_nb.errors import AwqNbError

_TRUE = ("1", "true", "on", "yes")


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def check_launchable(t: torch.Tensor, kernel: str) -> None:
    """Compiled Triton kernels need a GPU tensor; the interpreter needs a CPU one."""
    if is_interpreting():
        if t.device.type != "cpu":
            raise AwqNbError(f"{kernel}: TRITON_INTERPRET=1 runs kernels on CPU tensors, got {t.device}; "
                             "unset TRITON_INTERPRET to run on the GPU.")
    elif t.device.type != "cuda":
        raise AwqNbError(f"{kernel}: compiled Triton kernels need CUDA tensors, got {t.device}; use "
                         "awq_nb.kernels.awq_matmul (it has a CPU path), or set TRITON_INTERPRET=1 "
                         "before importing triton to run the kernel in the interpreter.")


def dot_dtype(x_dtype: torch.dtype) -> tl.dtype:
    """Operand dtype for ``tl.dot``: fp16 for fp16 (no sm80-only feature), bf16 for bf16 on a GPU.

    The interpreter's bf16 ``tl.dot`` returns garbage (triton issue 11584), and casting bf16
    activations to fp16 could overflow, so under the interpreter bf16 operands go through fp32.
    """
    if x_dtype == torch.float16:
        return tl.float16
    if x_dtype == torch.bfloat16:
        return tl.float32 if is_interpreting() else tl.bfloat16
    raise AwqNbError(f"Triton INT4 kernels take float16 or bfloat16 activations, got {x_dtype}; "
                     "cast x (awq_matmul does this for float32).")


_FLUSH: dict = {}


def _l2_flush_buffer() -> torch.Tensor:
    """Twice the L2 of the current GPU, zeroed between timed calls so weights come from HBM."""
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 * 2**20) or 64 * 2**20
        _FLUSH[dev] = torch.empty(2 * l2 // 4, dtype=torch.int32, device="cuda")
    return _FLUSH[dev]


def _replay_ms(body, calls: int, replays: int) -> list[float]:
    """Per-replay ms of a CUDA graph holding ``calls`` runs of ``body``. Captured with
    capture_begin/capture_end on a side stream (``torch.cuda.graph`` would also run gc.collect and
    empty_cache for every autotune candidate)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        body()  # warm-up on the capture stream
        graph.capture_begin()
        try:
            for _ in range(calls):
                body()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def graph_bench(fn, quantiles=None, calls: int = 20, replays: int = 7, flush_l2: bool = True):
    """GPU time of ``fn`` in ms without its Python launch cost: ``calls`` runs captured in one CUDA
    graph, replayed ``replays`` times, CUDA events around each replay. With ``flush_l2`` a buffer of
    twice the L2 is zeroed before each run and a graph of the zeroing alone is timed and subtracted,
    so a decode-sized weight is read from HBM as in a real model. Returns the median (or the
    ``quantiles``, as ``triton.testing.do_bench`` does).

    Why not ``do_bench``: a Triton launch costs tens to hundreds of microseconds of Python, more
    than a decode-sized INT4 matmul runs, so eager timing measures the CPU and would make the
    autotuner pick configs at random. Graph replay is also how serving engines run these kernels.
    If capturing fails (e.g. inside someone else's capture), falls back to ``do_bench``.
    """
    fn()  # compile / autotune outside any capture
    try:
        if flush_l2:
            buf = _l2_flush_buffer()
            both = _replay_ms(lambda: (buf.zero_(), fn()), calls, replays)
            flush = _replay_ms(buf.zero_, calls, replays)
            times = [max(b - f, 0.0) / calls for b, f in zip(sorted(both), sorted(flush))]
        else:
            times = [t / calls for t in _replay_ms(fn, calls, replays)]
    except RuntimeError:
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=quantiles, return_mode="median")
    t = torch.tensor(times)
    if quantiles is not None:
        return torch.quantile(t, torch.tensor(quantiles, dtype=t.dtype)).tolist()
    return t.median().item()


def autotuner(fn, candidates: tuple[triton.Config, ...], key: list[str], prune=None):
    """``triton.autotune`` over ``candidates``, timed by :func:`graph_bench` where this Triton
    accepts a timer (3.2 and later)."""
    options = {"prune_configs_by": {"early_config_prune": prune}} if prune else {}
    if len(candidates) > 1 and "do_bench" in inspect.signature(triton.autotune).parameters:
        options["do_bench"] = graph_bench
    return triton.autotune(configs=list(candidates), key=key, **options)(fn)


def zero_workspace_if_split(nargs: dict) -> None:
    """Config pre_hook: split-K programs accumulate into ``ws_ptr`` with atomics, so zero it first."""
    if nargs["SPLIT_K"] > 1:
        nargs["ws_ptr"].zero_()


def finish_split_k(split_k: int, out: torch.Tensor, workspace: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return the result after a launch: ``out`` as stored, or the reduced workspace (+ bias)."""
    if split_k == 1:
        return out
    if bias is not None:
        workspace += bias.float()
    return workspace.to(out.dtype)


def launch_matmul(name: str, kernel, grid, x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                  scales: torch.Tensor, bias: torch.Tensor | None, n: int, extra: tuple = (), **meta) -> torch.Tensor:
    """Launch a GEMM/GEMV kernel with the shared argument list (tensors, sizes, strides, ``extra``)
    and the split-K output protocol; ``grid(meta, m, n)`` gives the launch grid. Inputs are checked."""
    check_launchable(x, name)
    qweight, qzeros, scales = (t.contiguous() for t in (qweight, qzeros, scales))
    m, k = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    workspace = torch.empty((m, n), dtype=torch.float32, device=x.device)
    kernel[lambda cfg: grid(cfg, m, n)](
        x, qweight, qzeros, scales, bias if bias is not None else out, out, workspace,
        m, n, k,
        x.stride(0), x.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        *extra, HAS_BIAS=bias is not None, **meta,
    )
    return finish_split_k(kernel.best_config.kwargs["SPLIT_K"], out, workspace, bias)


@triton.jit
def write_tile(acc, out_ptr, ws_ptr, bias_ptr, offs_m, offs_n, m_ok, N, stride_om,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of the split-K protocol: store ``acc [BLOCK_M, BLOCK_N]`` (+ bias) in ``out``'s
    dtype when the program owns its tile, else add it into the fp32 workspace atomically."""
    mask = m_ok[:, None] & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def awq_shifts(offs_n):
    """Right-shift that brings column ``n``'s nibble to the bottom: 4 * AWQ_REVERSE_ORDER[n % 8]."""
    j = offs_n % 8
    return ((j // 2) + (j % 2) * 4) * 4


@triton.jit
def dequantize_codes(q, z, s):
    """``(q - z) * s`` in fp32 (exact), rounded once to the dtype of ``s``: the reference's rounding."""
    return ((q - z).to(tl.float32) * s.to(tl.float32)).to(s.dtype)


@triton.jit
def dequantize_tile(qw, qz, s, shifts):
    """``(q - z) * s`` from packed words. ``qw [BK, BN]`` int32, ``qz`` and ``s`` broadcastable to it
    (``[1, BN]`` or ``[BK, BN]``), ``shifts [BN]``. Returns ``[BK, BN]`` in the dtype of ``s``."""
    return dequantize_codes((qw >> shifts[None, :]) & 0xF, (qz >> shifts[None, :]) & 0xF, s)


@triton.jit
def repeat_words_8(words):
    """``[R, C]`` -> ``[R, 8 * C]``, each word repeated 8 times in a row (w0 x8, w1 x8, ...)."""
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    return tl.interleave(words, words)


@triton.jit
def load_word_tile(ptr, rows, stride, row_ok, n_start, N, BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """``[R, BLOCK_N]`` int32: for each column ``n_start + j`` the packed word holding its nibble, from
    rows ``rows [R, 1]`` of a ``[.., N/8]`` tensor. GATHER loads each word once per column (the
    eight loads of a word coalesce into one transaction); otherwise the BLOCK_N/8 words are loaded
    once and repeated with ``tl.interleave``. Which is faster is left to the autotuner."""
    if GATHER:
        offs_n = n_start + tl.arange(0, BLOCK_N)
        return tl.load(ptr + rows * stride + (offs_n // 8)[None, :], mask=row_ok & (offs_n[None, :] < N), other=0)
    else:
        offs_w = n_start // 8 + tl.arange(0, BLOCK_N // 8)
        words = tl.load(ptr + rows * stride + offs_w[None, :], mask=row_ok & (offs_w[None, :] < N // 8), other=0)
        return repeat_words_8(words)


@triton.jit
def load_codes_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                    k_start, n_start, K, N,
                    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """The raw pieces of a tile that lies in one group (``GROUP_SIZE % BLOCK_K == 0``): codes
    ``q [BLOCK_K, BLOCK_N]`` int32, zeros ``z [1, BLOCK_N]`` int32 and scales ``s [1, BLOCK_N]``.
    Rows ``>= K`` and columns ``>= N`` have ``q = z = 0`` and ``s = 0``."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    shifts = awq_shifts(offs_n)[None, :]
    words = load_word_tile(qweight_ptr, offs_k[:, None], stride_qk, offs_k[:, None] < K, n_start, N, BLOCK_N, GATHER)
    group = k_start // GROUP_SIZE + tl.zeros((1, 1), dtype=tl.int32)
    zero_words = load_word_tile(qzeros_ptr, group, stride_zk, group >= 0, n_start, N, BLOCK_N, GATHER)
    s = tl.load(scales_ptr + group * stride_sk + offs_n[None, :], mask=offs_n[None, :] < N, other=0)
    return (words >> shifts) & 0xF, (zero_words >> shifts) & 0xF, s


@triton.jit
def load_weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                     k_start, n_start, K, N,
                     GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """Load and dequantize ``W^T[k_start : k_start + BLOCK_K, n_start : n_start + BLOCK_N]``.

    ``k_start`` and ``n_start`` are multiples of BLOCK_K and BLOCK_N; BLOCK_N is a multiple of 8.
    Rows ``>= K`` and columns ``>= N`` come back as 0, so they add nothing to a dot product.
    Returns ``[BLOCK_K, BLOCK_N]`` in the scales' dtype.
    """
    if GROUP_SIZE % BLOCK_K == 0:
        # The tile lies in one group: one row of zeros and scales, broadcast over the tile.
        q, z, s = load_codes_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                                  k_start, n_start, K, N, GROUP_SIZE, BLOCK_K, BLOCK_N, GATHER)
        return dequantize_codes(q, z, s)
    # BLOCK_K spans several groups: gather the group row for every k.
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    k_ok = offs_k[:, None] < K
    qw = load_word_tile(qweight_ptr, offs_k[:, None], stride_qk, k_ok, n_start, N, BLOCK_N, GATHER)
    group = offs_k[:, None] // GROUP_SIZE
    qz = load_word_tile(qzeros_ptr, group, stride_zk, k_ok, n_start, N, BLOCK_N, GATHER)
    s = tl.load(scales_ptr + group * stride_sk + offs_n[None, :], mask=k_ok & (offs_n[None, :] < N), other=0)
    return dequantize_tile(qw, qz, s, awq_shifts(offs_n))

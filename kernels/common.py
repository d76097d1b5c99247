"""Pieces shared by the Triton kernels: split-K output protocol, launch checks, timing.

The kernels read the kernel-native layout (kernels/native.py) and turn codes into numbers with the
helpers of kernels/nibbles.py.

Split-K output protocol (GEMM and GEMV)
---------------------------------------
With ``SPLIT_K == 1`` a program owns its output tile: it adds the bias and stores ``x.dtype``
into ``out``. With ``SPLIT_K > 1`` the SPLIT_K programs of a tile add their float32 partial sums
into a workspace with ``tl.atomic_add`` and then take a ticket from a per-tile counter; the
program that draws the last ticket reads the sum, adds the bias, stores ``x.dtype`` into ``out``,
and sets its workspace tile and counter back to zero (:func:`write_tile`). Workspace and counters
therefore stay zero between launches: they are allocated zeroed once per size and device
(:func:`zeroed_scratch`) and kept for the life of the process, because CUDA graphs that captured
a launch keep their addresses. A split-K call is one kernel: no memset before it, no cast after.
Split-K serves small batches only (``M <= SPLIT_K_MAX_M``), which bounds the workspace. Launches
that share a workspace must run one after another (one stream), as a model's layers do.

Configs
-------
Every kernel has a plain Python function that picks its block sizes and split from the shape and
the GPU's SM count (no autotuning: the choice is deterministic, costs nothing at the first call,
and the compile report of bench/kernels.py compiles exactly what a launch runs). Nothing probes
the device at import.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from awq_nb.errors import AwqNbError

from .validate import check_activation

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
    empty_cache on every call)."""
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
    than a decode-sized INT4 matmul runs, so eager timing measures the CPU and makes the
    comparison meaningless. Graph replay is also how serving engines run these kernels.
    If capturing fails (e.g. inside someone else's capture), falls back to ``do_bench``.
    """
    fn()  # compile outside any capture
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


SPLIT_K_MAX_M = 128  # batches above this have enough output tiles; their configs use SPLIT_K = 1
MIN_BLOCK_N = 32  # narrowest output tile of any split-K launch (sizes the ticket counters)

_SCRATCH: dict = {}


def zeroed_scratch(kind: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed buffer of at least ``numel`` elements that the kernels leave zeroed after each launch.

    One per (kind, device, power-of-two size), never freed: a CUDA graph that captured a launch
    replays it on the same address, so the buffer must outlive every graph."""
    size = triton.next_power_of_2(max(int(numel), 1))
    key = (kind, str(device), dtype, size)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.zeros(size, dtype=dtype, device=device)
    return _SCRATCH[key]


@triton.jit
def _store_out(acc, out_ptr, bias_ptr, offs_m, offs_n, mask, N, stride_om, HAS_BIAS: tl.constexpr):
    """``out[offs_m, offs_n] = acc (+ bias)`` in ``out``'s dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def write_tile(acc, out_ptr, ws_ptr, tickets_ptr, bias_ptr, offs_m, offs_n, m_ok, N, stride_om, tile,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of the split-K protocol for the output tile ``tile`` (``acc [BLOCK_M, BLOCK_N]``):
    store it (+ bias) in ``out``'s dtype when the program owns its tile; else add it into the fp32
    workspace and, in the last of the tile's SPLIT_K programs to arrive, store the sum and leave
    workspace tile and ticket counter at zero for the next launch."""
    mask = m_ok[:, None] & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        _store_out(acc, out_ptr, bias_ptr, offs_m, offs_n, mask, N, stride_om, HAS_BIAS)
    else:
        ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's add is issued before the release below (CTA -> GPU order)
        ticket = tl.atomic_add(tickets_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            total = tl.load(ws, mask=mask, other=0.0, cache_modifier=".cg")  # from L2, where the atomics landed
            tl.store(ws, tl.zeros_like(total), mask=mask)
            tl.atomic_xchg(tickets_ptr + tile, 0)
            _store_out(total, out_ptr, bias_ptr, offs_m, offs_n, mask, N, stride_om, HAS_BIAS)


_SMS: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 for the interpreter, as an H100/H200, so that
    launch configs and the compile report agree with the GPU they model)."""
    if device.type != "cuda":
        return REFERENCE_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


REFERENCE_SMS = 132  # H100 SXM / H200


def split_for(tiles: int, k_steps: int, sms: int, ctas_per_sm: int = 4, max_split: int = 32) -> int:
    """Smallest power-of-two split of K giving ``tiles * split >= ctas_per_sm * sms`` programs,
    at most ``k_steps`` (every program gets at least one K step) and ``max_split``."""
    split = 1
    while tiles * split < ctas_per_sm * sms and split * 2 <= min(k_steps, max_split):
        split *= 2
    return split


def check_native_launch(name: str, x: torch.Tensor, w, bias) -> tuple[int, int]:
    """The checks every native-layout kernel wrapper makes before launching; returns ``(K, N)``."""
    from .native import check_native

    k, n = check_native(w)
    check_activation(x, k, w.device, bias, n)
    if x.dtype not in (torch.float16, torch.bfloat16) or w.scales.dtype not in (torch.float16, torch.bfloat16):
        raise AwqNbError(f"{name} takes float16/bfloat16 x and scales, got {x.dtype} and {w.scales.dtype}; "
                         "cast them (awq_matmul does this for float32).")
    check_launchable(x, name)
    return k, n


def aligned_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its rows start on 16 bytes and its last dimension is contiguous (the GEMV
    reads eight values per 128-bit load), else an aligned copy."""
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and (x.shape[0] == 1 or (x.stride(0) * x.element_size()) % 16 == 0):
        return x
    return x.contiguous().clone()


def launch_buffers(x: torch.Tensor, n: int):
    """``out [M, N]`` in ``x.dtype`` plus the split-K workspace and ticket counters (see above)."""
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > SPLIT_K_MAX_M:  # no split-K launch at this M; the pointers are never read
        return out, out, out
    workspace = zeroed_scratch("workspace", m * n, torch.float32, x.device)
    tickets = zeroed_scratch("tickets", m * triton.cdiv(n, MIN_BLOCK_N), torch.int32, x.device)  # >= tiles
    return out, workspace, tickets

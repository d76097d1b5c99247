"""Pieces shared by the Triton kernels: the in-register AWQ dequantization and launch helpers.

Loading one weight tile
-----------------------
A kernel that needs ``W^T[k, n]`` for the BLOCK_K rows from ``k_start`` and the BLOCK_N columns
from ``n_start`` (both multiples of their block, BLOCK_N a multiple of 8) reads three tensors
(``g = GROUP_SIZE``):

* ``qweight [K, N/8]``: columns ``n_start .. n_start + BLOCK_N`` live in the BLOCK_N/8 words from
  ``n_start / 8``. How the packed words become a ``[BLOCK_K, BLOCK_N]`` tile of 4-bit codes is a
  config choice, ``UNPACK`` (:func:`load_codes`), left to the autotuner:

  - ``UNPACK_INTERLEAVE`` (0): load the ``[BLOCK_K, BLOCK_N/8]`` words once (contiguous, so the
    loads vectorize and the pipeline stages 4 bits per weight), repeat every word 8 times in a row
    with three ``tl.interleave``, then shift each column's nibble down;
  - ``UNPACK_GATHER`` (1): load, for each column, the word that holds it (eight loads of one word
    coalesce into one transaction; no register shuffles, but 8x the load instructions);
  - ``UNPACK_SPLIT`` (2): load the words once, shift each by the eight nibble offsets at once into
    ``[BLOCK_K, BLOCK_N/8, 8]`` and flatten the last two dimensions: one broadcast and one reshape;
  - ``UNPACK_WORDS`` (3, GEMV only): as SPLIT but kept 3-D; zeros and scales come in the same
    shape, and the GEMV accumulates ``[BLOCK_M, BLOCK_N/8, 8]``, flattened once after its K loop.
* ``qzeros [K/g, N/8]`` and ``scales [K/g, N]``: row ``k // g``. When ``g`` is a multiple of
  BLOCK_K the whole tile sits in one group, so one row ``[1, BLOCK_N]`` is loaded and broadcast;
  otherwise the row index is gathered per ``k``.

Dequantization is ``(q - z) * s`` in float32, rounded once to the dtype of ``scales``: the same
rounding as :func:`awq_nb.kernels.reference.dequantize_ref`.

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
Split-K serves small batches only (``M <= SPLIT_K_MAX_M``, enforced by the configs' pruning),
which bounds the workspace. Launches that share a workspace must run one after another (one
stream), as a model's layers do.

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

from .validate import check_activation, check_awq_weight

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


SPLIT_K_MAX_M = 128  # batches above this have enough output tiles; their configs use SPLIT_K = 1
MIN_BLOCK_M, MIN_BLOCK_N = 16, 32  # smallest tiles of any split-K candidate (sizes the counters)

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


def launch_matmul(name: str, kernel, grid, x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                  scales: torch.Tensor, group_size: int, bias: torch.Tensor | None, extra: tuple = (),
                  max_rows: int | None = None, **meta) -> torch.Tensor:
    """Check the inputs, then launch a GEMM/GEMV kernel with the shared argument list (tensors,
    sizes, strides, ``extra``) and the split-K output protocol; ``grid(meta, m, n)`` gives the
    launch grid. Returns ``x @ W^T (+ bias)`` ``[M, N]`` in ``x.dtype``."""
    k, n = check_awq_weight(qweight, qzeros, scales, group_size)
    check_activation(x, k, qweight.device, bias, n)
    m = x.shape[0]
    if max_rows is not None and not 1 <= m <= max_rows:
        raise AwqNbError(f"{name} takes 1..{max_rows} rows, got x with M={m}; use awq_nb.kernels.awq_gemm "
                         "or awq_matmul, which picks the kernel from M.")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise AwqNbError(f"{name} takes float16 or bfloat16 activations, got {x.dtype}; cast x "
                         "(awq_matmul does this for float32).")
    check_launchable(x, name)
    qweight, qzeros, scales = (t.contiguous() for t in (qweight, qzeros, scales))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m <= SPLIT_K_MAX_M:
        workspace = zeroed_scratch("workspace", m * n, torch.float32, x.device)
        tickets = zeroed_scratch("tickets", triton.cdiv(m, MIN_BLOCK_M) * triton.cdiv(n, MIN_BLOCK_N), torch.int32,
                                 x.device)
    else:  # no split-K config runs at this M (see the kernels' _prune); the pointers are never read
        workspace = tickets = out
    kernel[lambda cfg: grid(cfg, m, n)](
        x, qweight, qzeros, scales, bias if bias is not None else out, out, workspace, tickets,
        m, n, k,
        x.stride(0), x.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        *extra, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, **meta,
    )
    return out


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


@triton.jit
def awq_shifts(offs_n):
    """Right-shift that brings column ``n``'s nibble to the bottom: 4 * AWQ_REVERSE_ORDER[n % 8]."""
    j = offs_n % 8
    return ((j // 2) + (j % 2) * 4) * 4


@triton.jit
def dequantize_codes(q, z, s):
    """``(q - z) * s`` in fp32 (exact), rounded once to the dtype of ``s``: the reference's rounding."""
    return ((q - z).to(tl.float32) * s.to(tl.float32)).to(s.dtype)


UNPACK_INTERLEAVE, UNPACK_GATHER, UNPACK_SPLIT, UNPACK_WORDS = 0, 1, 2, 3  # the UNPACK choices (docstring)


@triton.jit
def repeat_words_8(words):
    """``[R, C]`` -> ``[R, 8 * C]``, each word repeated 8 times in a row (w0 x8, w1 x8, ...)."""
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    return tl.interleave(words, words)


@triton.jit
def load_word_codes(ptr, rows, stride, row_ok, n_start, N, BLOCK_N: tl.constexpr):
    """``[R, BLOCK_N/8, 8]`` int32 codes; ``[r, w, j]`` is column ``n_start + 8 w + j``. The
    BLOCK_N/8 words of each row are loaded once (contiguous) and shifted by all eight nibble
    offsets at once."""
    offs_w = n_start // 8 + tl.arange(0, BLOCK_N // 8)
    words = tl.load(ptr + rows * stride + offs_w[None, :], mask=row_ok & (offs_w[None, :] < N // 8), other=0)
    return (words[:, :, None] >> awq_shifts(tl.arange(0, 8))[None, None, :]) & 0xF


@triton.jit
def load_codes(ptr, rows, stride, row_ok, n_start, N, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
    """Codes 0..15 of columns ``n_start ..`` from rows ``rows [R, 1]`` of a packed ``[.., N/8]``
    tensor (qweight or qzeros), unpacked as ``UNPACK`` says: ``[R, BLOCK_N]`` int32, or
    ``[R, BLOCK_N/8, 8]`` for UNPACK_WORDS. Rows where ``row_ok`` is false and columns ``>= N``
    come back as 0."""
    if UNPACK == 1:  # UNPACK_GATHER
        offs_n = n_start + tl.arange(0, BLOCK_N)
        words = tl.load(ptr + rows * stride + (offs_n // 8)[None, :], mask=row_ok & (offs_n[None, :] < N), other=0)
        return (words >> awq_shifts(offs_n)[None, :]) & 0xF
    elif UNPACK == 2:  # UNPACK_SPLIT: [R, BLOCK_N/8, 8] flattened
        codes = load_word_codes(ptr, rows, stride, row_ok, n_start, N, BLOCK_N)
        return tl.reshape(codes, (codes.shape[0], BLOCK_N))
    elif UNPACK == 3:  # UNPACK_WORDS: kept 3-D
        return load_word_codes(ptr, rows, stride, row_ok, n_start, N, BLOCK_N)
    else:  # UNPACK_INTERLEAVE
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_w = n_start // 8 + tl.arange(0, BLOCK_N // 8)
        words = tl.load(ptr + rows * stride + offs_w[None, :], mask=row_ok & (offs_w[None, :] < N // 8), other=0)
        return (repeat_words_8(words) >> awq_shifts(offs_n)[None, :]) & 0xF


@triton.jit
def tile_columns(n_start, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
    """Column index of each element of a row of codes from :func:`load_codes`: ``[1, BLOCK_N]``,
    or ``[1, BLOCK_N/8, 8]`` for UNPACK_WORDS."""
    if UNPACK == 3:
        return (n_start + tl.arange(0, BLOCK_N // 8)[:, None] * 8 + tl.arange(0, 8)[None, :])[None, :, :]
    else:
        return (n_start + tl.arange(0, BLOCK_N))[None, :]


@triton.jit
def tile_rows(rows, UNPACK: tl.constexpr):
    """``[R, 1]`` row values made broadcastable against :func:`load_codes`' result."""
    if UNPACK == 3:
        return rows[:, :, None]
    else:
        return rows


@triton.jit
def load_codes_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                    k_start, n_start, K, N,
                    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
    """The raw pieces of a tile that lies in one group (``GROUP_SIZE % BLOCK_K == 0``): codes
    ``q [BLOCK_K, BLOCK_N]`` int32, zeros ``z [1, BLOCK_N]`` int32 and scales ``s [1, BLOCK_N]``
    (``[.., BLOCK_N/8, 8]`` each for UNPACK_WORDS). Rows ``>= K`` and columns ``>= N`` have
    ``q = z = 0`` and ``s = 0``."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    cols = tile_columns(n_start, BLOCK_N, UNPACK)
    q = load_codes(qweight_ptr, offs_k[:, None], stride_qk, offs_k[:, None] < K, n_start, N, BLOCK_N, UNPACK)
    group = k_start // GROUP_SIZE + tl.zeros((1, 1), dtype=tl.int32)
    z = load_codes(qzeros_ptr, group, stride_zk, group >= 0, n_start, N, BLOCK_N, UNPACK)
    s = tl.load(scales_ptr + tile_rows(group, UNPACK) * stride_sk + cols, mask=cols < N, other=0)
    return q, z, s


@triton.jit
def load_weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                     k_start, n_start, K, N,
                     GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
    """Load and dequantize ``W^T[k_start : k_start + BLOCK_K, n_start : n_start + BLOCK_N]``.

    ``k_start`` and ``n_start`` are multiples of BLOCK_K and BLOCK_N; BLOCK_N is a multiple of 8.
    Rows ``>= K`` and columns ``>= N`` come back as 0, so they add nothing to a dot product.
    Returns ``[BLOCK_K, BLOCK_N]`` (``[BLOCK_K, BLOCK_N/8, 8]`` for UNPACK_WORDS) in the scales' dtype.
    """
    if GROUP_SIZE % BLOCK_K == 0:
        # The tile lies in one group: one row of zeros and scales, broadcast over the tile.
        q, z, s = load_codes_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                                  k_start, n_start, K, N, GROUP_SIZE, BLOCK_K, BLOCK_N, UNPACK)
        return dequantize_codes(q, z, s)
    # BLOCK_K spans several groups: gather the group row for every k.
    offs_k = k_start + tl.arange(0, BLOCK_K)
    cols = tile_columns(n_start, BLOCK_N, UNPACK)
    k_ok = offs_k[:, None] < K
    group = offs_k[:, None] // GROUP_SIZE
    q = load_codes(qweight_ptr, offs_k[:, None], stride_qk, k_ok, n_start, N, BLOCK_N, UNPACK)
    z = load_codes(qzeros_ptr, group, stride_zk, k_ok, n_start, N, BLOCK_N, UNPACK)
    s = tl.load(scales_ptr + tile_rows(group, UNPACK) * stride_sk + cols, mask=tile_rows(k_ok, UNPACK) & (cols < N),
                other=0)
    return dequantize_codes(q, z, s)

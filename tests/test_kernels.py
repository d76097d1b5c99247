"""Tests for ``awq_nb.kernels``: packing layout, torch references, Triton kernels, dispatch.

On a machine without CUDA the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` is
set below before anything imports triton (it stays set for this pytest process, which is harmless
there because nothing can launch compiled Triton kernels without a GPU). With CUDA the kernels are
compiled and run on the GPU (see bench/gpu_check.sh).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

from awq_nb.errors import AwqNbError  # noqa: E402
from awq_nb.kernels import dispatch  # noqa: E402
from awq_nb.kernels.cpu import dequantize_cpu, prepare_cpu_int4  # noqa: E402
from awq_nb.kernels.layout import AWQ_ORDER, AWQ_REVERSE_ORDER, pack_awq, unpack_awq  # noqa: E402
from awq_nb.kernels.reference import dequantize_ref, gemm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
# Unit roundoff of each activation dtype: |out - ref| is bounded in multiples of it.
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


# ---------------------------------------------------------------------------------------------
# layout


def test_order_and_reverse_are_inverse_permutations():
    assert sorted(AWQ_ORDER) == list(range(8))
    assert [AWQ_ORDER[AWQ_REVERSE_ORDER[j]] for j in range(8)] == list(range(8))
    assert AWQ_REVERSE_ORDER == (0, 4, 1, 5, 2, 6, 3, 7)


def test_pack_hand_worked_example():
    # Column j holds value j. Nibble i holds column AWQ_ORDER[i], so nibbles 0..7 read
    # 0,2,4,6,1,3,5,7 and the word, written from nibble 7 down to nibble 0, is 0x75316420.
    values = torch.arange(8, dtype=torch.int32).reshape(1, 8)
    assert pack_awq(values).tolist() == [[0x75316420]]
    # Column j holds j+1: nibbles 1,3,5,7,2,4,6,8 -> 0x86427531, whose top bit is set, so the
    # int32 word is 0x86427531 - 2**32 (negative).
    values = torch.arange(1, 9, dtype=torch.int32).reshape(1, 8)
    assert pack_awq(values).tolist() == [[0x86427531 - 2**32]]
    assert unpack_awq(torch.tensor([[0x86427531 - 2**32]], dtype=torch.int32)).tolist() == [list(range(1, 9))]
    # Two words in a row, all 15s (word -1) and a single 15 in column 1 (nibble 4 -> 0x000F0000).
    packed = torch.tensor([[-1, 0x000F0000]], dtype=torch.int32)
    assert unpack_awq(packed).tolist() == [[15] * 8 + [0, 15, 0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("rows, cols", [(1, 8), (3, 24), (17, 64)])
def test_pack_unpack_round_trip(rows, cols):
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int32)
    packed = pack_awq(values)
    assert packed.dtype == torch.int32 and packed.shape == (rows, cols // 8)
    assert torch.equal(unpack_awq(packed), values)
    words = torch.randint(-2**31, 2**31 - 1, (rows, cols // 8), generator=g, dtype=torch.int32)
    assert torch.equal(pack_awq(unpack_awq(words)), words)


def test_pack_errors_name_the_problem():
    with pytest.raises(AwqNbError, match="multiple of 8"):
        pack_awq(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(AwqNbError, match="0..15"):
        pack_awq(torch.full((1, 8), 16, dtype=torch.int32))
    with pytest.raises(AwqNbError, match="integer"):
        pack_awq(torch.zeros(1, 8))
    with pytest.raises(AwqNbError, match="int32"):
        unpack_awq(torch.zeros(1, 1, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# helpers


def random_awq(k, n, group_size, dtype=torch.float16, seed=0, device=DEVICE):
    """Random codes and zeros over the full 0..15 range (so nibble 7 sets the sign bit) and
    positive scales; returns (qweight, qzeros, scales, codes [K, N], zeros [K/g, N])."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(k // group_size, n, generator=g) * 0.02 + 0.005).to(dtype)
    return pack_awq(codes).to(device), pack_awq(zeros).to(device), scales.to(device), codes, zeros


def random_x(m, k, dtype, seed=1, device=DEVICE):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def error_bound(x, w_t, ref, dtype, extra_w=None):
    """Elementwise bound ``eps * (|x| @ |W^T|) + 2 * eps * |ref|`` with eps the unit roundoff of
    ``dtype``: rounding of the dequantized weights (and activations) accumulates over K, and the
    result is rounded once more. ``extra_w`` adds per-weight slack (e.g. rounded int4 zeros)."""
    w_abs = w_t.float().abs() if extra_w is None else w_t.float().abs() + extra_w
    return EPS[dtype] * (x.float().abs() @ w_abs) + 2 * EPS[dtype] * ref.float().abs()


def assert_within(out, ref, bound):
    err = (out.float() - ref.float()).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds its bound by {worst:.3g}"


def check_against_ref(fn, m, k, n, group_size, dtype, with_bias, seed=0):
    qweight, qzeros, scales, _, _ = random_awq(k, n, group_size, dtype, seed)
    x = random_x(m, k, dtype, seed + 1)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)).to(dtype).to(DEVICE) if with_bias else None
    out = fn(x, qweight, qzeros, scales, group_size, bias)
    ref = gemm_ref(x, qweight, qzeros, scales, group_size, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    w_t = dequantize_ref(qweight, qzeros, scales, group_size)
    assert_within(out, ref, error_bound(x, w_t, ref, dtype))


# ---------------------------------------------------------------------------------------------
# references


def test_dequantize_ref_hand_worked_example():
    # K = 2 rows, N = 8 columns, one group (g = 2). Row 0 codes 0..7, row 1 codes 8..15; zeros
    # are 8 for every column; scales are 0.5 for column j < 4 and 2 for j >= 4.
    codes = torch.tensor([list(range(8)), list(range(8, 16))], dtype=torch.int32)
    qweight = torch.tensor([[0x75316420], [0xFDB9ECA8 - 2**32]], dtype=torch.int32)
    assert torch.equal(pack_awq(codes), qweight)
    qzeros = torch.tensor([[0x88888888 - 2**32]], dtype=torch.int32)
    scales = torch.tensor([[0.5] * 4 + [2.0] * 4], dtype=torch.float16)
    w_t = dequantize_ref(qweight, qzeros, scales, group_size=2)
    expected = [[-4.0, -3.5, -3.0, -2.5, -8.0, -6.0, -4.0, -2.0],
                [0.0, 0.5, 1.0, 1.5, 8.0, 10.0, 12.0, 14.0]]
    assert w_t.dtype == torch.float16 and w_t.tolist() == expected
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    bias = torch.arange(8, dtype=torch.float32)
    assert gemm_ref(x, qweight, qzeros, scales, 2, bias).tolist() == [[-4.0, -1.5, 1.0, 3.5, 12.0, 19.0, 26.0, 33.0]]


def test_dequantize_ref_groups_follow_rows():
    qweight, qzeros, scales, codes, zeros = random_awq(96, 24, 32, torch.float32, device="cpu")
    w_t = dequantize_ref(qweight, qzeros, scales, 32)
    for k in (0, 31, 32, 95):
        expected = (codes[k] - zeros[k // 32]).float() * scales[k // 32]
        assert torch.equal(w_t[k], expected)


def test_error_bound_catches_a_wrong_nibble_order():
    # The bound used below is tight enough to fail for a kernel that ignored the AWQ order.
    qweight, qzeros, scales, codes, zeros = random_awq(128, 64, 64, device="cpu")
    x = random_x(3, 128, torch.float16, device="cpu")
    ref = gemm_ref(x, qweight, qzeros, scales, 64)
    natural = codes.reshape(128, 8, 8)[:, :, list(AWQ_ORDER)].reshape(128, 64)  # misread columns
    wrong_t = ((natural - zeros.repeat_interleave(64, 0)).float() * scales.float().repeat_interleave(64, 0))
    wrong = (x.float() @ wrong_t).half()
    with pytest.raises(AssertionError):
        assert_within(wrong, ref, error_bound(x, dequantize_ref(qweight, qzeros, scales, 64), ref, torch.float16))


def test_input_errors_name_the_fix():
    qweight, qzeros, scales, _, _ = random_awq(128, 64, 64, device="cpu")
    x = random_x(2, 128, torch.float16, device="cpu")
    with pytest.raises(AwqNbError, match="qweight must be int32"):
        gemm_ref(x, qweight.float(), qzeros, scales, 64)
    with pytest.raises(AwqNbError, match="group_size=48 does not divide"):
        gemm_ref(x, qweight, qzeros, scales, 48)
    with pytest.raises(AwqNbError, match="scales has shape"):
        gemm_ref(x, qweight, qzeros, scales, 32)
    with pytest.raises(AwqNbError, match="expects K=128"):
        gemm_ref(x[:, :64], qweight, qzeros, scales, 64)
    with pytest.raises(AwqNbError, match="scales must be float16"):
        dequantize_ref(qweight, qzeros, scales.to(torch.int32), 64)
    with pytest.raises(AwqNbError, match="bias must have shape"):
        gemm_ref(x, qweight, qzeros, scales, 64, torch.zeros(8))


# ---------------------------------------------------------------------------------------------
# the native layout and the bit trick (plain torch / numpy)


@pytest.mark.parametrize("k, n, group_size", [(160, 200, 32), (384, 72, 64), (256, 4096, 128)])
def test_native_layout_round_trip_and_nibble_order(k, n, group_size):
    from awq_nb.kernels.native import from_native, to_native

    g = torch.Generator().manual_seed(k)
    qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), dtype=torch.int32, generator=g)  # every bit pattern
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // group_size, n // 8), dtype=torch.int32, generator=g)
    scales = torch.rand(k // group_size, n, generator=g).half()
    w = to_native(qweight, qzeros, scales, group_size)
    assert w.qweight.shape == (k // 8, n) and w.zeros.shape == (k // group_size, n) and w.scales is scales
    codes = unpack_awq(qweight).reshape(k // 8, 8, n)
    for i, offset in enumerate(AWQ_ORDER):  # nibble i of word (r, n) holds k = 8r + AWQ_ORDER[i]
        assert torch.equal((w.qweight >> (4 * i)) & 0xF, codes[:, offset])
    assert torch.equal(w.zeros.int(), unpack_awq(qzeros))
    back = from_native(w)
    assert torch.equal(back[0], qweight) and torch.equal(back[1], qzeros)


def test_native_layout_rejects_what_it_cannot_hold():
    from awq_nb.kernels.native import NativeInt4, check_native, to_native

    qweight, qzeros, scales, _, _ = random_awq(48, 16, 12, device="cpu")
    with pytest.raises(AwqNbError, match="multiple of 8"):
        to_native(qweight, qzeros, scales, 12)
    qweight, qzeros, scales, _, _ = random_awq(64, 16, 32, device="cpu")
    w = to_native(qweight, qzeros, scales, 32)
    with pytest.raises(AwqNbError, match="uint8"):
        check_native(NativeInt4(w.qweight, w.zeros.int(), w.scales, 32))


def test_bit_trick_gives_exact_q_minus_z_in_natural_k_order():
    # All 256 byte values of a nibble pair (the codes of k offsets 2p and 2p + 1, in the word's
    # nibbles p and p + 4), in each of the four pair positions of a word, against every zero 0..15,
    # through the kernels' instructions emulated in numpy: (q - z) must come out exact, in k order.
    import numpy as np

    from awq_nb.kernels.explain import decode_words
    from awq_nb.kernels.nibbles import K_SHIFTS, MAGIC_F16X2, SIXTEENTH_F16X2

    assert MAGIC_F16X2 == 0x64006400 and np.array([SIXTEENTH_F16X2 & 0xFFFF], np.uint16).view(np.float16)[0] == 1 / 16
    assert K_SHIFTS == tuple(4 * AWQ_REVERSE_ORDER[j] for j in range(8))
    pair_value = np.arange(256)
    lo, hi = pair_value & 0xF, pair_value >> 4
    for p in range(4):
        codes = np.zeros((256, 8), np.int64)
        codes[:, 2 * p], codes[:, 2 * p + 1] = lo, hi
        words = np.zeros(256, np.int64)
        for i, offset in enumerate(AWQ_ORDER):            # pack k offsets into nibbles, AWQ order
            words |= codes[:, offset] << (4 * i)
        for j in range(8):                                # the interpreter twin's shifts read the same codes
            assert np.array_equal((words >> K_SHIFTS[j]) & 0xF, codes[:, j])
        for z in range(16):
            got = decode_words(words, np.full(256, z))
            assert got.dtype == np.float16 and np.array_equal(got, codes - z), (p, z)
    full = np.random.default_rng(0).integers(0, 16, (4096, 8))  # and whole words with all 8 codes set
    words = np.zeros(4096, np.int64)
    for i, offset in enumerate(AWQ_ORDER):
        words |= full[:, offset] << (4 * i)
    zeros = np.random.default_rng(1).integers(0, 16, 4096)
    assert np.array_equal(decode_words(words, zeros), full - zeros[:, None])


def test_zero_constants_are_the_fp16_bits_the_asm_uses():
    import numpy as np

    z = np.arange(16, dtype=np.uint32)
    zlo = 0x64006400 + z * 0x00010001
    zhi = (0xD400D400 + z * 0x00100010) & 0xFFFFFFFF
    low = lambda v: (v & 0xFFFF).astype(np.uint16).view(np.float16)  # noqa: E731
    high = lambda v: (v >> 16).astype(np.uint16).view(np.float16)  # noqa: E731
    assert np.array_equal(low(zlo), 1024 + z) and np.array_equal(high(zlo), 1024 + z)
    assert np.array_equal(low(zhi), -(64.0 + z)) and np.array_equal(high(zhi), -(64.0 + z))


# ---------------------------------------------------------------------------------------------
# Triton kernels on the native layout (interpreter on CPU: the pure-Triton twin of the asm;
# compiled on a GPU: the asm). Shapes: N = 200 and 72 are not multiples of BLOCK_N = 128;
# K = 160 and 320 are not multiples of the GEMM's BLOCK_K = 128; g = 32 and 64 make a GEMM
# step span several groups, g = 128 one.

SHAPES = {32: (160, 200), 64: (320, 72), 128: (384, 200)}  # group_size -> (K, N)
DTYPES = [torch.float16, torch.bfloat16]


def native_kernel(name, **config):
    """``fn(x, qweight, qzeros, scales, g, bias)`` running kernel ``name`` on the repacked weight."""
    import importlib

    from awq_nb.kernels.native import to_native

    module = importlib.import_module(f"awq_nb.kernels.{name}")

    def fn(x, qweight, qzeros, scales, group_size, bias=None):
        w = to_native(qweight, qzeros, scales, group_size)
        if not config:
            return getattr(module, f"awq_{name}")(x, w, bias)
        base = module.launch_config(x.shape[0], w.out_features, w.in_features, group_size, 132)
        return getattr(module, f"awq_{name}")(x, w, bias, config=type(base)(**{**base.__dict__, **config}))

    return fn


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dequantize_matches_reference(group_size, dtype):
    from awq_nb.kernels.dequant import awq_dequantize
    from awq_nb.kernels.native import to_native

    k, n = SHAPES[group_size]
    qweight, qzeros, scales, _, _ = random_awq(k, n, group_size, dtype)
    out = awq_dequantize(to_native(qweight, qzeros, scales, group_size))
    ref = dequantize_ref(qweight, qzeros, scales, group_size)
    assert out.shape == (k, n) and out.dtype == dtype
    if dtype == torch.bfloat16 and not ON_GPU:
        # The interpreter (triton 3.9) truncates fp32 -> bf16 instead of rounding to nearest
        # even, so allow one bf16 ulp there; compiled kernels round like torch and match exactly.
        assert_within(out, ref, 2 * EPS[dtype] * ref.float().abs())
    else:
        assert torch.equal(out, ref)


# Every M and group size runs with these two (dtype, bias) pairs; the other two pairs run in
# test_triton_other_dtype_bias_pairs.
PAIRS = [(torch.float16, False), (torch.bfloat16, True)]
OTHER_PAIRS = [(torch.float16, True), (torch.bfloat16, False)]


@pytest.mark.parametrize("dtype, with_bias", PAIRS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 17, 64, 80])
def test_triton_gemm_matches_reference(m, group_size, dtype, with_bias):
    k, n = SHAPES[group_size]
    check_against_ref(native_kernel("gemm"), m, k, n, group_size, dtype, with_bias, seed=m)


@pytest.mark.parametrize("dtype, with_bias", PAIRS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_triton_gemv_matches_reference(m, group_size, dtype, with_bias):
    k, n = SHAPES[group_size]
    check_against_ref(native_kernel("gemv"), m, k, n, group_size, dtype, with_bias, seed=m)


@pytest.mark.parametrize("dtype, with_bias", OTHER_PAIRS)
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("kernel", ["gemm", "gemv"])
def test_triton_other_dtype_bias_pairs(kernel, group_size, dtype, with_bias):
    k, n = SHAPES[group_size]
    check_against_ref(native_kernel(kernel), 3, k, n, group_size, dtype, with_bias, seed=7)


@pytest.mark.parametrize("kernel, config", [
    ("gemv", {"split_k": 1}), ("gemv", {"split_k": 3}), ("gemv", {"block_n": 64, "block_k": 32}),
    ("gemm", {"split_k": 1}), ("gemm", {"split_k": 3}), ("gemm", {"block_m": 32, "block_n": 64}),
])
def test_triton_other_launch_configs(kernel, config):
    # The launch heuristics pick one split of K per shape; these run the other epilogue (no split),
    # a split that does not divide the K steps, and other tile sizes, inside one group (g=128)
    # and across several (g=32).
    for group_size in (32, 128):
        for dtype, with_bias in ((torch.float16, True), (torch.bfloat16, False)):
            check_against_ref(native_kernel(kernel, **config), 3, 384, 200, group_size, dtype, with_bias)


def test_launch_configs_fill_the_gpu_and_respect_groups():
    from awq_nb.kernels import gemm, gemv

    cfg = gemv.launch_config(1, 4096, 4096, 128, 132)
    assert cfg.ctas(4096) >= 4 * 132 and cfg.block_k == 128 and cfg.block_n == 128
    assert gemv.launch_config(1, 8192, 8192, 128, 132).ctas(8192) >= 4 * 132
    for g in (32, 64, 128, 256, 40):
        for m in (1, 2, 3, 8):
            assert g % gemv.launch_config(m, 4096, 40 * 256, g, 132).block_k == 0
    assert gemm.launch_config(16, 4096, 4096, 128, 132).split_k == 16  # split-K 4-16 for the tensor-core GEMM
    assert gemm.launch_config(1024, 4096, 4096, 128, 132).split_k == 1


@pytest.mark.skipif(ON_GPU, reason="reads the split-K scratch buffers of the interpreter run")
def test_split_k_leaves_its_scratch_zeroed_and_is_repeatable():
    # Split-K programs add partial sums into a shared workspace and take tickets from per-tile
    # counters; the last program of each tile stores the result and zeroes both, so the next
    # launch (or a CUDA-graph replay) starts clean without a memset. Shapes in a row share them.
    from awq_nb.kernels import common

    outs = []
    for k, n, m, kernel in ((384, 200, 17, "gemm"), (256, 96, 1, "gemv"), (384, 200, 17, "gemm")):
        qweight, qzeros, scales, _, _ = random_awq(k, n, 64, torch.float16, seed=k)
        x = random_x(m, k, torch.float16, seed=m)
        outs.append(native_kernel(kernel, split_k=2)(x, qweight, qzeros, scales, 64))
        scratch = {key: buf for key, buf in common._SCRATCH.items() if key[0] in ("workspace", "tickets")}
        assert scratch and all(int(buf.count_nonzero()) == 0 for buf in scratch.values()), \
            {key: int(buf.count_nonzero()) for key, buf in scratch.items()}
    assert torch.equal(outs[0], outs[2])
    assert outs[0].abs().sum() > 0


def test_triton_wrappers_reject_bad_inputs(monkeypatch):
    from awq_nb.kernels.gemm import awq_gemm
    from awq_nb.kernels.gemv import awq_gemv
    from awq_nb.kernels.native import to_native

    qweight, qzeros, scales, _, _ = random_awq(128, 64, 64)
    w = to_native(qweight, qzeros, scales, 64)
    with pytest.raises(AwqNbError, match="1..8 rows"):
        awq_gemv(random_x(9, 128, torch.float16), w)
    with pytest.raises(AwqNbError, match="float16/bfloat16"):
        awq_gemm(random_x(2, 128, torch.float32), w)
    with pytest.raises(AwqNbError, match="expects K=128"):
        awq_gemm(random_x(2, 64, torch.float16), w)
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(AwqNbError, match="need CUDA tensors"):
            awq_gemm(random_x(2, 128, torch.float16), w)


# ---------------------------------------------------------------------------------------------
# dispatch and CPU paths


def test_dispatch_thresholds():
    assert dispatch.choose_kernel(1, "cpu") == dispatch.CPU_DEQUANT_MATMUL
    assert dispatch.choose_kernel(4096, "cpu", has_cpu_weight=True) == dispatch.CPU_INT4
    assert 1 <= dispatch.GEMV_MAX_M < dispatch.GEMM_MAX_M
    if ON_GPU:
        from awq_nb.kernels.gemv import MAX_ROWS

        assert dispatch.GEMV_MAX_M <= MAX_ROWS
        assert dispatch.choose_kernel(1, "cuda") == dispatch.GEMV
        assert dispatch.choose_kernel(dispatch.GEMM_MAX_M + 1, "cuda") == dispatch.DEQUANT_MATMUL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 17])
def test_awq_matmul_matches_reference(m, dtype):
    # On CPU: the stateless dequantize + addmm path; on a GPU: the Triton kernel for m.
    qweight, qzeros, scales, _, _ = random_awq(256, 72, 64, torch.float16)
    x = random_x(m, 256, dtype)
    bias = torch.randn(72, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    out = dispatch.awq_matmul(x, qweight, qzeros, scales, 64, bias)
    ref = gemm_ref(x, qweight, qzeros, scales, 64, bias)
    w_t = dequantize_ref(qweight, qzeros, scales, 64)
    # On a GPU fp32 activations are computed in the scales' dtype (fp16); on CPU the weight is
    # dequantized in fp32 and the reference's is fp16: allow that rounding as well as x.dtype's.
    compute = torch.float16 if ON_GPU and dtype == torch.float32 else dtype
    slack = EPS[torch.float16] * w_t.float().abs()
    assert out.dtype == dtype
    assert_within(out, ref, error_bound(x, w_t, ref, compute, extra_w=slack / EPS[compute]))


def test_awq_matmul_keeps_leading_dims():
    qweight, qzeros, scales, _, _ = random_awq(128, 32, 32)
    x = torch.randn(2, 3, 128).half().to(DEVICE)
    out = dispatch.awq_matmul(x, qweight, qzeros, scales, 32)
    assert out.shape == (2, 3, 32)
    ref = gemm_ref(x.reshape(6, 128), qweight, qzeros, scales, 32).reshape(2, 3, 32)
    assert_within(out, ref, error_bound(x.reshape(6, 128), dequantize_ref(qweight, qzeros, scales, 32),
                                        ref.reshape(6, 32), torch.float16).reshape(2, 3, 32))


def test_dequantize_cpu_equals_reference_before_rounding():
    qweight, qzeros, scales, _, _ = random_awq(320, 72, 64, torch.float16, device="cpu")
    fast = dequantize_cpu(qweight, qzeros, scales, 64)
    assert fast.dtype == torch.float32
    assert torch.equal(fast.half(), dequantize_ref(qweight, qzeros, scales, 64))


@pytest.mark.parametrize("group_size", [32, 128])
def test_cpu_int4_mapping_is_exact_in_float32(group_size):
    # w = (q - z) * s == (q - 8) * s + (8 - z) * s: with fp32 scales the torch int4 kernel must
    # agree with the reference to fp32 rounding.
    qweight, qzeros, scales, _, _ = random_awq(256, 48, group_size, torch.float32, device="cpu")
    x = random_x(5, 256, torch.float32, device="cpu")
    bias = torch.randn(48)
    cpu_weight = prepare_cpu_int4(qweight, qzeros, scales, group_size, dtype=torch.float32)
    out = dispatch.awq_matmul(x, qweight, qzeros, scales, group_size, bias, cpu_weight=cpu_weight)
    ref = gemm_ref(x, qweight, qzeros, scales, group_size, bias)
    w_t = dequantize_ref(qweight, qzeros, scales, group_size)
    assert_within(out, ref, 64 * error_bound(x, w_t, ref, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_int4_bf16_within_bf16_rounding(dtype):
    # bf16 rounds s and (8 - z) * s: each weight moves by at most eps_bf16 * (|w| + 16 * s) beyond
    # what rounding x to bf16 and the output costs.
    qweight, qzeros, scales, _, _ = random_awq(256, 48, 64, torch.float16, device="cpu")
    x = random_x(3, 256, dtype, device="cpu")
    cpu_weight = prepare_cpu_int4(qweight, qzeros, scales, 64)
    out = dispatch.awq_matmul(x, qweight, qzeros, scales, 64, cpu_weight=cpu_weight)
    ref = gemm_ref(x, qweight, qzeros, scales, 64)
    w_t = dequantize_ref(qweight, qzeros, scales, 64)
    slack = 16 * scales.float().repeat_interleave(64, 0) + w_t.float().abs()
    bound = error_bound(x, w_t, ref, torch.bfloat16, extra_w=slack)
    assert out.dtype == dtype
    assert_within(out, ref, bound)


def test_cpu_int4_rejects_unsupported_layers():
    qweight, qzeros, scales, _, _ = random_awq(128, 24, 64, device="cpu")
    with pytest.raises(AwqNbError, match="out_features % 16"):
        prepare_cpu_int4(qweight, qzeros, scales, 64)
    qweight, qzeros, scales, _, _ = random_awq(128, 32, 64, device="cpu")
    cpu_weight = prepare_cpu_int4(qweight, qzeros, scales, 64)
    q2, z2, s2, _, _ = random_awq(128, 32, 32, device="cpu")
    with pytest.raises(AwqNbError, match="prepare it from this layer"):
        dispatch.awq_matmul(random_x(1, 128, torch.float16, device="cpu"), q2, z2, s2, 32, cpu_weight=cpu_weight)


def test_package_import_does_not_import_triton(tmp_path):
    code = ("import sys, awq_nb.kernels as k; k.awq_matmul; k.gemm_ref; k.AWQ_ORDER; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # From a scratch folder: in the repository root `python -c` would import the source tree, whose
    # awq_nb/ has no kernels/ (that mapping is the installed package's, or bench/gpu_check.sh's).
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


# ---------------------------------------------------------------------------------------------
# WQLinear in the native layout (what load_quantized and from_linear do on a GPU)


def test_wqlinear_native_mode_keeps_checkpoints_and_results():
    from awq_nb.wqlinear import WQLinear

    torch.manual_seed(0)
    # On CPU this runs the kernels' twins under the interpreter; on a GPU from_linear repacks at once.
    linear = torch.nn.Linear(256, 200, bias=True).half().to(DEVICE)
    q = WQLinear.from_linear(linear, 4, 64)
    assert q.is_native == ON_GPU
    before = {k: v.clone() for k, v in q.state_dict().items()}
    qweight, qzeros, scales = (before[k] for k in ("qweight", "qzeros", "scales"))
    x = random_x(3, 256, torch.float16)
    ref = gemm_ref(x, qweight, qzeros, scales, 64, q.bias)
    w_t = dequantize_ref(qweight, qzeros, scales, 64)
    packed_bytes = sum(t.numel() * t.element_size() for t in (qweight, qzeros, scales))

    assert q.prepare_native() and q.is_native and q.qweight is None and q.qzeros is None
    native = q.native()
    extra = native.nbytes() - packed_bytes
    assert 0 < extra <= 0.02 * packed_bytes  # only the unpacked zeros (0.5 B per group and column)
    after = q.state_dict()
    assert list(after) == list(before)  # same keys, same order
    assert all(torch.equal(after[k], before[k]) for k in before)  # the checkpoint, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(q.awq_tensors(), (qweight, qzeros, q.scales)))
    out = q(x)  # native_matmul: the GEMV/GEMM twins under the interpreter
    assert_within(out, ref, error_bound(x, w_t, ref, torch.float16))

    q.load_state_dict(before)  # loading a checkpoint into a native module
    assert not q.is_native and torch.equal(q.qweight, qweight)
    assert_within(q(x), ref, error_bound(x, w_t, ref, torch.float16))  # a CUDA forward repacks again
    q.prepare_native()
    q.to("cpu")  # a move to the CPU turns it back for the CPU paths
    assert not q.is_native and torch.equal(q.qweight, qweight.cpu())

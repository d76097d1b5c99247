"""Tests for awq_nb.packing (a hand-worked example, round trips, agreement with the quantizer) and
awq_nb.wqlinear (the module built from those tensors)."""
import copy

import pytest
import torch
from torch import nn

from awq_nb.errors import AwqNbError
from awq_nb.packing import check_packable, dequantize_packed, pack_codes, pack_linear, unpack_linear
from awq_nb.quantizer import dequantize_int, pseudo_quantize, quant_params, quantize_int
from awq_nb.wqlinear import WQLinear, matches_any, prepare_cpu_int4


pytestmark = pytest.mark.usefixtures("one_thread")


def int32_word(hex_word: int) -> int:
    """The signed int32 that has the bit pattern ``hex_word`` (0..2**32-1)."""
    return hex_word - 2**32 if hex_word >= 2**31 else hex_word


def test_hand_worked_example():
    # One Linear with N=8 outputs, K=2 inputs, one group of g=2: q[n, k] = n + 8k.
    q = torch.tensor([[n + 8 * k for k in range(2)] for n in range(8)], dtype=torch.int32)
    zero = torch.tensor([[3], [0], [15], [1], [7], [8], [2], [9]])
    scale = torch.full((8, 1), 0.5)
    t = pack_codes(q, scale, zero, group_size=2)
    # qweight row k=0 packs columns n=0..7 (values 0..7): nibble i holds column ORDER[i] = 0,2,4,6,1,3,5,7;
    # written from nibble 7 (high) down to nibble 0: 7 5 3 1 6 4 2 0.
    # Row k=1 holds 8 + the same: F D B 9 E C A 8, whose top bit is set, so the int32 is negative.
    assert t.qweight.dtype == torch.int32 and t.qweight.shape == (2, 1)
    assert t.qweight.tolist() == [[0x75316420], [int32_word(0xFDB9ECA8)]]
    assert int32_word(0xFDB9ECA8) == -38146904
    # qzeros: nibble i holds z[ORDER[i]]: z0 z2 z4 z6 z1 z3 z5 z7 = 3 F 7 2 0 1 8 9, i.e. 0x981027F3.
    assert t.qzeros.shape == (1, 1)
    assert t.qzeros.tolist() == [[int32_word(0x981027F3)]] == [[-1743771661]]
    assert t.scales.dtype == torch.float16 and t.scales.shape == (1, 8)
    # W[n, k] = (q - z) * s: W[0, 0] = (0 - 3) * 0.5, W[2, 1] = (10 - 15) * 0.5, W[7, 1] = (15 - 9) * 0.5
    w = dequantize_packed(t.qweight, t.qzeros, t.scales, group_size=2)
    assert w.shape == (8, 2)
    assert (w[0, 0].item(), w[2, 1].item(), w[7, 1].item()) == (-1.5, -2.5, 3.0)


@pytest.mark.parametrize("n,k,g", [(8, 32, 32), (24, 64, 32), (64, 128, 64), (40, 256, 128)])
def test_codes_round_trip(n, k, g):
    gen = torch.Generator().manual_seed(n * k + g)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    zero = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.int32)
    scale = torch.rand(n, k // g, generator=gen) * 0.1 + 1e-3
    t = pack_codes(q, scale, zero, g)
    assert t.qweight.shape == (k, n // 8) and t.qzeros.shape == (k // g, n // 8) and t.scales.shape == (k // g, n)
    q2, s2, z2 = unpack_linear(*t, group_size=g)
    assert torch.equal(q2, q) and torch.equal(z2, zero)
    assert torch.equal(s2, scale.half())
    # and the dequantized weight is exactly (q - z) * fp16(s) in the [N, K] layout
    expected = (q.float() - zero.float().repeat_interleave(g, dim=1)) * scale.half().float().repeat_interleave(g, dim=1)
    assert torch.equal(dequantize_packed(*t, group_size=g), expected)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequant_matches_pseudo_quantize(g, dtype):
    gen = torch.Generator().manual_seed(g)
    w = (torch.randn(96, 256, generator=gen) * 0.05).to(dtype)
    w[3, :] *= 40.0  # a row with large scales
    w[5, :g] = 0.0  # a constant group: scale clamps to 1e-5
    scale, zero = quant_params(w, 4, g)
    t = pack_linear(w, scale, zero, g)
    # the codes are exactly the quantizer's
    q, _, z = unpack_linear(*t, group_size=g)
    assert torch.equal(q, quantize_int(w, scale, zero, 4, g))
    assert torch.equal(z, zero.to(torch.int32))
    # dequantized weight = pseudo_quantize up to the fp16 rounding of the scales:
    # |dw| <= |q - z| * |s - fp16(s)| <= 15 * max(s * 2**-11, 2**-25)
    ref = pseudo_quantize(w, 4, g).float()
    got = dequantize_packed(*t, group_size=g)
    bound = 15 * torch.maximum(scale * 2.0**-11, torch.tensor(2.0**-25)).repeat_interleave(g, dim=1)
    assert ((got - ref).abs() <= bound + 1e-7).all()
    # with the fp16-rounded scales it is exact
    exact = (q.float() - z.float().repeat_interleave(g, 1)) * scale.half().float().repeat_interleave(g, 1)
    assert torch.equal(got, exact)


def test_unrepresentable_settings_raise_clear_errors():
    w = torch.randn(16, 64)
    with pytest.raises(AwqNbError, match="4-bit codes only"):
        check_packable(16, 64, w_bit=3, group_size=32)
    with pytest.raises(AwqNbError, match="symmetric"):
        pack_linear(w, *quant_params(w, 4, 32, zero_point=False), 32)
    with pytest.raises(AwqNbError, match="per-channel"):
        check_packable(16, 64, 4, -1)
    with pytest.raises(AwqNbError, match="not a multiple of group_size"):
        check_packable(16, 96, 4, 64, name="model.layers.0.mlp.down_proj")
    with pytest.raises(AwqNbError, match="out_features=12"):
        check_packable(12, 64, 4, 32)
    with pytest.raises(AwqNbError, match="overflow fp16"):
        pack_codes(torch.zeros(8, 32, dtype=torch.int32), torch.full((8, 1), 1e6), torch.zeros(8, 1), 32)


def test_unpack_rejects_inconsistent_shapes():
    t = pack_codes(torch.zeros(16, 64, dtype=torch.int32), torch.ones(16, 2), torch.zeros(16, 2), 32)
    with pytest.raises(AwqNbError, match="scales has shape"):
        unpack_linear(t.qweight, t.qzeros, t.scales[:, :8], 32)
    with pytest.raises(AwqNbError, match="qzeros has shape"):
        dequantize_packed(t.qweight, t.qzeros, t.scales, 64)


# ---------------------------------------------------------------------------------------------
# WQLinear


def _linear(k=128, n=48, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    return lin


def _reference(lin, g):
    """The Linear with its weight fake-quantized using fp16-rounded scales (what WQLinear stores)."""
    ref = copy.deepcopy(lin).float()
    w = ref.weight.data
    scale, zero = quant_params(w, 4, g)
    ref.weight.data = dequantize_int(quantize_int(w, scale, zero, 4, g), scale.half().float(), zero, g)
    return ref


@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 128), (1, 1, 1, 128)])
def test_wqlinear_forward_any_leading_dims(shape):
    lin = _linear()
    wq = WQLinear.from_linear(lin, w_bit=4, group_size=32)
    x = torch.randn(shape)
    y = wq(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    assert torch.allclose(y, _reference(lin, 32)(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wqlinear_keeps_input_dtype(dtype):
    lin = _linear(dtype=dtype)
    wq = WQLinear.from_linear(lin, group_size=64)
    assert wq.scales.dtype == dtype and wq.bias.dtype == dtype and wq.qweight.dtype == torch.int32
    x = torch.randn(4, 128, dtype=dtype)
    y = wq(x)
    assert y.dtype == dtype
    ref = _reference(lin, 64)(x.float())
    assert (y.float() - ref).abs().max() < 2e-2 * ref.abs().max()


def test_wqlinear_from_conv1d_and_repr():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(nf=64, nx=96)  # weight [in=96, out=64]
    nn.init.normal_(conv.weight, std=0.1)
    nn.init.normal_(conv.bias, std=0.1)
    wq = WQLinear.from_linear(conv, group_size=32)
    assert (wq.in_features, wq.out_features, wq.qweight.shape) == (96, 64, (96, 8))
    lin = nn.Linear(96, 64)
    lin.weight.data, lin.bias.data = conv.weight.data.t().clone(), conv.bias.data.clone()
    x = torch.randn(3, 96)
    assert torch.allclose(wq(x), _reference(lin, 32)(x), atol=1e-5, rtol=0)
    assert repr(wq) == "WQLinear(in_features=96, out_features=64, bias=True, w_bit=4, group_size=32)"
    assert set(wq.state_dict()) == {"qweight", "qzeros", "scales", "bias"}
    assert set(WQLinear.from_linear(_linear(bias=False), group_size=32).state_dict()) == {"qweight", "qzeros", "scales"}


def test_wqlinear_rejects_unrepresentable_layers():
    with pytest.raises(AwqNbError, match="symmetric"):
        WQLinear.from_linear(_linear(), zero_point=False, group_size=32)
    with pytest.raises(AwqNbError, match="4-bit"):
        WQLinear.from_linear(_linear(), w_bit=8, group_size=32)
    with pytest.raises(AwqNbError, match="out_features=20"):
        WQLinear.from_linear(_linear(n=20), group_size=32)


def test_prepare_cpu_int4_fast_path_and_invalidation():
    lin = _linear(k=256, n=64)
    model = nn.Sequential(WQLinear.from_linear(lin, group_size=64))
    x = torch.randn(2, 256)
    exact = model(x)
    assert prepare_cpu_int4(model, dtype=torch.float32) == 1 and model[0].cpu_weight is not None
    assert torch.allclose(model(x), exact, atol=1e-4, rtol=0)  # fp32 int4 kernel: exact up to summation order
    model.to(torch.float32)  # moving or casting drops the converted copy
    assert model[0].cpu_weight is None


def test_modules_to_not_convert_matches_substrings():
    assert matches_any("model.layers.3.mlp.down_proj", ["down_proj"])
    assert matches_any("model.layers.3.mlp.down_proj", ["model.layers.3."])
    assert not matches_any("model.layers.3.mlp.down_proj", ["up_proj"])
    assert not matches_any("model.layers.3.mlp.down_proj", None)

import pytest
import torch

from awq_nb import AWQConfig, AwqNbError
from awq_nb.quantizer import dequantize_int, pseudo_quantize, quant_params, quantize_int


def test_hand_worked_asymmetric_group():
    # one group of 4: min -1, max 2, 2 bits -> scale = 3/3 = 1, zero = 1
    w = torch.tensor([[-1.0, 0.4, 1.6, 2.0]])
    s, z = quant_params(w, bits=2, group_size=4)
    assert s.item() == pytest.approx(1.0) and z.item() == 1
    q = quantize_int(w, s, z, 2, 4)
    assert q.tolist() == [[0, 1, 3, 3]]
    assert dequantize_int(q, s, z, 4).tolist() == [[-1.0, 0.0, 2.0, 2.0]]
    assert pseudo_quantize(w, 2, 4).tolist() == [[-1.0, 0.0, 2.0, 2.0]]


def test_hand_worked_symmetric_group():
    w = torch.tensor([[-3.0, 0.2, 1.4, 2.0]])  # absmax 3, 3 bits -> scale = 3/3 = 1, range -4..3
    assert pseudo_quantize(w, 3, 4, zero_point=False).tolist() == [[-3.0, 0.0, 1.0, 2.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_levels_and_error_bound(bits, group_size):
    torch.manual_seed(bits)
    w = torch.randn(16, 256)
    dq = pseudo_quantize(w, bits, group_size)
    g = dq.reshape(-1, 256 if group_size == -1 else group_size)
    assert max(len(torch.unique(row)) for row in g) <= 2**bits
    s, _ = quant_params(w, bits, group_size)
    # rounding error is at most half a step inside the range
    step = s.repeat_interleave(256 if group_size == -1 else group_size, dim=1)
    assert torch.all((dq - w).abs() <= step / 2 + 1e-6)


@pytest.mark.parametrize("zero_point", [True, False])
def test_known_extremes_give_the_same_rounding(zero_point):
    torch.manual_seed(0)
    w = torch.randn(6, 128)
    w[0, :64] = w[0, :64].abs() + 0.1  # a group with no negative weight
    w[1, 64:] = -w[1, 64:].abs() - 0.1  # and one with no positive weight
    lo, hi = torch.aminmax(w.reshape(-1, 64), dim=1)
    got = pseudo_quantize(w, 3, 64, zero_point, extremes=(lo, hi))
    assert torch.equal(got, pseudo_quantize(w, 3, 64, zero_point))
    assert torch.equal(lo, w.reshape(-1, 64).amin(1))  # the caller's tensors are left as they were


def test_fp16_and_bf16_round_like_fp32():
    w = torch.randn(8, 128)
    for dt in (torch.float16, torch.bfloat16):
        wd = w.to(dt)
        assert pseudo_quantize(wd, 4, 64).dtype == dt
        torch.testing.assert_close(pseudo_quantize(wd, 4, 64).float(), pseudo_quantize(wd.float(), 4, 64).to(dt).float())


def test_bad_bits_and_group_sizes():
    with pytest.raises(AwqNbError, match="w_bit=9"):
        AWQConfig(w_bit=9)
    with pytest.raises(AwqNbError, match="w_bit=1"):
        pseudo_quantize(torch.randn(2, 64), 1, 64)
    with pytest.raises(AwqNbError, match="group_size=100"):
        AWQConfig(group_size=100)
    with pytest.raises(AwqNbError, match=r"clip_sweeps=-1 must be a non-negative integer \(0: score each group alone\)"):
        AWQConfig(clip_sweeps=-1)
    with pytest.raises(AwqNbError, match=r"in_features=96 is not a multiple of group_size=64.*\[32\]"):
        pseudo_quantize(torch.randn(2, 96), 4, 64)


@pytest.mark.parametrize("bits,group_size,zero_point", [(4, 32, True), (3, 64, True), (4, -1, True), (4, 32, False)])
def test_in_place_pseudo_quantize_gives_the_same_bits(bits, group_size, zero_point):
    from awq_nb.quantizer import pseudo_quantize_

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 4, 128)
    expected = pseudo_quantize(w, bits, group_size, zero_point)
    got = w.clone()
    assert pseudo_quantize_(got, bits, group_size, zero_point).data_ptr() == got.data_ptr()
    assert torch.equal(got, expected)
    with pytest.raises(AwqNbError, match="contiguous fp32"):
        pseudo_quantize_(w.half(), bits, group_size, zero_point)

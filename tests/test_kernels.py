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

from awq_nb.errors import AwqNbError  # noqa: E402
from awq_nb.kernels.layout import AWQ_ORDER, AWQ_REVERSE_ORDER, pack_awq, unpack_awq  # noqa: E402


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

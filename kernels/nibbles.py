"""The bit trick that turns packed 4-bit codes into floating point, as ``@triton.jit`` helpers.

One int32 word of the native layout (kernels/native.py) holds the codes of k = 8r .. 8r+7 for
one column, nibble i holding k offset ``AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]``. fp16 has an
ulp of exactly 1 between 1024 and 2048, so OR-ing a 4-bit value into the low bits of 1024
(``0x6400``) gives the fp16 number ``1024 + q``; doing it in both halves of a word gives two::

    lop3(w, 0x000F000F, 0x64006400)  -> fp16x2 (1024 + q[k+0], 1024 + q[k+1])   nibbles 0 and 4
    lop3(w, 0x00F000F0, 0x64006400)  -> fp16x2 (1024 + 16 q[k+2], 1024 + 16 q[k+3])   nibbles 1, 5
    the same on w >> 8               -> k+4, k+5 and k+6, k+7                    nibbles 2, 6 / 3, 7

``lop3`` computes ``(w & mask) | magic`` in one instruction. Subtracting ``1024 + z`` (one
``sub.f16x2``), or multiplying the x16 pair by 1/16 and adding ``-(64 + z)`` (one ``fma.rn.f16x2``),
leaves ``q - z`` exactly: small integers are exact in fp16 and the operations round an exact
result. Per two weights that is one ``lop3`` and one f16x2 operation, where unpacking with shifts,
masks and integer-to-float converts costs three or four instructions per weight.

The zero enters as two fp16x2 constants per column and group, built with integer arithmetic
(``1024 + z`` has the bits ``0x6400 + z``; ``-(64 + z)`` has ``0xD400 + 16 z``).

Two versions of every helper, chosen by the constexpr ``USE_ASM``:

* ``USE_ASM=True`` (compiled for a GPU): PTX through ``tl.inline_asm_elementwise``. Loads of x,
  scales and zeros are inline asm too: an elementwise asm op takes the register layout of the
  weight tile it is combined with, so x arrives already broadcast where each thread needs it,
  with no shared-memory shuffle (a ``tl.load`` would get a layout of its own and a conversion);
* ``USE_ASM=False``: the same values in plain Triton, for the interpreter (which cannot run
  inline asm) and for checking. tests/test_kernels.py checks the bit trick itself in numpy for all
  256 byte values and runs every kernel in this form under ``TRITON_INTERPRET=1``.

The asm loads need aligned addresses (16 bytes for x's eight values); the launch wrappers
guarantee them, and point masked-off rows and columns at valid memory.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAGIC_F16X2 = 0x64006400       # fp16x2 (1024, 1024)
SIXTEENTH_F16X2 = 0x2C002C00    # fp16x2 (1/16, 1/16)
# nibble i of a word holds k offset AWQ_ORDER[i]; the shift that brings k offset j to bits 0..3:
K_SHIFTS = (0, 16, 4, 20, 8, 24, 12, 28)   # 4 * AWQ_REVERSE_ORDER[j]


def _asm(*lines: str) -> str:
    return "{\n" + "\n".join(lines) + "\n}"


_UNPACK = (
    ".reg .b32 t<6>;",
    "shr.u32 t4, $W, 8;",
    "mov.b32 t5, 0x2c002c00;",
    "lop3.b32 t0, $W, 0x000f000f, 0x64006400, 0xea;",   # (w & m) | magic: k+0, k+1
    "lop3.b32 t1, $W, 0x00f000f0, 0x64006400, 0xea;",   # k+2, k+3 (x16)
    "lop3.b32 t2, t4, 0x000f000f, 0x64006400, 0xea;",   # k+4, k+5
    "lop3.b32 t3, t4, 0x00f000f0, 0x64006400, 0xea;",   # k+6, k+7 (x16)
    "sub.f16x2 t0, t0, $ZLO;",                          # (1024 + q) - (1024 + z)
    "fma.rn.f16x2 t1, t1, t5, $ZHI;",                   # (1024 + 16 q) / 16 - (64 + z)
    "sub.f16x2 t2, t2, $ZLO;",
    "fma.rn.f16x2 t3, t3, t5, $ZHI;",
)


def _unpack(word: str, zlo: str, zhi: str) -> tuple[str, ...]:
    return tuple(line.replace("$W", word).replace("$ZLO", zlo).replace("$ZHI", zhi) for line in _UNPACK)


# 8 fp32 outputs (q_j - z), inputs: word, zlo, zhi
CODES_F32_ASM = tl.constexpr(_asm(*_unpack("$8", "$9", "$10"), ".reg .b16 l<8>;",
                                  *(f"mov.b32 {{l{2 * i}, l{2 * i + 1}}}, t{i};" for i in range(4)),
                                  *(f"cvt.f32.f16 ${j}, l{j};" for j in range(8))))
# 8 fp16 outputs (q_j - z) * s, inputs: word, zlo, zhi, (s, s) as fp16x2
CODES_F16_ASM = tl.constexpr(_asm(*_unpack("$8", "$9", "$10"),
                                  *(f"mul.f16x2 t{i}, t{i}, $11;" for i in range(4)),
                                  *(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, t{i};" for i in range(4))))
# x[k .. k+7] as 8 fp32, input: the address of x[k] (16-byte aligned)
X8_F16_ASM = tl.constexpr(_asm(".reg .b32 v<4>;", ".reg .b16 h<8>;", "ld.global.nc.v4.b32 {v0, v1, v2, v3}, [$8];",
                               *(f"mov.b32 {{h{2 * i}, h{2 * i + 1}}}, v{i};" for i in range(4)),
                               *(f"cvt.f32.f16 ${j}, h{j};" for j in range(8))))
X8_BF16_ASM = tl.constexpr(_asm(".reg .b32 v<4>;", "ld.global.nc.v4.b32 {v0, v1, v2, v3}, [$8];",
                                *(f"shl.b32 ${2 * i}, v{i}, 16;\nand.b32 ${2 * i + 1}, v{i}, 0xffff0000;"
                                  for i in range(4))))
# one scale as fp32, input: its address
SCALE_F16_ASM = tl.constexpr(_asm(".reg .b16 h;", "ld.global.nc.b16 h, [$1];", "cvt.f32.f16 $0, h;"))
SCALE_BF16_ASM = tl.constexpr(_asm(".reg .b32 v;", "ld.global.nc.u16 v, [$1];", "shl.b32 $0, v, 16;"))
# one fp16 scale as the fp16x2 pair (s, s)
SCALE_PAIR_ASM = tl.constexpr(_asm(".reg .b16 h;", "ld.global.nc.b16 h, [$1];", "mov.b32 $0, {h, h};"))
# one zero point (uint8) as (zlo, zhi) = fp16x2 (1024 + z) and fp16x2 -(64 + z)
ZERO_PAIRS_ASM = tl.constexpr(_asm(".reg .b32 z;", "ld.global.nc.u8 z, [$2];",
                                   "mad.lo.u32 $0, z, 0x00010001, 0x64006400;",
                                   "mad.lo.u32 $1, z, 0x00100010, 0xD400D400;"))


@triton.jit
def load_x8(ptrs, X_BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """``x[k + j]`` for j = 0..7 as eight fp32 tensors of ``ptrs``' shape (``ptrs`` points at x[k])."""
    if USE_ASM:
        if X_BF16:
            return tl.inline_asm_elementwise(X8_BF16_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,l", [ptrs],
                                             dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(X8_F16_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,l", [ptrs],
                                             dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        return (tl.load(ptrs).to(tl.float32), tl.load(ptrs + 1).to(tl.float32), tl.load(ptrs + 2).to(tl.float32),
                tl.load(ptrs + 3).to(tl.float32), tl.load(ptrs + 4).to(tl.float32), tl.load(ptrs + 5).to(tl.float32),
                tl.load(ptrs + 6).to(tl.float32), tl.load(ptrs + 7).to(tl.float32))


@triton.jit
def load_scale_f32(ptrs, S_BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """Scales at ``ptrs`` (fp16 or bf16) as fp32."""
    if USE_ASM:
        if S_BF16:
            return tl.inline_asm_elementwise(SCALE_BF16_ASM, "=r,l", [ptrs], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(SCALE_F16_ASM, "=r,l", [ptrs], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(ptrs).to(tl.float32)


@triton.jit
def load_zero(ptrs, USE_ASM: tl.constexpr):
    """Zero points (uint8) at ``ptrs``: ``(zlo, zhi)`` int32 fp16x2 constants with USE_ASM, else ``(z, z)`` fp32."""
    if USE_ASM:
        return tl.inline_asm_elementwise(ZERO_PAIRS_ASM, "=r,=r,l", [ptrs], dtype=(tl.int32, tl.int32), is_pure=True,
                                         pack=1)
    else:
        z = tl.load(ptrs).to(tl.float32)
        return z, z


@triton.jit
def _code(words, shift: tl.constexpr):
    return ((words >> shift) & 0xF).to(tl.float32)


@triton.jit
def codes_minus_zero(words, zlo, zhi, USE_ASM: tl.constexpr):
    """Eight fp32 tensors ``q[8r + j] - z`` (j = 0..7) from native words ``[.., R, N]`` and the
    zero of :func:`load_zero` (broadcast to the words' shape). Exact."""
    if USE_ASM:
        return tl.inline_asm_elementwise(CODES_F32_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [words, zlo, zhi],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        return (_code(words, 0) - zlo, _code(words, 16) - zlo, _code(words, 4) - zlo, _code(words, 20) - zlo,
                _code(words, 8) - zlo, _code(words, 24) - zlo, _code(words, 12) - zlo, _code(words, 28) - zlo)


@triton.jit
def dequant_f16(words, zlo, zhi, s_pair, s, USE_ASM: tl.constexpr):
    """Eight fp16 tensors ``(q[8r + j] - z) * s``, each rounded once (the reference's rounding).
    ``s_pair`` (asm: the fp16x2 pair) and ``s`` (twin: fp16 scales) come broadcast to the words' shape."""
    if USE_ASM:
        return tl.inline_asm_elementwise(CODES_F16_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r", [words, zlo, zhi, s_pair],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        w0, w1, w2, w3, w4, w5, w6, w7 = codes_minus_zero(words, zlo, zhi, False)
        return ((w0 * s).to(tl.float16), (w1 * s).to(tl.float16), (w2 * s).to(tl.float16), (w3 * s).to(tl.float16),
                (w4 * s).to(tl.float16), (w5 * s).to(tl.float16), (w6 * s).to(tl.float16), (w7 * s).to(tl.float16))


@triton.jit
def load_scale_pair(ptrs, USE_ASM: tl.constexpr):
    """fp16 scales as the fp16x2 pair (s, s) in an int32 (asm), or as fp32 (twin)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(SCALE_PAIR_ASM, "=r,l", [ptrs], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.load(ptrs).to(tl.float32)

"""8-bit KV cache codes rebuilt as fp16 with integer operations (``@triton.jit`` helpers).

Used by the unified kernel's ``KV_BITS`` switch (:func:`decode_bytes`), for caches read
through a byte view:

* ``1``: e4m3fn (GPUs without e4m3 conversions, e.g. sm80 / sm86). The fp16 with bits
  ``(b & 0x80) << 8 | (b & 0x7f) << 7`` is exactly the e4m3 value / 256, normals and
  subnormals alike (e4m3's exponent bias 7 against fp16's 15, its 3 mantissa bits at the
  top of fp16's 10); e4m3fn's NaN codes (magnitude 0x7f) become an fp16 NaN. The caller
  multiplies by 256 where it already scales (the scores, the output).
* ``2``: e5m2: an e5m2 code is the upper byte of the fp16 of the same value (NaN and inf
  included): ``b << 8``.
* ``3``: int8: ``fp16(0x6400 | (b + 128)) - 1152`` is exactly ``b`` (1024 + the biased
  byte, an integer fp16 holds exactly), avoiding the int -> float conversion unit.

Two implementations with the same results: ``ASM`` (NVIDIA): inline PTX on four codes
per 32-bit register (byte permutes, logic ops, one packed fp16 subtraction for int8);
otherwise Triton integer operations per element (the interpreter, any backend).

:func:`decode_pairs` (the kernel's ``V_PAIRS``) takes the codes two per 16-bit element
(a V tile read through an int16 view: the low byte is head column ``2j``, the high byte
``2j + 1``) and returns the even and the odd columns as two fp16 tiles. Why: an 8-bit V
operand, reduced over keys that are not contiguous, is transposed for the tensor cores
with single-byte shared-memory reads; 16-bit elements are transposed with
``ldmatrix.trans``, and the byte split then happens in registers (``prmt``). Formats
(``PAIR_FORMATS``): the three above, and 4: e4m3fn through the GPU's conversion
(``cvt.rn.f16x2.e4m3x2``, sm89+; the exact value, not / 256).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Inline PTX: the input register (the last operand) holds four 8-bit codes; one byte
# permute per output (``prmt`` selectors) places two codes in the upper (fp8) or lower
# (int8) byte of the output's two 16-bit halves. Every read of the input comes first.
# decode_bytes' instructions have two outputs (four codes -> four fp16); decode_pairs'
# have one each (the even or the odd columns): a two-result instruction there led Triton
# 3.8's layout passes to decode the odd half a second time in another layout and send it
# through shared memory to the dot (NOTES.md, session 50).


def _slots(selectors: tuple) -> tuple[str, list[tuple[str, str, str]]]:
    """The input operand (after the outputs) and, per output, ``(operand, temporary
    register, prmt selector)``: one or two outputs, temporaries ``x`` and ``y``."""
    return f"${len(selectors)}", [(f"${i}", r, sel)
                                  for i, (r, sel) in enumerate(zip("xy", selectors))]


def _e4m3_bits_ptx(*selectors: str) -> str:
    """e4m3fn codes -> fp16 bits of value / 256: [0, b, 0, b'] (the selectors) puts each
    sign at bit 15 of its half; the magnitude shifted right by one lands at bits 7..13;
    magnitude 0x7f (NaN) carries into bit 14 when 1 is added at bit 7, and bit 14 on top
    of 0x3f80 makes the fp16 NaN 0x7f80."""
    codes, slots = _slots(selectors)
    permutes = [f"prmt.b32 {r}, {codes}, 0, {sel};" for _, r, sel in slots]
    rebuild = [line for out, r, _ in slots for line in (
        f"shr.b32 m, {r}, 1;", "and.b32 m, m, 0x3F803F80;", "add.u32 n, m, 0x00800080;",
        f"lop3.b32 m, {r}, 0x80008000, m, 0xEA;", f"lop3.b32 {out}, n, 0x40004000, m, 0xEA;")]
    return "\n".join(["{", ".reg .b32 x, y, m, n;", *permutes, *rebuild, "}"])


def _e5m2_ptx(*selectors: str) -> str:
    """e5m2 codes -> fp16: the code is the fp16's upper byte."""
    codes, slots = _slots(selectors)
    permutes = [f"prmt.b32 {r}, {codes}, 0, {sel};" for _, r, sel in slots]
    moves = [f"mov.b32 {out}, {r};" for out, r, _ in slots]
    return "\n".join(["{", ".reg .b32 x, y;", *permutes, *moves, "}"])


def _int8_ptx(*selectors: str) -> str:
    """int8 codes -> fp16: b ^ 0x80 = b + 128 as an unsigned byte, under the exponent
    byte 0x64 (1024); 0x6480 is 1152.0 = 1024 + 128, subtracted as a packed pair."""
    codes, slots = _slots(selectors)
    permutes = [f"prmt.b32 {r}, u, 0x64646464, {sel};" for _, r, sel in slots]
    subtract = [f"sub.f16x2 {out}, {r}, c;" for out, r, _ in slots]
    return "\n".join(["{", ".reg .b32 u, x, y, c;", f"xor.b32 u, {codes}, 0x80808080;",
                      *permutes, "mov.b32 c, 0x64806480;", *subtract, "}"])


# decode_bytes: four codes -> $0: codes 0, 1; $1: codes 2, 3
_E4M3_PTX = tl.constexpr(_e4m3_bits_ptx("0x1404", "0x3424"))
_E5M2_PTX = tl.constexpr(_e5m2_ptx("0x1404", "0x3424"))
_INT8_PTX = tl.constexpr(_int8_ptx("0x5140", "0x7362"))

#: V_PAIRS codes of :func:`decode_pairs` (0: off).
PAIR_FORMATS = {"e4m3fn_bits": 1, "e5m2": 2, "int8": 3, "e4m3fn": 4}

# decode_pairs: two 16-bit elements (bytes b0 b1 | b2 b3, b0 and b2 the even columns) ->
# the even columns' two fp16 (selectors ending 04 / 40) or the odd columns' (14 / 41)
_EVEN_E4M3_BITS_PTX = tl.constexpr(_e4m3_bits_ptx("0x2404"))
_ODD_E4M3_BITS_PTX = tl.constexpr(_e4m3_bits_ptx("0x3414"))
_EVEN_E5M2_PTX = tl.constexpr(_e5m2_ptx("0x2404"))
_ODD_E5M2_PTX = tl.constexpr(_e5m2_ptx("0x3414"))
_EVEN_INT8_PTX = tl.constexpr(_int8_ptx("0x5240"))
_ODD_INT8_PTX = tl.constexpr(_int8_ptx("0x5341"))


def _e4m3_cvt_pair_ptx(half: str) -> str:
    """e4m3fn through the conversion (sm89+): the pair's even codes [b0 b2] (``half``
    ``e``) or odd codes [b1 b3] (``o``) as one 16-bit register, one cvt (low byte: low
    half)."""
    return "\n".join(["{", ".reg .b32 t;", ".reg .b16 e, o;", "prmt.b32 t, $1, 0, 0x3120;",
                      "mov.b32 {e, o}, t;", f"cvt.rn.f16x2.e4m3x2 $0, {half};", "}"])


_EVEN_E4M3_CVT_PTX = tl.constexpr(_e4m3_cvt_pair_ptx("e"))
_ODD_E4M3_CVT_PTX = tl.constexpr(_e4m3_cvt_pair_ptx("o"))


@triton.jit
def _pair_half(x, PTX: tl.constexpr):
    """One half of :func:`decode_pairs`: an int16 tile -> fp16, through one-output PTX."""
    return tl.inline_asm_elementwise(PTX, "=r,r", [x], dtype=tl.float16, is_pure=True,
                                     pack=2)


@triton.jit
def decode_pairs(x, FMT: tl.constexpr, ASM: tl.constexpr):
    """``x``: an int16 tile, two 8-bit codes per element (low byte: the even column) ->
    ``(even, odd)`` fp16 tiles of ``x``'s shape. ``FMT``: a ``PAIR_FORMATS`` code."""
    if ASM:
        if FMT == 1:
            return _pair_half(x, _EVEN_E4M3_BITS_PTX), _pair_half(x, _ODD_E4M3_BITS_PTX)
        elif FMT == 2:
            return _pair_half(x, _EVEN_E5M2_PTX), _pair_half(x, _ODD_E5M2_PTX)
        elif FMT == 3:
            return _pair_half(x, _EVEN_INT8_PTX), _pair_half(x, _ODD_INT8_PTX)
        else:
            return _pair_half(x, _EVEN_E4M3_CVT_PTX), _pair_half(x, _ODD_E4M3_CVT_PTX)
    else:
        if FMT == 2:  # the code is the fp16's upper byte
            even = (x << 8).to(tl.float16, bitcast=True)
            odd = ((x >> 8) << 8).to(tl.float16, bitcast=True)
        elif FMT == 3:  # arithmetic shifts sign-extend each byte
            even = ((x << 8) >> 8).to(tl.float16)
            odd = (x >> 8).to(tl.float16)
        else:
            lo = (x & 0xFF).to(tl.uint8)
            hi = ((x >> 8) & 0xFF).to(tl.uint8)
            if FMT == 1:
                even = decode_bytes(lo, 1, False)
                odd = decode_bytes(hi, 1, False)
            else:
                even = lo.to(tl.float8e4nv, bitcast=True).to(tl.float16)
                odd = hi.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        return even, odd


@triton.jit
def decode_bytes(x, KV_BITS: tl.constexpr, ASM: tl.constexpr):
    """``x``: a tile of 8-bit codes (uint8 for fp8 caches read as bytes, int8) -> fp16."""
    if ASM:
        if KV_BITS == 1:
            return tl.inline_asm_elementwise(_E4M3_PTX, "=r,=r,r", [x], dtype=tl.float16,
                                             is_pure=True, pack=4)
        elif KV_BITS == 2:
            return tl.inline_asm_elementwise(_E5M2_PTX, "=r,=r,r", [x], dtype=tl.float16,
                                             is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_INT8_PTX, "=r,=r,r", [x], dtype=tl.float16,
                                             is_pure=True, pack=4)
    else:
        if KV_BITS == 1:
            b = x.to(tl.uint16)
            mag = b & 0x7F
            h = ((b & 0x80) << 8) | (mag << 7)
            h = tl.where(mag == 0x7F, h | 0x7E00, h)
            return h.to(tl.float16, bitcast=True)
        elif KV_BITS == 2:
            return (x.to(tl.uint16) << 8).to(tl.float16, bitcast=True)
        else:
            h = (x.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True)
            return h - 1152.0

"""The Gluon prefill (:mod:`portattn.kernels.gluon_prefill`): where it may serve a plan,
its tiles, and its launch.

The rules are plain Python over numbers and strings (no Triton import);
:func:`launch_gluon_prefill` imports the kernel module (and with it Gluon) on first use.
A plan takes the kernel for the long sequences of a prefill or mixed batch instead of
staging their keys (:mod:`portattn.backends.gluon_rules` decides, ``params["gluon"]``);
:func:`portattn.kernels.launch.launch_staged` launches it.
"""

from __future__ import annotations

import functools
import re

import torch

from portattn.kernels.compile_options import compile_options
from portattn.kernels.heuristics import quant_mode, softcap_code
from portattn.types import slot_row_reasons

#: Tiles by head size (the head sizes the kernel serves), from the H200 (bf16, block 16,
#: benchmarks/NOTES.md session 13): (keys per K/V tile, ring depth). Head 128 4 x 2048
#: 325.8 us with a ring of 3 against 335.8 with 2; head 256 keeps 64-key tiles and 2
#: buffers (3 do not fit in shared memory).
TILES = {64: (128, 3), 128: (128, 3), 256: (64, 2)}


def tile_width(head_size: int) -> int | None:
    """The tiles' width for a head size: the smallest of :data:`TILES` that holds it (a
    head between two widths runs padded with zeros: 96 in 128, 192 in 256), or None."""
    fits = [width for width in TILES if width >= head_size]
    return min(fits) if fits else None

#: Head sizes where the kernel measured faster than the staged prefill it replaces (H200,
#: bf16, block 16, session 13): head 128 4 x 2048 323 us against 363 staged, 1 x 8192 988
#: against 1086; head 256 4 x 2048 570 against 658, 1 x 4096 517 against 588. Head 64
#: lost: 4 x 2048 257 us in the bench against 222 staged (session 9), and in one run the
#: kernel alone 223 against 220 for the whole staged prefill. Heads 96 and 192 (padded to
#: 128 / 256, session 17, kernel-only, benchmarks/gluon_heads_bench.py): 96 1 x 8192 946
#: us against 1096 staged, 4 x 2048 296 / 371, 1 x 4096 250 / 303; 192 1772 / 2089, 528 /
#: 613, 468 / 546.
MEASURED_HEADS = (96, 128, 192, 256)
#: Cache block sizes the kernel is written for (one TMA box per block, whole boxes per
#: tile, rows in multiples of the 8-row swizzle atom) and those measured (a 128-key tile
#: is 8 boxes). Only 16 has run on a GPU: plans take the kernel in place of staging, and
#: nothing stages at other block sizes yet.
BLOCK_SIZES = (16, 32, 64)
MEASURED_BLOCK_SIZES = (16,)
#: Archs measured (the kernel uses Hopper's warpgroup MMA and TMA).
ARCHS = ("sm90",)
#: Registers per thread of each consumer warpgroup (the load warp gets 24).
CONSUMER_REGS = 240
#: TMA: global addresses and every stride but the last 16-byte aligned.
_ALIGN = 16


#: Triton releases (major, minor) from which the consumers cast P to PV's 16-bit operand
#: right after each softmax, so that P crosses the key-tile loop in half the registers
#: (the kernel's ``P_EARLY``; :func:`casts_p_early`).
P_EARLY_FROM = (3, 8)


@functools.lru_cache(maxsize=1)
def casts_p_early() -> bool:
    """Whether this Triton's Gluon prefill casts P right after each softmax (``P_EARLY``)
    rather than where the PV MMA takes it. Triton 3.8 lowers that cast to scalar
    conversions and packing moves, and its kernel then spilled 148 bytes inside the
    key-tile loop at head 128 with the late cast, 16 with the early one (3.9: 4 and 0);
    on 3.6 (no loop spill either way: 16 and 0 bytes, outside it) the early cast made
    the mixed batch 2048 + 63 x 4096 3.5% slower, three rounds against three (H100,
    benchmarks/NOTES.md, sessions 52-53). Releases that cannot be read take the early
    cast (the newer releases' form)."""
    import triton

    match = re.match(r"(\d+)\.(\d+)", str(getattr(triton, "__version__", "")))
    if match is None:
        return True
    return (int(match[1]), int(match[2])) >= P_EARLY_FROM


@functools.lru_cache(maxsize=1)
def gluon_reason() -> str | None:
    """Why this Triton has no Gluon warp specialization for Hopper (None: it has)."""
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia import hopper
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except Exception as exc:  # any Triton without Gluon, or a broken one
        return f"this Triton has no Gluon for Hopper ({type(exc).__name__}: {exc})"
    missing = [name for name, obj in (("warp_specialize", gl), ("warpgroup_mma", hopper),
                                      ("mbarrier", hopper), ("tma", hopper))
               if not hasattr(obj, name)]
    if missing:
        return f"this Triton's Gluon lacks {', '.join(missing)}"
    return warp_specialize_reason(gl.warp_specialize)


def warp_specialize_reason(warp_specialize) -> str | None:
    """Why this ``gl.warp_specialize`` cannot take the kernel's partitions (None: it can,
    as far as its signature tells). The kernel passes a list of ``(function, args)``
    pairs, the form Triton 3.6 brought; 3.5 took the default partition's and the workers'
    arguments and functions apart (first parameter ``default_args``), and the kernel
    does not compile there (benchmarks/NOTES.md, session 51). Any other signature is left
    to the launch, whose failure is remembered and staged around."""
    import inspect

    try:
        first = next(iter(inspect.signature(warp_specialize).parameters), None)
    except (TypeError, ValueError):  # no signature to read: let the launch tell
        return None
    if first == "default_args":
        return ("this Triton's Gluon warp_specialize takes the older form (default and "
                "worker partitions apart, before Triton 3.6); the kernel passes a list of "
                "(function, args) pairs")
    return None


#: Quantized caches (KVQuant modes) the kernel serves through the staged copy. Measured
#: faster there than the staged unified kernel (H200, session 14, 1 x 8192): fp8
#: per-tensor 1070 / 952 us, int8 per-token-head 1065 / 1005. fp8 per-token-head is staged
#: as int8 is (values dequantized into q's dtype), so the kernel reads the same thing; it
#: was not timed on its own.
STAGED_QUANT = ("fp8_per_tensor", "int8_per_token_head", "fp8_per_token_head")


def reads_staged_copy(kv_quant: str) -> bool:
    """Whether the kernel reads a staged copy of the keys (8-bit caches: the staging
    kernel widens the codes to q's dtype) rather than the cache itself. ``kv_quant``:
    the problem's ``KVQuant.key`` (``"fp8_per_tensor:e4m3fn"``, ``"none"``...)."""
    return quant_mode(kv_quant) != "none"


def problem_reasons(*, arch: str, q_dtype: torch.dtype, kv_dtype: torch.dtype,
                    out_dtype: torch.dtype, kv_quant: str, head_size_qk: int,
                    head_size_v: int, block_size: int, sliding_window: bool, softcap: bool,
                    alibi: str, sinks: bool) -> list[str]:
    """Why the Gluon prefill cannot serve this problem class (empty: it can; whether it
    pays is :func:`unmeasured_reasons`)."""
    reasons = []
    if arch not in ARCHS:
        reasons.append(f"{arch or 'this device'} is not {'/'.join(ARCHS)} (Hopper's "
                       "warpgroup MMA and TMA)")
    if q_dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"q is {str(q_dtype).replace('torch.', '')}, not float16 / bfloat16")
    mode = quant_mode(kv_quant)
    if mode == "none" and kv_dtype != q_dtype:
        reasons.append("the cache is not q's dtype")
    elif mode != "none" and mode not in STAGED_QUANT:
        reasons.append(f"{mode} caches: the kernel reads {'/'.join(STAGED_QUANT)} only")
    elif mode.endswith("per_token_head") and q_dtype != torch.bfloat16:
        reasons.append(f"{mode} with an fp16 q: staged codes keep per-key scales (fp16 "
                       "could not hold the dequantized values), which the kernel lacks")
    if out_dtype != q_dtype:
        reasons.append("the output dtype is not q's")
    width = tile_width(head_size_qk)
    if head_size_qk != head_size_v or width is None or head_size_qk % 8:
        reasons.append(f"head sizes {head_size_qk}/{head_size_v}: the kernel takes equal K "
                       f"and V heads of up to {max(TILES)}, multiples of 8 (16-byte rows)")
    if mode == "none" and (block_size not in BLOCK_SIZES or (
            width is not None and TILES[width][0] % block_size)):
        reasons.append(f"block size {block_size}: the kernel reads whole blocks of "
                       f"{'/'.join(map(str, BLOCK_SIZES))} slots, whole ones per key tile")
    return reasons


#: Score features where the kernel measured slower than the staged unified kernel (H200,
#: 1 x 8192 causal, head 128, bf16, block 16, benchmarks/gluon_features_bench.py, session
#: 14, last run; staged / Gluon us): auto keeps those classes staged. A sliding window:
#: 1024 369 / 400, 4096 868 / 845 (faster), with softcap, ALiBi and sinks 725 / 935, fp8
#: per-tensor with 1024 368 / 401 (a program's first key tile has its keys before the
#: window zeroed in V, and short key loops pay the pipeline's fill per program). Faster
#: there: no feature 1069 / 1004, softcap 30 2180 / 1624, ALiBi 1238 / 1171, sinks 1133 /
#: 1004, fp8 per-tensor 1070 / 952, int8 per-token-head 1065 / 1005.
SLOWER_FEATURES = ("sliding_window",)


def unmeasured_reasons(*, head_size_qk: int, block_size: int, kv_quant: str = "none",
                       sliding_window: bool = False, softcap: bool = False,
                       alibi: str = "none", sinks: bool = False) -> list[str]:
    """Why auto mode keeps staging a class the kernel can serve: it was not measured
    faster there (``PORTATTN_GLUON=1`` runs it anyway)."""
    reasons = []
    used = {"sliding_window": sliding_window, "softcap": softcap, "alibi": alibi != "none",
            "sinks": sinks}
    slower = [name for name in SLOWER_FEATURES if used[name]]
    if slower:
        reasons.append(f"{', '.join(n.replace('_', ' ') for n in slower)}: measured slower "
                       "than the staged unified kernel (SLOWER_FEATURES)")
    if head_size_qk not in MEASURED_HEADS:
        reasons.append(f"head size {head_size_qk}: measured faster than staging at "
                       f"{'/'.join(map(str, MEASURED_HEADS))} only (MEASURED_HEADS)")
    if not reads_staged_copy(kv_quant) and block_size not in MEASURED_BLOCK_SIZES:
        reasons.append(f"block size {block_size}: measured at "
                       f"{'/'.join(map(str, MEASURED_BLOCK_SIZES))} only")
    return reasons


def _row_view_reasons(name: str, t: torch.Tensor) -> list[str]:
    """Why cache ``t`` ``[num_blocks, block_size, heads, head]`` cannot be seen as rows
    ``[num_blocks * block_size, slot stride]`` for TMA, or ``[..., heads, head]`` with
    its head stride (empty: it can): :func:`portattn.types.slot_row_reasons`, then its
    base, head stride and row count."""
    reasons = slot_row_reasons(name, t)
    if t.data_ptr() % _ALIGN:
        reasons.append(f"{name}'s base is not {_ALIGN}-byte aligned")
    if t.shape[3] not in TILES and t.shape[2] > 1 and \
            (t.stride(2) * t.element_size()) % _ALIGN:  # a rank-3 stride
        reasons.append(f"{name}'s head stride is not {_ALIGN}-byte aligned (a head narrower "
                       "than its tile is read through a descriptor with that stride)")
    if t.shape[0] * t.shape[1] >= 2 ** 31:
        reasons.append(f"{name} has more than 2**31 slots")
    return reasons


def tensor_reasons(q: torch.Tensor, cache, out: torch.Tensor) -> list[str]:
    """Why these tensors cannot back the kernel's descriptors (empty: they can): q's
    heads contiguous, the caches as evenly spaced slot rows with one head stride, all
    16-byte aligned, and a GPU (Gluon has no interpreter)."""
    reasons = []
    if q.device.type != "cuda":
        reasons.append("not a CUDA tensor (the Gluon kernel runs on the GPU only)")
    head = q.shape[2]
    if q.stride(2) != 1 or q.stride(1) != head:
        reasons.append("q's heads are not contiguous rows of its tokens")
    if (q.stride(0) * q.element_size()) % _ALIGN or q.data_ptr() % _ALIGN:
        reasons.append(f"q's base or token stride is not {_ALIGN}-byte aligned")
    if head not in TILES and (head * q.element_size()) % _ALIGN:  # a rank-3 stride
        reasons.append(f"q's head stride ({head}) is not {_ALIGN}-byte aligned")
    if out.stride(2) != 1:
        reasons.append("out's last dim is not contiguous")
    kc, vc = cache.key_cache, cache.value_cache
    reasons += _row_view_reasons("key_cache", kc) + _row_view_reasons("value_cache", vc)
    if kc.stride() != vc.stride():
        reasons.append("key_cache and value_cache have different strides")
    return reasons


#: Query rows of one tile of the kernel (its two consumers' 64 each).
TILE_ROWS = 128


def grid_tiles(num_tokens: int, num_seqs: int, min_q: int) -> tuple[int, bool]:
    """``(tiles, long_tiles)``: the query tiles the kernel's grid holds (a program per
    tile and q head) and whether they are numbered over the sequences of ``min_q``
    queries or more only (the kernel's ``LONG_TILES``). A launch that serves every
    sequence (``min_q`` 1, or one sequence) numbers every sequence's tiles: ``num_tokens
    // 128 + num_seqs`` covers them. One that skips the short ones numbers theirs only:
    each such sequence has at least ``min_q`` queries, so there are at most ``num_tokens
    // min_q`` of them and ``num_tokens // 128`` plus that many tiles cover them, where a
    batch of many decodes beside one prompt would otherwise launch a program per
    decode. Taken where it at least halves the grid: numbering the long tiles costs each
    program a prefix sum over ``cu_seqlens_q`` (H200, direct launches: 2048 + 63 decodes
    +2.0%, 1024 + 255 decodes +7.5%, but 4 x 2048 -1.7% and 8 x 1024 -2.1%, where it
    removes no program; benchmarks/NOTES.md, session 16)."""
    every = num_tokens // TILE_ROWS + num_seqs
    if min_q > 1 and num_seqs > 1:
        long_only = num_tokens // TILE_ROWS + min(num_seqs, num_tokens // min_q)
        if 2 * long_only <= every:
            return long_only, True
    return every, False


@functools.lru_cache(maxsize=1)
def _kernel():
    from portattn.kernels import gluon_prefill
    from portattn.kernels.fast_launch import capturable

    return capturable(gluon_prefill.gluon_prefill_kernel)


#: Columns of one box of a rank-3 descriptor (a padded head): one 128-byte swizzle span
#: of 16-bit values.
PADDED_BOX_COLS = 64


def _descriptor(t: torch.Tensor, rows: int, row_stride: int, row_elems: int, box_rows: int,
                width: int, tile_rows: int, gdt):
    """A TMA descriptor over ``t``'s last two dims ``[heads, head]`` in ``rows`` rows
    ``row_stride`` apart (q's tokens, a cache's slots): the rows themselves, ``[rows,
    row_elems]`` with boxes ``[box_rows, head]`` (a head's column is its offset in the
    row), or where the tiles' ``width`` exceeds the head size, ``[rows, heads, head]`` with
    boxes ``[box_rows, 1, 64]`` that stop at the head (TMA fills the tile's other columns
    with zeros: the kernel's rank-3 mode)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    heads, head = t.shape[-2], t.shape[-1]
    if head == width:
        return TensorDescriptor(t, [rows, row_elems], [row_stride, 1], [box_rows, head],
                                gl.NVMMASharedLayout.get_default_for([tile_rows, head], gdt))
    box = [box_rows, 1, PADDED_BOX_COLS]
    # one head: its stride is whatever torch left there (never stepped over)
    head_stride = t.stride(-2) if heads > 1 else head
    return TensorDescriptor(t, [rows, heads, head], [row_stride, head_stride, 1], box,
                            gl.NVMMASharedLayout.get_default_for(box, gdt))


def _rows(t: torch.Tensor, box_rows: int, width: int, tile_rows: int, gdt):
    """The descriptor of cache ``t``'s slots (:func:`_descriptor`; a slot row is its slot
    stride long)."""
    slots, slot_stride = t.shape[0] * t.shape[1], t.stride(1)
    return _descriptor(t, slots, slot_stride, slot_stride, box_rows, width, tile_rows, gdt)


def _q_descriptor(q: torch.Tensor, rows: int, width: int, gdt):
    """q's descriptor (:func:`_descriptor`; a token row is its heads), boxes of ``rows``
    tokens."""
    num_tokens, num_q_heads, head = q.shape
    return _descriptor(q, num_tokens, q.stride(0), num_q_heads * head, rows, width, rows, gdt)


def kernel_switches(*, num_q_heads: int, num_kv_heads: int, kv_head_stride: int,
                    head_size: int, block_size: int, causal: bool, sliding_window: bool,
                    kv_scaled: bool, softcap: int, alibi: int, sinks: bool,
                    long_tiles: bool, p_early: bool | None = None) -> dict:
    """The Gluon prefill's compile-time arguments for a launch (which compiled variant
    runs): the head counts, the caches' head stride in elements, the head and block
    sizes, and the switches (``softcap``: ``heuristics.softcap_code``; ``alibi``:
    ``launch.ALIBI_CODES``'s; ``p_early``: the kernel's ``P_EARLY``, by default
    :func:`casts_p_early`'s); the tiles (``TILES``) follow from the head size.
    :func:`launch_gluon_prefill` launches with them, ``benchmarks/compile_gluon_offline.py``
    compiles them."""
    width = tile_width(head_size)
    if width is None:
        raise ValueError(f"head size {head_size}: the Gluon prefill takes heads of up to "
                         f"{max(TILES)} (problem_reasons)")
    block_n, num_buf = TILES[width]
    return dict(NUM_Q_HEADS=num_q_heads, GROUP=num_q_heads // num_kv_heads,
                KV_HEAD_STRIDE=kv_head_stride, BLOCK_N=block_n, HEAD=width,
                HEAD_SIZE=head_size, BLOCK_SIZE=block_size, NUM_BUF=num_buf,
                CAUSAL=bool(causal), USE_WINDOW=bool(sliding_window),
                KV_SCALED=bool(kv_scaled), USE_SOFTCAP=softcap, ALIBI=alibi,
                USE_SINKS=bool(sinks), LONG_TILES=bool(long_tiles),
                P_EARLY=casts_p_early() if p_early is None else bool(p_early),
                CONSUMER_REGS=CONSUMER_REGS, num_warps=4)


def descriptors(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                switches: dict) -> tuple:
    """The launch's TMA descriptors over ``q`` and the caches (:func:`_q_descriptor`,
    :func:`_rows`) for its ``switches`` (:func:`kernel_switches`)."""
    from triton.experimental.gluon import language as gl

    from portattn.kernels import gluon_prefill

    width, block_n = switches["HEAD"], switches["BLOCK_N"]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    box = min(switches["BLOCK_SIZE"], block_n)
    return (_q_descriptor(q, gluon_prefill.CONSUMER_ROWS, width, gdt),
            _rows(key_cache, box, width, block_n, gdt),
            _rows(value_cache, box, width, block_n, gdt))


def launch_gluon_prefill(q: torch.Tensor, cache, metadata, options, out: torch.Tensor,
                         min_q: int) -> None:
    """Attention of the sequences with at least ``min_q`` queries into ``out`` (the
    others' rows untouched); every other argument as
    :func:`portattn.kernels.launch.launch_unified` (``cache``: the paged cache, or a
    :class:`~portattn.kernels.stage_launch.StagedCache` and the metadata pointing into
    it). The caller has checked :func:`problem_reasons` and :func:`tensor_reasons`."""
    from portattn.kernels.launch import ALIBI_CODES
    from portattn.kernels.scalars import kv_scale_args

    num_tokens, num_q_heads, head = q.shape
    kc, vc = cache.key_cache, cache.value_cache
    code, k_scale, v_scale, _, _ = kv_scale_args(cache, q.device, q)
    if code not in (0, 1):
        raise ValueError("the Gluon prefill takes per-tensor scales only (per-token-head "
                         "caches reach it staged dequantized)")
    num_seqs = metadata.seq_lens.shape[0]
    bt = metadata.block_table
    num_tiles, long_tiles = grid_tiles(num_tokens, num_seqs, int(min_q))
    switches = kernel_switches(
        num_q_heads=num_q_heads, num_kv_heads=cache.num_kv_heads, kv_head_stride=kc.stride(2),
        head_size=head, block_size=kc.shape[1], causal=options.causal,
        sliding_window=options.sliding_window is not None, kv_scaled=code == 1,
        softcap=softcap_code(options.softcap), alibi=ALIBI_CODES[options.alibi],
        sinks=options.sinks is not None, long_tiles=long_tiles)
    q_desc, k_desc, v_desc = descriptors(q, kc, vc, switches)
    _kernel()[(num_tiles * num_q_heads,)](
        q_desc, k_desc, v_desc, out, out.stride(0), out.stride(1), metadata.cu_seqlens_q,
        metadata.seq_lens, bt, bt.stride(0), bt.shape[1], kc.shape[0], num_seqs, num_tokens,
        num_tiles,
        int(min_q), float(options.scale),
        float(options.softcap) if options.softcap is not None else 0.0,
        int(options.sliding_window) if options.sliding_window is not None else 0,
        k_scale, v_scale,
        options.alibi_slopes if options.alibi_slopes is not None else q,
        options.sinks if options.sinks is not None else q,
        **switches, **compile_options())

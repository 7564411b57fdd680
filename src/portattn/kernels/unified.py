"""The unified paged-attention kernel: one ``@triton.jit`` body, 2D or split-KV 3D.

Layout
------
* ``q`` ``[num_tokens, num_q_heads, HEAD_QK]`` and ``out`` ``[num_tokens, num_q_heads,
  HEAD_V]`` through strides (token, head, dim), so a slice of a fused QKV tensor works
  without a copy;
* ``key_cache`` ``[num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_QK]`` and ``value_cache``
  ``[..., HEAD_V]`` through (block, slot, head) strides, last dim contiguous (views of one
  packed tensor, the DiffKV layout included); key ``k`` of sequence ``b`` lives in block
  ``block_table[b, k // BLOCK_SIZE]``, slot ``k % BLOCK_SIZE``;
* per-token-head scale caches ``[num_blocks, BLOCK_SIZE, num_kv_heads]`` fp32 through
  their own strides; per-tensor scales, ``q_scale`` and ``output_scale`` are one-element
  fp32 tensors (read on the device: no host sync, graph-safe);
* split-KV partials (``SPLIT``): ``part_m`` / ``part_l``
  ``[num_seqs * BLOCK_Q, num_q_heads, num_segments]`` and ``part_acc`` (same, plus
  ``HEAD_V_PAD``), fp32, indexed by (sequence, query within the sequence); merged by
  :mod:`portattn.kernels.reduce`, or with ``MERGE_SEGMENTS`` in this kernel: every
  segment program bumps an int32 ticket of its (sequence, kv head) at ``ticket_ptr +
  seq * num_kv_heads + kv_head`` (kv head groups with ``TILE_HEADS``: ``num_kv_heads``
  and ``kv_head`` count groups) (acquire-release, GPU scope, after its partials are
  stored); the one that draws ``num_segments - 1`` arrived last, merges all segments of
  the tile's rows at once (:func:`_merge_tile_partials`) and sets the ticket back to 0.
  Tickets must be 0 before a launch; every launch leaves them 0.

Tiles
-----
A query tile holds ``BLOCK_M`` rows = ``BLOCK_Q`` query tokens x ``GROUP`` query heads
that share one kv head (row ``r`` is token ``r // GROUP``, head ``r % GROUP``; rows past
``BLOCK_Q * GROUP`` are padding). So K/V are read once per kv head for the whole group
(decode with GQA) and a prefill tile still has enough rows for the tensor cores. A KV tile
holds ``BLOCK_N`` keys independent of the cache block size: the block id is looked up per
key row. The visible key range of a query tile is computed from causality and the window,
so fully masked tiles are never loaded; tiles visible to every row of the query tile run
without mask arithmetic, only the edge tiles are masked.

``TILE_HEADS`` > 1 (decode tiles, SEQ_MODE 1, pointer loads): one program serves
``TILE_HEADS`` adjacent kv heads. The launcher passes ``GROUP`` = their query heads
(``TILE_HEADS`` x the GQA group, adjacent in q: row ``r`` is query head ``kv_head *
GROUP + r % GROUP``, the ``kv_head`` axis of the grid counting groups of kv heads), and a
KV tile's ``BLOCK_N`` columns are ``BLOCK_N // TILE_HEADS`` keys x ``TILE_HEADS`` heads in
the cache's own order (column ``c``: key ``c // TILE_HEADS``, head ``c % TILE_HEADS``):
one slot's heads are one contiguous run of the cache, where a per-head tile reads
``HEAD`` elements per slot (128 bytes at fp8, head 128; NOTES.md session 32: those rows
read 4.5-5% slower than whole blocks). One ``[BLOCK_M, HEAD] x [HEAD, BLOCK_N]`` dot
scores every row against every column and a row keeps only its own head's columns
(-inf elsewhere, so its P is 0 there): with ``TILE_HEADS`` x GQA group = 16 rows the
dot has the MMA shape of a per-head 16-row tile whose rows past the group are padding.
Scores, masks, ALiBi and the bad-block checks work per column from its key. P V still
multiplies the other heads' V by those zeros: a NaN or inf in one head's V (or in its
per-token-head V scale) turns the rows of every head of the program NaN, where a
program per head keeps it to that head's rows; finite caches are unaffected.

Grid ``(query tiles, num_kv_heads // TILE_HEADS, num_segments)``; ``SEQ_MODE`` says how
axis 0 maps to query tiles:

* 0: global tiles over every sequence, found by binary search over ``cu_seqlens_q``
  (grid ``num_tokens // BLOCK_Q + num_seqs``); tiles run heaviest-first;
* 1: one tile per sequence (grid ``num_seqs``); sequences with more than ``BLOCK_Q``
  queries are left to a SEQ_MODE 2 launch when ``LONG_FOLLOWS`` (the short part of a
  mixed batch), else their rows are written NaN (an understated ``max_seqlen_q``: never
  leave rows silently stale);
* 2: like 0 but skips sequences with ``<= SHORT_Q`` queries (the long part of a mixed
  batch, whose short part a SEQ_MODE 1 launch serves; the launch over staged keys, whose
  sequences have more queries than that).

Every sequence's query span is ``cu_seqlens_q``'s clamped into q's ``num_tokens`` rows
(:func:`portattn.kernels.common.query_span`): whatever unchecked GPU metadata says, no
program reads q or writes ``out`` (or the partials) outside them. Valid metadata is
unchanged by the clamp; with an inconsistent ``cu_seqlens_q`` rows may be left unwritten
or written by two sequences, never out of bounds.

``STAGED_Q`` > 0 (SEQ_MODE 0 and 2) skips sequences with at least that many queries: a
launch over staged keys serves them (:func:`portattn.kernels.launch.launch_staged`).
``FLAT_GRID`` (SEQ_MODE 0 and 2): grid ``(query tiles * num_kv_heads, 1, 1)``, program
``p`` is query tile ``p // num_kv_heads`` of kv head ``p % num_kv_heads`` (the kv heads
of one query tile launched together, heaviest tiles first over all heads).

Constexpr switches
------------------
Scores: ``CAUSAL``, ``USE_WINDOW``, ``USE_SOFTCAP`` (0 none, 1 softcap, 2 softcap with the
exact small-argument tanh: ``heuristics.softcap_code``), ``ALIBI`` (0 none, 1 linear, 2 sqrt),
``USE_SINKS``. Split: ``SPLIT`` (False: write the normalized output; True: this program
handles one of ``num_segments`` (a runtime value, so a new segment count needs no compile)
slices of the visible KV tiles and writes partials, SEQ_MODE 1 only); ``MERGE_SEGMENTS``
(SPLIT only; 0: the partials are left to the merge kernel; else a power of two >=
``num_segments``: the last segment program of each (sequence, kv head) merges them, one
launch instead of two, see Layout; ``MERGE_LOAD``: at most how many fp32 partials it loads
at once, at least one row, :func:`merge_load_elements`). Head sizes:
``HEAD_QK`` / ``HEAD_V`` and their power-of-two paddings (DiffKV when they differ; the
accumulator, partials and output are ``HEAD_V`` wide). Quantization, all at the one load
site :func:`_load_kv_tile`: ``KV_QUANT`` (0 none; 1 per-tensor fp8: the K scale is folded
into the softmax scale and the V scale into the output, so the loop only casts;
2 per-token-head int8/fp8: the scales multiply the score columns and P's columns in
fp32), ``Q_SCALED`` (fp8 ``q`` with ``q_scale`` folded into the softmax scale),
``FP8_DOT`` (keep fp8 ``q`` and fp8 K for the QK^T dot, accumulating in fp32 with a
promotion every ``FP8_ACC`` products), ``Q_PRESCALE`` (multiply q by the softmax scale in
fp32 before casting it to ``COMPUTE_DTYPE``: used when a bf16 q meets an fp8 cache and the
dots run in fp16, every fp8 value being exact in fp16 and fp8 -> fp16 one conversion,
and with ``KV_BITS``, whose rebuilt codes are fp16),
``FP8_OUT`` (store ``clamp(out / output_scale,
+-FP8_MAX)``), ``COMPUTE_DTYPE`` (the dtype of the dot operands, 0 float16 / 1 bfloat16 /
2 float32: q's for 16/32-bit q over a 16/32-bit or int8 cache, float16 for fp8 q, an
fp8 cache (every fp8 value is exact in it) or ``KV_BITS``), ``DOT_PREC`` ("ieee" for
fp32, ignored for 16-bit operands). With per-token-head scales and fp16 dots (fp8 caches,
the int8 codes, fp16 q), P's columns times the V scales are rounded to fp16: for V values
below ~0.03 (fp8) / ~0.08 (int8) the small products are fp16 subnormals (0.8% relative
error measured at V ~ 1e-3; a per-tile normalization fixed it at 1.3x the decode time,
benchmarks/NOTES.md). ``V_SC_BOOST`` (default 1.0; a power of two) multiplies those
products and divides ``acc`` after the loop: the launcher sets 128 for e5m2 per-token-head
caches (and their staged codes) with fp16 dots, whose scales (absmax / 57344) put every V
of unit size below that line; 128 gives them e4m3fn's scale range (absmax / 448), and its
overflow bound (V absmax < 2.9e7).

``V_STAGE`` (8-bit caches; a measured switch the plan never sets: it lost on the H200 for
fp8 and for the int8 codes, benchmarks/NOTES.md):
multiply the converted V tile by a runtime scalar (the per-tensor V scale, else
``v_one`` = 1.0) so Triton stages V through shared memory in 16 bits. Without it the
conversion is hoisted after the shared-memory load, and an 8-bit V operand that must be
transposed for the tensor cores is read with single-byte ``ld.shared.b8`` (sm90 PTX
compiled offline: 256 per thread per loop; with it, 16-byte loads and ``ldmatrix.trans``).
``KV_BITS`` (default 0; the plan's ``kv_bits``): 8-bit codes rebuilt as fp16 with integer
operations (:mod:`portattn.kernels.byte_decode`) instead of the conversion unit; fp8
caches are then passed as ``uint8`` views. 1: e4m3fn (GPUs without e4m3, sm80/sm86; the
codes decode to the value / 256, the 256 folded into the score scale and the output);
2: e5m2; 3: int8. ``BITS_ASM``: with inline PTX, four codes per register (NVIDIA GPUs;
the interpreter runs the Triton integer version).
``V_PAIRS`` (default 0; the plan's ``v_pairs``, 8-bit caches): V is passed as an int16
view, two codes per element, and read as ``HEAD_V // 2`` pairs per key; 16-bit elements
are transposed for the tensor cores with ``ldmatrix.trans`` instead of single-byte
reads, and :func:`portattn.kernels.byte_decode.decode_pairs` splits each pair in
registers into the even and the odd head columns, each with its own P V dot and
accumulator (``acc`` / ``acc_odd``), interleaved back after the loop. The code is the
pair format: 1 e4m3fn bits (with ``KV_BITS == 1``), 2 e5m2, 3 int8, 4 e4m3fn through the
GPU's conversion. Excludes ``V_STAGE``.
``KV_LOAD`` (default 0): how K/V tiles are read, at :func:`_load_kv_tile`. 0: pointer
loads, the block id looked up per key. 1: tensor descriptors (TMA on sm90+), one 4-D
descriptor per cache ``[num_blocks, BLOCK_SIZE, num_kv_heads, HEAD]`` (strides from the
cache, last dim contiguous, base and strides 16-byte aligned) built once per program,
outside the pipelined KV loop, and one box ``[1, BLOCK_N, 1, HEAD_PAD]`` per tile at
(block id, first slot, kv head, 0); needs ``BLOCK_SIZE % BLOCK_N == 0`` (a block split
into whole tiles). The rules and reasons are :mod:`portattn.kernels.kv_load`; the
launcher checks them and sets Triton's scratch allocator on GPUs (device-side
descriptors live in global scratch). Scales of quantized caches stay pointer loads.
2 (staged keys, :mod:`portattn.kernels.stage`; a measured alternative to 3, not
planned): the cache is a staging workspace whose blocks are one sequence's keys in order
(key ``k`` of sequence ``b`` at row ``block_table[b, 0] * BLOCK_SIZE + k``, its blocks
contiguous; a negative first block makes the sequence's rows NaN),
read through one 3-D descriptor per cache ``[num_blocks * BLOCK_SIZE, num_kv_heads,
HEAD]``, box ``[BLOCK_N, 1, HEAD_PAD]``: no block-table lookup in the loop and no
scan of table entries (staging turned bad ids into NaN keys). Only
``bt_width * BLOCK_SIZE`` keys per sequence were staged: tiles past them are not read and
rows that would see them come out NaN (an understated ``max_seqlen_k``). 3: the same with
the descriptors built on the host (``k_ptr`` / ``v_ptr`` are Triton ``TensorDescriptor``
arguments, passed as grid constants: no per-program build).
``ONE_LOOP`` (``KV_LOAD`` 2 / 3 only): the edge tiles (window start, causal diagonal,
sequence end) and the full tiles in one pipelined loop, the masks applied in a uniform
branch (:func:`_attend_staged_tiles`), so the diagonal tile's loads are prefetched while
the full tiles run instead of starting a pipeline of their own after them.

``CHECK_BLOCKS`` (default on; off only in benchmarks/kernel_experiments.py, to measure
what the following costs). Bad metadata never reads out of bounds: a block-table entry
outside ``[0, num_blocks)``
or a key past the table's width (``bt_width`` blocks) reads an in-range block instead,
and the rows that would have seen that key come out NaN (edge tiles: per score; the
tiles every row sees: one scan of their table entries, the first 128 loaded before the
KV loop and checked after it, so the check does not delay the first tile).
"""

from __future__ import annotations

import triton
import triton.language as tl

from portattn.kernels.byte_decode import decode_bytes, decode_pairs
from portattn.kernels.common import (
    find_seq_of_tile,
    mask_scores,
    online_softmax_step,
    query_span,
    score_tile,
    sink_logit2,
)
from portattn.kernels.heuristics import next_pow2
from portattn.kernels.reduce import combine_segments


@triton.jit
def _load_kv_tile(bt_row, bt_width, num_blocks, key0, k_pos, key_ok, kv_head, k_src, v_src,
                  ks_head_ptr, vs_head_ptr, stride_kb, stride_ks, stride_vb, stride_vs,
                  stride_ksb, stride_kss, stride_vsb, stride_vss, offs_dk, offs_dv,
                  col_head, stride_kh, stride_vh, stride_ksh, stride_vsh,
                  BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_QK: tl.constexpr,
                  HEAD_QK_PAD: tl.constexpr, HEAD_V: tl.constexpr, HEAD_V_PAD: tl.constexpr,
                  MASKED: tl.constexpr, KV_QUANT: tl.constexpr, CHECK_BLOCKS: tl.constexpr,
                  KV_LOAD: tl.constexpr, TILE_HEADS: tl.constexpr):
    """K ``[HEAD_QK_PAD, BLOCK_N]``, V ``[BLOCK_N, HEAD_V_PAD]`` as stored, their
    per-token-head scales ``[BLOCK_N]`` (ones unless ``KV_QUANT == 2``) and ``bad``
    ``[BLOCK_N]``: keys whose block-table entry is outside ``[0, num_blocks)`` or past the
    table's width (masked tiles only). Such keys read an in-range block instead (never out
    of bounds); the caller turns their scores into NaN (masked tiles) or finds them in
    its scan of the table entries (unmasked tiles), so the rows that meet them come out NaN.

    ``KV_LOAD`` 0: pointer loads, ``k_src`` / ``v_src`` are this kv head's cache pointers;
    1: descriptor (TMA) loads, ``k_src`` / ``v_src`` are 4-D tensor descriptors of the
    whole caches ``[num_blocks, BLOCK_SIZE, num_kv_heads, HEAD]`` built once per program
    (outside the loop), box ``[1, BLOCK_N, 1, HEAD_PAD]``. The tile (keys from ``key0``)
    then lies inside one cache block (``BLOCK_SIZE % BLOCK_N == 0``, checked by the
    launcher): one block-table entry, one box per tile; the pad columns past ``HEAD``
    come back zero (the descriptor's bounds). Masked keys' rows are zeroed after the load,
    as the pointer loads' ``other=0`` does. Scales stay pointer loads (``[BLOCK_N]`` fp32:
    too narrow a box for TMA's 16-byte rows to pay). 2 / 3: staged keys
    (:func:`_load_kv_tile_staged`; ``bt_row`` is then the sequence's first staged row).

    ``TILE_HEADS`` > 1 (pointer loads only): column ``c`` is key ``k_pos[c]`` of the kv
    head ``col_head[c]`` places after the program's first (``k_src`` / ``v_src`` and the
    scale pointers point at that first head; ``stride_kh`` ... ``stride_vsh`` step the
    heads)."""
    tl.static_assert(TILE_HEADS == 1 or KV_LOAD == 0, "TILE_HEADS reads with pointer loads")
    if KV_LOAD >= 2:
        k, v, k_sc, v_sc, bad = _load_kv_tile_staged(
            bt_row, key0, k_pos, key_ok, kv_head, k_src, v_src, ks_head_ptr, vs_head_ptr,
            stride_ksb, stride_kss, stride_vsb, stride_vss, BLOCK_N, BLOCK_SIZE,
            HEAD_QK_PAD, HEAD_V_PAD, MASKED, KV_QUANT)
    elif KV_LOAD == 1:
        k, v, k_sc, v_sc, bad = _load_kv_tile_descriptor(
            bt_row, bt_width, num_blocks, key0, k_pos, key_ok, kv_head, k_src, v_src,
            ks_head_ptr, vs_head_ptr, stride_ksb, stride_kss, stride_vsb, stride_vss,
            BLOCK_N, BLOCK_SIZE, HEAD_QK_PAD, HEAD_V_PAD, MASKED, KV_QUANT, CHECK_BLOCKS)
    else:
        k, v, k_sc, v_sc, bad = _load_kv_tile_pointer(
            bt_row, bt_width, num_blocks, k_pos, key_ok, k_src, v_src, ks_head_ptr,
            vs_head_ptr, stride_kb, stride_ks, stride_vb, stride_vs, stride_ksb, stride_kss,
            stride_vsb, stride_vss, offs_dk, offs_dv, col_head, stride_kh, stride_vh,
            stride_ksh, stride_vsh, BLOCK_N, BLOCK_SIZE, HEAD_QK, HEAD_QK_PAD, HEAD_V,
            HEAD_V_PAD, MASKED, KV_QUANT, CHECK_BLOCKS, TILE_HEADS)
    return k, v, k_sc, v_sc, bad


@triton.jit
def _token_head_scales(ks_head_ptr, vs_head_ptr, block, slot, key_ok, stride_ksb,
                       stride_kss, stride_vsb, stride_vss, col_head, stride_ksh,
                       stride_vsh, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                       KV_QUANT: tl.constexpr, TILE_HEADS: tl.constexpr):
    """The tile's per-token-head K and V scales ``[BLOCK_N]`` fp32 (``KV_QUANT == 2``;
    ones otherwise), read with pointer loads by every K/V load path; ``block`` int64
    block ids (in range), ``slot`` the keys' slots, ``col_head`` the columns' kv heads
    after the program's first (``TILE_HEADS`` > 1 only). Masked keys get scale 0."""
    if KV_QUANT == 2:
        k_off = block * stride_ksb + slot * stride_kss
        v_off = block * stride_vsb + slot * stride_vss
        if TILE_HEADS > 1:
            k_off += col_head * stride_ksh
            v_off += col_head * stride_vsh
        if MASKED:
            k_sc = tl.load(ks_head_ptr + k_off, mask=key_ok, other=0.0)
            v_sc = tl.load(vs_head_ptr + v_off, mask=key_ok, other=0.0)
        else:
            k_sc = tl.load(ks_head_ptr + k_off)
            v_sc = tl.load(vs_head_ptr + v_off)
    else:
        k_sc = tl.full([BLOCK_N], 1.0, tl.float32)
        v_sc = k_sc
    return k_sc, v_sc


@triton.jit
def _load_kv_tile_pointer(bt_row, bt_width, num_blocks, k_pos, key_ok, k_head_ptr,
                          v_head_ptr, ks_head_ptr, vs_head_ptr, stride_kb, stride_ks,
                          stride_vb, stride_vs, stride_ksb, stride_kss, stride_vsb,
                          stride_vss, offs_dk, offs_dv, col_head, stride_kh, stride_vh,
                          stride_ksh, stride_vsh, BLOCK_N: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr, HEAD_QK: tl.constexpr,
                          HEAD_QK_PAD: tl.constexpr, HEAD_V: tl.constexpr,
                          HEAD_V_PAD: tl.constexpr, MASKED: tl.constexpr,
                          KV_QUANT: tl.constexpr, CHECK_BLOCKS: tl.constexpr,
                          TILE_HEADS: tl.constexpr):
    """:func:`_load_kv_tile` with ``KV_LOAD == 0``: the block id looked up per key row,
    K and V gathered with pointer arithmetic (any BLOCK_N, any 16-bit-or-wider stride);
    with ``TILE_HEADS`` > 1 each column adds its kv head's offset."""
    bt_idx = k_pos // BLOCK_SIZE
    in_table = bt_idx < bt_width
    if MASKED:
        block = tl.load(bt_row + bt_idx, mask=key_ok & in_table, other=0)
        bad = key_ok & ((~in_table) | (block < 0) | (block >= num_blocks))
        block = tl.where(bad, 0, block).to(tl.int64)
    elif CHECK_BLOCKS:  # bad ids here are found by the scan of the full tiles' entries
        block = tl.load(bt_row + tl.minimum(bt_idx, bt_width - 1))
        block = tl.minimum(tl.maximum(block, 0), num_blocks - 1).to(tl.int64)
        bad = in_table & ~in_table
    else:  # trusted metadata (measurement switch only)
        block = tl.load(bt_row + bt_idx).to(tl.int64)
        bad = in_table & ~in_table
    slot = k_pos % BLOCK_SIZE
    k_off = block * stride_kb + slot * stride_ks
    v_off = block * stride_vb + slot * stride_vs
    if TILE_HEADS > 1:  # (slot, head) columns: a slot's heads are one run of the cache
        k_off += col_head * stride_kh
        v_off += col_head * stride_vh
    k_ptrs = k_head_ptr + k_off[None, :] + offs_dk[:, None]
    v_ptrs = v_head_ptr + v_off[:, None] + offs_dv[None, :]
    dk_ok = offs_dk < HEAD_QK
    dv_ok = offs_dv < HEAD_V
    if MASKED:
        if HEAD_QK_PAD != HEAD_QK:
            k = tl.load(k_ptrs, mask=dk_ok[:, None] & key_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
        v_ok = key_ok & ~bad  # a bad key's V is zero: p = 0 rows never meet a stale NaN
        if HEAD_V_PAD != HEAD_V:
            v = tl.load(v_ptrs, mask=v_ok[:, None] & dv_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=v_ok[:, None], other=0.0)
    else:
        if HEAD_QK_PAD != HEAD_QK:
            k = tl.load(k_ptrs, mask=dk_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if HEAD_V_PAD != HEAD_V:
            v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
    k_sc, v_sc = _token_head_scales(ks_head_ptr, vs_head_ptr, block, slot, key_ok,
                                    stride_ksb, stride_kss, stride_vsb, stride_vss, col_head,
                                    stride_ksh, stride_vsh, BLOCK_N, MASKED, KV_QUANT,
                                    TILE_HEADS)
    return k, v, k_sc, v_sc, bad


@triton.jit
def _load_kv_tile_descriptor(bt_row, bt_width, num_blocks, key0, k_pos, key_ok, kv_head,
                             k_desc, v_desc, ks_head_ptr, vs_head_ptr, stride_ksb,
                             stride_kss, stride_vsb, stride_vss, BLOCK_N: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, HEAD_QK_PAD: tl.constexpr,
                             HEAD_V_PAD: tl.constexpr, MASKED: tl.constexpr,
                             KV_QUANT: tl.constexpr, CHECK_BLOCKS: tl.constexpr):
    """:func:`_load_kv_tile` with ``KV_LOAD == 1``: the tile's keys ``key0 + [0,
    BLOCK_N)`` share one block-table entry (``BLOCK_SIZE % BLOCK_N == 0``), so the entry is
    one scalar load and K and V one TMA box each. Same results as the pointer loads: a bad
    entry (outside ``[0, num_blocks)`` or past ``bt_width``) reads block 0 and, in masked
    tiles, marks the tile's visible keys ``bad``; masked-out keys come back as zero rows."""
    bt_idx = key0 // BLOCK_SIZE
    in_table = bt_idx < bt_width
    no_bad = key_ok & ~key_ok
    if MASKED:
        block = tl.load(bt_row + bt_idx, mask=in_table, other=0)
        bad_block = (~in_table) | (block < 0) | (block >= num_blocks)
        bad = key_ok & bad_block
        block = tl.where(bad_block, 0, block)
    elif CHECK_BLOCKS:  # bad ids here are found by the scan of the full tiles' entries
        block = tl.load(bt_row + tl.minimum(bt_idx, bt_width - 1))
        block = tl.minimum(tl.maximum(block, 0), num_blocks - 1)
        bad = no_bad
    else:  # trusted metadata (measurement switch only)
        block = tl.load(bt_row + bt_idx)
        bad = no_bad
    slot0 = key0 % BLOCK_SIZE
    k_rows = k_desc.load([block.to(tl.int32), slot0, kv_head, 0]).reshape(BLOCK_N, HEAD_QK_PAD)
    v = v_desc.load([block.to(tl.int32), slot0, kv_head, 0]).reshape(BLOCK_N, HEAD_V_PAD)
    if MASKED:  # the pointer loads' other=0: masked keys never carry stale cache values
        k_rows = tl.where(key_ok[:, None], k_rows, tl.zeros_like(k_rows))
        v = tl.where((key_ok & ~bad)[:, None], v, tl.zeros_like(v))  # bad keys: zero V
    k = tl.trans(k_rows)
    k_sc, v_sc = _token_head_scales(ks_head_ptr, vs_head_ptr, block.to(tl.int64),
                                    k_pos % BLOCK_SIZE, key_ok, stride_ksb, stride_kss,
                                    stride_vsb, stride_vss, k_pos, 0, 0, BLOCK_N, MASKED,
                                    KV_QUANT, 1)
    return k, v, k_sc, v_sc, bad


@triton.jit
def _load_kv_tile_staged(seq_row0, key0, k_pos, key_ok, kv_head, k_desc, v_desc,
                         ks_head_ptr, vs_head_ptr, stride_ksb, stride_kss, stride_vsb,
                         stride_vss, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         HEAD_QK_PAD: tl.constexpr, HEAD_V_PAD: tl.constexpr,
                         MASKED: tl.constexpr, KV_QUANT: tl.constexpr):
    """:func:`_load_kv_tile` with ``KV_LOAD`` 2 / 3 (staged keys): the sequence's key
    ``k`` is row ``seq_row0 + k`` of the 3-D descriptors ``[rows, num_kv_heads, HEAD]``,
    one box per tile, no block-table lookup. Bad block ids were staged as NaN keys (the
    rows that see them come out NaN through the scores), so ``bad`` is empty. Masked-out
    keys are NOT zeroed (at head 256 the selects made the kernel spill, 104 bytes of
    stack): every row a tile reads was written by the staging kernel (a tile lies inside
    one staged block, staged blocks holding a visible key are written whole, V zero
    outside the visible keys and for bad ids) or lies past the workspace (the
    descriptor's zero fill), so V is finite there and K is masked through the scores."""
    row = (seq_row0 + key0).to(tl.int32)
    k_rows = k_desc.load([row, kv_head, 0]).reshape(BLOCK_N, HEAD_QK_PAD)
    v = v_desc.load([row, kv_head, 0]).reshape(BLOCK_N, HEAD_V_PAD)
    staged_block = (seq_row0 + key0) // BLOCK_SIZE
    k_sc, v_sc = _token_head_scales(ks_head_ptr, vs_head_ptr, staged_block.to(tl.int64),
                                    k_pos % BLOCK_SIZE, key_ok, stride_ksb, stride_kss,
                                    stride_vsb, stride_vss, k_pos, 0, 0, BLOCK_N, MASKED,
                                    KV_QUANT, 1)
    return tl.trans(k_rows), v, k_sc, v_sc, key_ok & ~key_ok


@triton.jit
def _to_compute(x, COMPUTE_DTYPE: tl.constexpr):
    """Cast to the dot operands' dtype: 0 float16, 1 bfloat16, 2 float32 (an int code, so
    the launch's arguments stay plain values)."""
    if COMPUTE_DTYPE == 0:
        return x.to(tl.float16)
    elif COMPUTE_DTYPE == 1:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def _kv_to_compute(x, COMPUTE_DTYPE: tl.constexpr, KV_BITS: tl.constexpr,
                   BITS_ASM: tl.constexpr):
    """A loaded K or V tile to the dot operands' dtype: a plain cast (``KV_BITS`` 0), or
    the 8-bit codes rebuilt as fp16 by :func:`portattn.kernels.byte_decode.decode_bytes`
    (1 e4m3fn bytes, as the value / 256; 2 e5m2 bytes; 3 int8), inline PTX if
    ``BITS_ASM``."""
    if KV_BITS == 0:
        return _to_compute(x, COMPUTE_DTYPE)
    else:
        return _to_compute(decode_bytes(x, KV_BITS, BITS_ASM), COMPUTE_DTYPE)


@triton.jit
def _first_block_ids(bt_row, bt_width, key_lo, key_hi, BLOCK_SIZE: tl.constexpr,
                     SCAN: tl.constexpr = 128):
    """The block-table entries of the first ``SCAN`` blocks of keys ``[key_lo, key_hi)``
    (0 where unused), loaded before the KV loop and checked after it by
    :func:`_full_tiles_have_bad_blocks`: nothing uses them in between, so their latency
    is hidden behind the loop instead of delaying its first tile."""
    b_lo, b_hi = _entry_range(key_lo, key_hi, BLOCK_SIZE)
    idx = b_lo + tl.arange(0, SCAN)
    used = (idx < b_hi) & (idx < bt_width)
    return tl.load(bt_row + idx, mask=used, other=0)


@triton.jit
def _entry_range(key_lo, key_hi, BLOCK_SIZE: tl.constexpr):
    """The block-table entries ``[b_lo, b_hi)`` holding keys ``[key_lo, key_hi)``; none
    when that range is empty (its bound then need not be a multiple of ``BLOCK_SIZE``,
    nor inside the sequence: a block size that does not divide the tile, e.g. 48, would
    otherwise name the entry of the block holding ``key_lo``, which may lie past the
    table)."""
    b_lo = key_lo // BLOCK_SIZE
    b_hi = tl.where(key_hi > key_lo, tl.cdiv(key_hi, BLOCK_SIZE), b_lo)
    return b_lo, b_hi


@triton.jit
def _full_tiles_have_bad_blocks(first_ids, bt_row, bt_width, num_blocks, key_lo, key_hi,
                                BLOCK_SIZE: tl.constexpr, SCAN: tl.constexpr = 128):
    """Whether a block-table entry for keys ``[key_lo, key_hi)`` (the unmasked tiles, seen
    by every row of the program) is outside ``[0, num_blocks)`` or past the table's width.
    ``first_ids`` are the first ``SCAN`` entries (:func:`_first_block_ids`); the rest, if
    any, are read here (1/BLOCK_SIZE of the keys, warm in L2 after the loop)."""
    b_lo, b_hi = _entry_range(key_lo, key_hi, BLOCK_SIZE)
    found = _bad_entries(b_lo + tl.arange(0, SCAN), first_ids, b_hi, bt_width, num_blocks)
    for b0 in tl.range(b_lo + SCAN, b_hi, SCAN):
        idx = b0 + tl.arange(0, SCAN)
        ids = tl.load(bt_row + idx, mask=(idx < b_hi) & (idx < bt_width), other=0)
        found = found | _bad_entries(idx, ids, b_hi, bt_width, num_blocks)
    return tl.max(found, 0) > 0


@triton.jit
def _bad_entries(idx, ids, b_hi, bt_width, num_blocks):
    """1 where table entry ``idx`` (below ``b_hi``) holds an id outside ``[0,
    num_blocks)`` or lies past the table's width, else 0 (int32)."""
    bad = (idx < b_hi) & ((idx >= bt_width) | (ids < 0) | (ids >= num_blocks))
    return bad.to(tl.int32)


@triton.jit
def _times_v_scales(p, v_sc, KV_QUANT: tl.constexpr, V_SC_BOOST: tl.constexpr):
    """P's columns times the per-token-head V scales (``KV_QUANT`` 2), in fp32, before P
    is cast for the P V dot. With fp16 dots a product below 6.1e-5 becomes an fp16
    subnormal; ``V_SC_BOOST`` (a power of two, undone on ``acc`` after the loop) lifts
    the products of e5m2 caches, whose scales (absmax / 57344) sit below that for any
    V of unit size (NOTES.md, session 25)."""
    if KV_QUANT == 2:
        if V_SC_BOOST != 1.0:
            p = p * (v_sc * V_SC_BOOST)[None, :]
        else:
            p = p * v_sc[None, :]
    return p


@triton.jit
def _attend_tile(j, acc, m_i, l_i, q, seq_len, k_lo, bt_row, bt_width,
                 num_blocks, kv_head, k_src, v_src, ks_head_ptr, vs_head_ptr, stride_kb,
                 stride_ks, stride_vb, stride_vs, stride_ksb, stride_kss, stride_vsb,
                 stride_vss, qk_scale, softcap, slope2, q_pos, window, offs_dk, offs_dv,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_QK: tl.constexpr,
                 HEAD_QK_PAD: tl.constexpr, HEAD_V: tl.constexpr, HEAD_V_PAD: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, KV_QUANT: tl.constexpr,
                 FP8_DOT: tl.constexpr, FP8_ACC: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                 DOT_PREC: tl.constexpr, CHECK_BLOCKS: tl.constexpr, KV_LOAD: tl.constexpr,
                 v_mult, V_STAGE: tl.constexpr, KV_BITS: tl.constexpr,
                 BITS_ASM: tl.constexpr, acc_odd, V_PAIRS: tl.constexpr,
                 V_SC_BOOST: tl.constexpr, col_head, row_kv, stride_kh, stride_vh,
                 stride_ksh, stride_vsh, TILE_HEADS: tl.constexpr):
    """One KV tile ``j`` through the online softmax (the body of :func:`_attend_tiles`).
    With ``V_PAIRS``, ``HEAD_V`` / ``HEAD_V_PAD`` / ``offs_dv`` count V's 16-bit pairs of
    codes, ``acc`` accumulates the even head columns and ``acc_odd`` the odd ones. With
    ``TILE_HEADS`` > 1 the tile's ``BLOCK_N`` columns are ``BLOCK_N // TILE_HEADS`` keys x
    ``TILE_HEADS`` kv heads (column ``c``: key ``c // TILE_HEADS``, head ``col_head[c] = c
    % TILE_HEADS``), and row ``r`` scores only the columns of its own head ``row_kv[r]``."""
    if TILE_HEADS > 1:
        TILE_KEYS: tl.constexpr = BLOCK_N // TILE_HEADS
        k_pos = j * TILE_KEYS + tl.arange(0, BLOCK_N) // TILE_HEADS
        key0 = j * TILE_KEYS
    else:
        k_pos = j * BLOCK_N + tl.arange(0, BLOCK_N)
        key0 = j * BLOCK_N
    key_ok = (k_pos >= k_lo) & (k_pos < seq_len)
    k, v, k_sc, v_sc, bad = _load_kv_tile(
        bt_row, bt_width, num_blocks, key0, k_pos, key_ok, kv_head, k_src, v_src,
        ks_head_ptr, vs_head_ptr, stride_kb, stride_ks, stride_vb, stride_vs, stride_ksb,
        stride_kss, stride_vsb, stride_vss, offs_dk, offs_dv, col_head, stride_kh,
        stride_vh, stride_ksh, stride_vsh, BLOCK_N, BLOCK_SIZE, HEAD_QK, HEAD_QK_PAD,
        HEAD_V, HEAD_V_PAD, MASKED, KV_QUANT, CHECK_BLOCKS, KV_LOAD, TILE_HEADS)
    if FP8_DOT:  # fp8 q x fp8 K on the tensor cores, fp32 accumulation
        qk = tl.dot(q, k, max_num_imprecise_acc=FP8_ACC)
    else:
        qk = tl.dot(q, _kv_to_compute(k, COMPUTE_DTYPE, KV_BITS, BITS_ASM),
                    input_precision=DOT_PREC)
    if KV_QUANT == 2:
        qk = qk * k_sc[None, :]
    s = score_tile(qk, qk_scale, softcap, slope2, q_pos, k_pos, seq_len, window,
                   MASKED, CAUSAL, USE_WINDOW, USE_SOFTCAP, ALIBI)
    if TILE_HEADS > 1:  # other heads' columns: every row keeps its own head's keys, so
        # a tile every row sees leaves no row without a finite score. The test is made
        # of j on purpose: a loop-invariant [BLOCK_M, BLOCK_N] mask is hoisted out of the
        # loop and held in registers, and at the paired tile's cap of 128 that spilled
        # 156 bytes (sm90 offline; 4 bytes this way, as without the mask: NOTES.md s33)
        own = ((row_kv + j) % TILE_HEADS)[:, None] == ((col_head + j) % TILE_HEADS)[None, :]
        s = tl.where(own, s, float("-inf"))
    if MASKED:  # edge tiles: exactly the rows that see a bad key
        s = tl.where(bad[None, :] & (s > float("-inf")), float("nan"), s)
    p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i, MASKED)
    p = _times_v_scales(p, v_sc, KV_QUANT, V_SC_BOOST)
    p = _to_compute(p, COMPUTE_DTYPE)
    if V_PAIRS:  # int16 pairs of codes, split in registers after ldmatrix.trans
        v_even, v_odd = decode_pairs(v, V_PAIRS, BITS_ASM)
        acc = tl.dot(p, _to_compute(v_even, COMPUTE_DTYPE), acc * alpha[:, None],
                     input_precision=DOT_PREC)
        acc_odd = tl.dot(p, _to_compute(v_odd, COMPUTE_DTYPE), acc_odd * alpha[:, None],
                         input_precision=DOT_PREC)
    else:
        if V_STAGE:  # see the module doc: an op the compiler cannot fold or hoist
            v = _kv_to_compute(v, COMPUTE_DTYPE, KV_BITS, BITS_ASM) * v_mult
        else:
            v = _kv_to_compute(v, COMPUTE_DTYPE, KV_BITS, BITS_ASM)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, acc_odd, m_i, l_i


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, tile_start, tile_end, seq_len, k_lo, bt_row, bt_width,
                  num_blocks, kv_head, k_src, v_src, ks_head_ptr, vs_head_ptr, stride_kb,
                  stride_ks, stride_vb, stride_vs, stride_ksb, stride_kss, stride_vsb,
                  stride_vss, qk_scale, softcap, slope2, q_pos, window, offs_dk, offs_dv,
                  BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_QK: tl.constexpr,
                  HEAD_QK_PAD: tl.constexpr, HEAD_V: tl.constexpr, HEAD_V_PAD: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
                  USE_SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, KV_QUANT: tl.constexpr,
                  FP8_DOT: tl.constexpr, FP8_ACC: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                  DOT_PREC: tl.constexpr, CHECK_BLOCKS: tl.constexpr, KV_LOAD: tl.constexpr,
                  v_mult, V_STAGE: tl.constexpr, KV_BITS: tl.constexpr,
                  BITS_ASM: tl.constexpr, acc_odd, V_PAIRS: tl.constexpr,
                  V_SC_BOOST: tl.constexpr, col_head, row_kv, stride_kh, stride_vh,
                  stride_ksh, stride_vsh, TILE_HEADS: tl.constexpr):
    """Stream KV tiles ``[tile_start, tile_end)`` through the online softmax.

    Masked tiles load only keys in ``[k_lo, seq_len)``: block-table entries and K/V before
    the query tile's window (which an engine may already have freed) are never read.
    Quantized caches are cast to ``COMPUTE_DTYPE`` as loaded (exact for fp8 and int8); the
    per-tensor scales are folded outside the loop by the caller, per-token-head scales
    multiply the score columns (K) and P's columns (V) in fp32. Keys with a bad block id
    turn the scores of the rows that see them into NaN in masked tiles; unmasked tiles
    (every row sees every key) only clamp the ids, their bad ids being found by the
    caller's scan of their table entries, so the hot loop has no per-score select and no
    reduction."""
    for j in tl.range(tile_start, tile_end):
        acc, acc_odd, m_i, l_i = _attend_tile(
            j, acc, m_i, l_i, q, seq_len, k_lo, bt_row, bt_width, num_blocks, kv_head,
            k_src, v_src, ks_head_ptr, vs_head_ptr, stride_kb, stride_ks, stride_vb,
            stride_vs, stride_ksb, stride_kss, stride_vsb, stride_vss, qk_scale, softcap,
            slope2, q_pos, window, offs_dk, offs_dv, BLOCK_N, BLOCK_SIZE, HEAD_QK,
            HEAD_QK_PAD, HEAD_V, HEAD_V_PAD, MASKED, CAUSAL, USE_WINDOW, USE_SOFTCAP, ALIBI,
            KV_QUANT, FP8_DOT, FP8_ACC, COMPUTE_DTYPE, DOT_PREC, CHECK_BLOCKS, KV_LOAD,
            v_mult, V_STAGE, KV_BITS, BITS_ASM, acc_odd, V_PAIRS, V_SC_BOOST, col_head,
            row_kv, stride_kh, stride_vh, stride_ksh, stride_vsh, TILE_HEADS)
    return acc, acc_odd, m_i, l_i


@triton.jit
def _attend_staged_tiles(acc, m_i, l_i, q, tile_start, tile_end, full_lo, full_hi, seq_len,
                         k_lo, seq_row0, kv_head, k_desc, v_desc, ks_head_ptr, vs_head_ptr,
                         stride_ksb, stride_kss, stride_vsb, stride_vss, qk_scale, softcap,
                         slope2, q_pos, window, BLOCK_N: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, HEAD_QK_PAD: tl.constexpr,
                         HEAD_V_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                         USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                         ALIBI: tl.constexpr, KV_QUANT: tl.constexpr,
                         COMPUTE_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                         V_SC_BOOST: tl.constexpr):
    """``ONE_LOOP``: staged KV tiles ``[tile_start, tile_end)`` in one pipelined loop, the
    masks applied (a uniform branch) only to the edge tiles outside ``[full_lo,
    full_hi)``. The three loops of :func:`_attend_tiles` (leading edge, full tiles,
    trailing edge) each start their own pipeline, so the diagonal tile's K/V loads wait
    until the full tiles drain; here they are prefetched like any other tile. Staged keys
    only (``KV_LOAD`` >= 2: no bad ids, no 8-bit codes, K/V loads that need no key mask;
    per-token-head scales, where staged beside the codes, are loaded masked in every
    tile)."""
    for j in tl.range(tile_start, tile_end):
        k_pos = j * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = (k_pos >= k_lo) & (k_pos < seq_len)
        k, v, k_sc, v_sc, _bad = _load_kv_tile_staged(
            seq_row0, j * BLOCK_N, k_pos, key_ok, kv_head, k_desc, v_desc, ks_head_ptr,
            vs_head_ptr, stride_ksb, stride_kss, stride_vsb, stride_vss, BLOCK_N,
            BLOCK_SIZE, HEAD_QK_PAD, HEAD_V_PAD, True, KV_QUANT)
        qk = tl.dot(q, _to_compute(k, COMPUTE_DTYPE), input_precision=DOT_PREC)
        if KV_QUANT == 2:
            qk = qk * k_sc[None, :]
        s = score_tile(qk, qk_scale, softcap, slope2, q_pos, k_pos, seq_len, window,
                       False, CAUSAL, USE_WINDOW, USE_SOFTCAP, ALIBI)
        if (j < full_lo) | (j >= full_hi):
            s = mask_scores(s, q_pos, k_pos, seq_len, window, CAUSAL, USE_WINDOW)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i, True)
        p = _times_v_scales(p, v_sc, KV_QUANT, V_SC_BOOST)
        acc = tl.dot(_to_compute(p, COMPUTE_DTYPE), _to_compute(v, COMPUTE_DTYPE),
                     acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _store_rows(out_ptr, result, q_start, row_tok, row_head, row_ok, offs_dv, stride_ot,
                stride_oh, stride_od, out_scale_ptr, HEAD_V: tl.constexpr,
                FP8_OUT: tl.constexpr, FP8_MAX: tl.constexpr):
    """Store ``result`` ``[BLOCK_M, HEAD_V_PAD]`` (fp32) at the rows' (token, head); fp8
    output is ``clamp(result / output_scale)`` as DESIGN.md says."""
    if FP8_OUT:
        result = result * (1.0 / tl.load(out_scale_ptr))
        result = tl.minimum(tl.maximum(result, -FP8_MAX), FP8_MAX)
    o_ptrs = (out_ptr + (q_start + row_tok).to(tl.int64)[:, None] * stride_ot
              + row_head[:, None] * stride_oh + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < HEAD_V)[None, :])


@triton.jit
def _poison_long_sequence(out_ptr, q_start, q_len, kv_head, stride_ot, stride_oh, stride_od,
                          GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_V: tl.constexpr,
                          HEAD_V_PAD: tl.constexpr):
    """NaN into every row of a sequence that a decode-tile launch cannot serve (more
    queries than its tile, i.e. an understated ``max_seqlen_q``) and that no long-tile
    launch follows for: wrong hints give visibly wrong rows, never stale ones."""
    rows = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_V_PAD)
    nan = tl.full([BLOCK_M, HEAD_V_PAD], float("nan"), tl.float32)
    for r0 in tl.range(0, q_len * GROUP, BLOCK_M):
        r = r0 + rows
        tok = r // GROUP
        head = kv_head * GROUP + r % GROUP
        ptrs = (out_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_ot
                + head[:, None] * stride_oh + offs_dv[None, :] * stride_od)
        tl.store(ptrs, nan.to(out_ptr.dtype.element_ty),
                 mask=(r < q_len * GROUP)[:, None] & (offs_dv < HEAD_V)[None, :])


#: fp32 partials one merging program loads at once at most (the kernel's MERGE_LOAD; a
#: row larger than that is still loaded whole): 8192 (64 per thread at 4 warps), or up to
#: 16384 where that takes one query's rows (its GQA group, rounded to a power of two) in
#: one round trip instead of two, unless the tile's registers are tight (``maxnreg``: the
#: paired 8-bit decode tiles of sm90 at head 128; fewer than 4 warps: the narrow split
#: tile of 2, where 16384 partials spilled at GQA 8-16 offline, NOTES.md session 31). GQA
#: 4 with 32 segments of head 128 is such a case: 1 x 8192 bf16 decode -8%, 1 x 32768 -4%
#: on the H200 (NOTES.md, session 22).
MERGE_LOAD_ELEMENTS = 8192
MERGE_LOAD_ELEMENTS_ONE_QUERY = 16384


def merge_load_elements(group: int, merge_segments: int, head_v_pad: int,
                        register_capped: bool) -> int:
    """The kernel's ``MERGE_LOAD`` for a merge of ``merge_segments`` (padded) segments of
    ``head_v_pad`` columns, rows of ``group`` query heads per query; ``register_capped``:
    the tile's registers are tight (see :data:`MERGE_LOAD_ELEMENTS`)."""
    one_query = next_pow2(group) * merge_segments * head_v_pad
    if not register_capped and MERGE_LOAD_ELEMENTS < one_query <= MERGE_LOAD_ELEMENTS_ONE_QUERY:
        return one_query
    return MERGE_LOAD_ELEMENTS


@triton.jit(do_not_specialize=["num_tokens"])  # a bound only: no compile per residue
def unified_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, block_table_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
        alibi_ptr, sinks_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, ticket_ptr,
        q_scale_ptr, k_scale_ptr, v_scale_ptr, out_scale_ptr,
        num_seqs, num_tokens, num_q_heads, num_segments, num_blocks, bt_width, scale,
        softcap, window, v_one,
        stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_QK: tl.constexpr,
        HEAD_QK_PAD: tl.constexpr, HEAD_V: tl.constexpr, HEAD_V_PAD: tl.constexpr,
        SEQ_MODE: tl.constexpr, SHORT_Q: tl.constexpr, STAGED_Q: tl.constexpr,
        SPLIT: tl.constexpr,
        LONG_FOLLOWS: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
        USE_SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, USE_SINKS: tl.constexpr,
        KV_QUANT: tl.constexpr, Q_SCALED: tl.constexpr, Q_PRESCALE: tl.constexpr,
        FP8_DOT: tl.constexpr,
        FP8_ACC: tl.constexpr, FP8_OUT: tl.constexpr, FP8_MAX: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
        CHECK_BLOCKS: tl.constexpr = True, KV_LOAD: tl.constexpr = 0,
        V_STAGE: tl.constexpr = False, KV_BITS: tl.constexpr = 0,
        BITS_ASM: tl.constexpr = False, V_PAIRS: tl.constexpr = 0,
        FLAT_GRID: tl.constexpr = False, ONE_LOOP: tl.constexpr = False,
        MERGE_SEGMENTS: tl.constexpr = 0, MERGE_LOAD: tl.constexpr = MERGE_LOAD_ELEMENTS,
        V_SC_BOOST: tl.constexpr = 1.0, TILE_HEADS: tl.constexpr = 1):
    """Paged attention of one query tile x one kv head (``TILE_HEADS`` of them) x one KV
    segment (see module doc)."""
    tl.static_assert(not FP8_DOT or KV_BITS == 0,
                     "FP8_DOT needs the cache's fp8 values, KV_BITS rebuilds them as fp16")
    tl.static_assert(not (V_PAIRS and V_STAGE), "V_PAIRS and V_STAGE exclude each other")
    tl.static_assert(not ONE_LOOP or (KV_LOAD >= 2 and KV_BITS == 0 and not V_PAIRS
                                      and not V_STAGE and not FP8_DOT),
                     "ONE_LOOP is the staged 16-bit loop (KV_LOAD 2 / 3)")
    tl.static_assert(MERGE_SEGMENTS == 0 or SPLIT, "MERGE_SEGMENTS merges split partials")
    tl.static_assert(not FLAT_GRID or SEQ_MODE != 1,
                     "FLAT_GRID orders query tiles (SEQ_MODE 0 / 2)")
    tl.static_assert((V_PAIRS == 1) == (KV_BITS == 1) or V_PAIRS == 0,
                     "e4m3 bits (value / 256) in V pairs go with KV_BITS == 1 and only then")
    tl.static_assert(TILE_HEADS == 1 or (SEQ_MODE == 1 and KV_LOAD == 0),
                     "TILE_HEADS: decode tiles (SEQ_MODE 1) over pointer loads")
    tl.static_assert(GROUP % TILE_HEADS == 0 and BLOCK_N % TILE_HEADS == 0,
                     "TILE_HEADS divides GROUP (its heads' query rows) and BLOCK_N")
    # keys per KV tile: BLOCK_N columns are (key, kv head) pairs with TILE_HEADS > 1
    TILE_KEYS: tl.constexpr = BLOCK_N // TILE_HEADS
    num_kv_heads = num_q_heads // GROUP  # kv head groups of TILE_HEADS heads
    if FLAT_GRID:  # SEQ_MODE 0 / 2: axis 0 is (query tile, kv head), the kv head fastest
        kv_head = tl.program_id(0) % num_kv_heads
        tile_pid = tl.program_id(0) // num_kv_heads
        tile_programs = tl.num_programs(0) // num_kv_heads
    else:
        kv_head = tl.program_id(1)
        tile_pid = tl.program_id(0)
        tile_programs = tl.num_programs(0)
    segment = tl.program_id(2)
    # seq_lens is read as soon as the sequence is known, before any branch on q_len: a
    # load after the branch would start only when cu_seqlens_q has arrived, a second
    # dependent memory round trip ahead of the block-table and K/V loads
    if SEQ_MODE == 1:
        seq = tl.program_id(0)
        seq_len = tl.load(seq_lens_ptr + seq)
        q_start, q_len = query_span(cu_seqlens_q_ptr, seq, num_tokens)
        if q_len > BLOCK_Q:
            if not LONG_FOLLOWS:
                if segment == 0:
                    _poison_long_sequence(out_ptr, q_start, q_len, kv_head, stride_ot,
                                          stride_oh, stride_od, GROUP, BLOCK_M, HEAD_V,
                                          HEAD_V_PAD)
            return
        tile_local = 0
    else:
        tile_idx = tile_programs - 1 - tile_pid  # heaviest tiles first
        seq = find_seq_of_tile(cu_seqlens_q_ptr, num_seqs, tile_idx, BLOCK_Q)
        seq_len = tl.load(seq_lens_ptr + seq)
        q_start, q_len = query_span(cu_seqlens_q_ptr, seq, num_tokens)
        tile_local = tile_idx - (q_start // BLOCK_Q + seq)  # < 0 only for bad metadata
        if SEQ_MODE == 2:
            if q_len <= SHORT_Q:
                return
        if STAGED_Q > 0:  # served by a launch over staged keys
            if q_len >= STAGED_Q:
                return
    t0 = tile_local * BLOCK_Q
    if (t0 >= q_len) | (t0 < 0):
        return
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, HEAD_QK_PAD)
    offs_dv = tl.arange(0, HEAD_V_PAD)
    row_tok = t0 + rows // GROUP                      # query index within the sequence
    row_head = kv_head * GROUP + rows % GROUP         # query head
    row_ok = (rows < BLOCK_Q * GROUP) & (row_tok < q_len)
    q_pos = context + row_tok

    q_ptrs = (q_ptr + (q_start + row_tok).to(tl.int64)[:, None] * stride_qt
              + row_head[:, None] * stride_qh + offs_dk[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_dk < HEAD_QK)[None, :], other=0.0)

    # Per-tensor scales fold into the softmax scale (q, K) and the output (V): the loop
    # only casts. Per-token-head K/V scales are applied per tile in _attend_tiles.
    qk_scale = scale
    if Q_SCALED:
        qk_scale = qk_scale * tl.load(q_scale_ptr)
    if KV_QUANT == 1:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    if not USE_SOFTCAP:
        qk_scale = qk_scale * 1.4426950408889634
    if Q_PRESCALE:  # q * scale once, in fp32, before the cast (keeps fp16 in range)
        q = _to_compute(q.to(tl.float32) * qk_scale, COMPUTE_DTYPE)
        qk_scale = 1.0
    elif not FP8_DOT:
        q = _to_compute(q, COMPUTE_DTYPE)
    if KV_BITS == 1:  # e4m3 bits decode to value / 256 (_kv_to_compute)
        qk_scale = qk_scale * 256.0
    if ALIBI != 0:
        slope2 = tl.load(alibi_ptr + row_head, mask=row_ok, other=0.0).to(tl.float32) \
            * 1.4426950408889634
    else:
        slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_SINKS:
        if not SPLIT:  # split-KV adds the sink in the merge instead
            m_i = sink_logit2(tl.load(sinks_ptr + row_head, mask=row_ok,
                                      other=0.0).to(tl.float32))
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    # V as loaded: HEAD_V columns, or HEAD_V // 2 pairs of 8-bit codes (V_PAIRS)
    V_W: tl.constexpr = HEAD_V // 2 if V_PAIRS else HEAD_V
    V_W_PAD: tl.constexpr = HEAD_V_PAD // 2 if V_PAIRS else HEAD_V_PAD
    offs_vw = tl.arange(0, V_W_PAD)
    acc = tl.zeros([BLOCK_M, V_W_PAD], dtype=tl.float32)
    if V_PAIRS:  # the odd head columns; acc holds the even ones until the loop ends
        acc_odd = tl.zeros([BLOCK_M, V_W_PAD], dtype=tl.float32)
    else:
        acc_odd = tl.zeros([1], dtype=tl.float32)

    # Visible keys: [k_lo, k_hi) for some row, [k_lo_all, k_hi_all) for every row.
    t_last = tl.minimum(t0 + BLOCK_Q, q_len) - 1
    if CAUSAL:
        k_hi = tl.minimum(seq_len, context + t_last + 1)
        k_hi_all = context + t0 + 1
    else:
        k_hi = seq_len
        k_hi_all = seq_len
    if USE_WINDOW:
        k_lo = tl.maximum(context + t0 - window + 1, 0)
        k_lo_all = tl.maximum(context + t_last - window + 1, 0)
    else:
        k_lo = 0
        k_lo_all = 0
    tile_lo = k_lo // TILE_KEYS
    tile_hi = tl.cdiv(k_hi, TILE_KEYS)
    if KV_LOAD >= 2:  # only bt_width * BLOCK_SIZE keys per sequence were staged (the
        # plan's max_seqlen_k): never read past them; rows that see more are NaN below
        staged_keys = bt_width * BLOCK_SIZE
        tile_hi = tl.minimum(tile_hi, staged_keys // TILE_KEYS)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(k_lo_all, TILE_KEYS), tile_lo), tile_hi)
    full_hi = tl.minimum(tl.maximum(k_hi_all // TILE_KEYS, full_lo), tile_hi)
    if SPLIT:
        per_segment = tl.cdiv(tile_hi - tile_lo, num_segments)
        seg_lo = tl.minimum(tile_lo + segment * per_segment, tile_hi)
        seg_hi = tl.minimum(seg_lo + per_segment, tile_hi)
    else:
        seg_lo = tile_lo
        seg_hi = tile_hi

    if V_STAGE:  # per-tensor: the V scale (and e4m3 bytes' 256) go into V, not the output
        if KV_QUANT == 1:
            v_mult = tl.load(v_scale_ptr)
        else:
            v_mult = tl.full([], v_one, tl.float32)
        if KV_BITS == 1:
            v_mult = v_mult * 256.0
        v_mult = _to_compute(v_mult, COMPUTE_DTYPE)
    else:
        v_mult = v_one
    if KV_LOAD >= 2:  # staged keys: bt_row carries the sequence's first staged row (an
        # int64 offset, not a pointer: _load_kv_tile_staged's seq_row0); its blocks follow
        # its first one, -1 where the workspace had no room (inconsistent cu_seqlens_q)
        first_block = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt)
        unstaged = first_block < 0
        bt_row = tl.maximum(first_block, 0).to(tl.int64) * BLOCK_SIZE
    else:
        bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    scan_lo = tl.maximum(full_lo, seg_lo) * TILE_KEYS
    scan_hi = tl.minimum(full_hi, seg_hi) * TILE_KEYS
    if CHECK_BLOCKS and KV_LOAD < 2:  # staged keys: bad ids are already NaN keys
        # issued here, used after the KV loop: no reduction or wait before the first
        # tile (H200: within the rounds' spread; NOTES.md session 24)
        first_ids = _first_block_ids(bt_row, bt_width, scan_lo, scan_hi, BLOCK_SIZE)
    if KV_LOAD == 2:  # staged keys as rows, built once per program
        k_src = tl.make_tensor_descriptor(
            k_ptr, shape=[num_blocks * BLOCK_SIZE, num_kv_heads, HEAD_QK],
            strides=[stride_ks, stride_kh, 1], block_shape=[BLOCK_N, 1, HEAD_QK_PAD])
        v_src = tl.make_tensor_descriptor(
            v_ptr, shape=[num_blocks * BLOCK_SIZE, num_kv_heads, V_W],
            strides=[stride_vs, stride_vh, 1], block_shape=[BLOCK_N, 1, V_W_PAD])
    elif KV_LOAD == 3:  # staged keys, descriptors built on the host (grid constants)
        k_src = k_ptr
        v_src = v_ptr
    elif KV_LOAD == 1:  # built once per program, never inside the pipelined KV loop
        k_src = tl.make_tensor_descriptor(
            k_ptr, shape=[num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_QK],
            strides=[stride_kb, stride_ks, stride_kh, 1],
            block_shape=[1, BLOCK_N, 1, HEAD_QK_PAD])
        v_src = tl.make_tensor_descriptor(
            v_ptr, shape=[num_blocks, BLOCK_SIZE, num_kv_heads, V_W],
            strides=[stride_vb, stride_vs, stride_vh, 1],
            block_shape=[1, BLOCK_N, 1, V_W_PAD])
    else:  # the program's (first) kv head
        k_src = k_ptr + kv_head * TILE_HEADS * stride_kh
        v_src = v_ptr + kv_head * TILE_HEADS * stride_vh
    ks_head_ptr = k_scale_ptr + kv_head * TILE_HEADS * stride_ksh
    vs_head_ptr = v_scale_ptr + kv_head * TILE_HEADS * stride_vsh
    # TILE_HEADS > 1: a KV tile's column c is kv head c % TILE_HEADS of the program's,
    # a query row r belongs to kv head (r % GROUP) // (GROUP // TILE_HEADS) of them
    col_head = tl.arange(0, BLOCK_N) % TILE_HEADS
    row_kv = (rows % GROUP) // (GROUP // TILE_HEADS)
    if ONE_LOOP:  # staged keys: edge and full tiles in one pipelined loop
        acc, m_i, l_i = _attend_staged_tiles(
            acc, m_i, l_i, q, tl.maximum(tile_lo, seg_lo), tl.minimum(tile_hi, seg_hi),
            full_lo, full_hi, seq_len, k_lo, bt_row, kv_head, k_src, v_src, ks_head_ptr,
            vs_head_ptr, stride_ksb, stride_kss, stride_vsb, stride_vss, qk_scale, softcap,
            slope2, q_pos, window, BLOCK_N, BLOCK_SIZE, HEAD_QK_PAD, V_W_PAD, CAUSAL,
            USE_WINDOW, USE_SOFTCAP, ALIBI, KV_QUANT, COMPUTE_DTYPE, DOT_PREC, V_SC_BOOST)
    else:  # three loops: leading edge (window start, with a window only), full tiles
        # without masks, trailing edge (causal diagonal, sequence end)
        for part in tl.static_range(0 if USE_WINDOW else 1, 3):
            if part == 0:
                lo = tl.maximum(tile_lo, seg_lo)
                hi = tl.minimum(full_lo, seg_hi)
            elif part == 1:
                lo = tl.maximum(full_lo, seg_lo)
                hi = tl.minimum(full_hi, seg_hi)
            else:
                lo = tl.maximum(full_hi, seg_lo)
                hi = tl.minimum(tile_hi, seg_hi)
            # decode tiles without a window: a trailing edge without tiles (in every
            # segment but the one(s) holding the last tile(s); in all of them when one
            # query meets a length that is a multiple of BLOCK_N) is skipped as a
            # whole, a uniform branch: its pipelined loop's prologue and drain, run for
            # zero trips, cost each program 1.4-2.8 us (bf16 1 x 8192 decode 20.0 ->
            # 18.5 us, NOTES.md session 23). Not in prefill tiles (ptxas spilled more)
            # nor with a window (168 -> 189 registers, untimed); there the always-true
            # branch is folded away by Triton's canonicalizer (PTX as before).
            run = (lo < hi) if (SEQ_MODE == 1 and not USE_WINDOW and part == 2) else True
            if run:
                acc, acc_odd, m_i, l_i = _attend_tiles(
                    acc, m_i, l_i, q, lo, hi, seq_len, k_lo, bt_row, bt_width, num_blocks,
                    kv_head, k_src, v_src, ks_head_ptr, vs_head_ptr, stride_kb, stride_ks,
                    stride_vb, stride_vs, stride_ksb, stride_kss, stride_vsb, stride_vss,
                    qk_scale, softcap, slope2, q_pos, window, offs_dk, offs_vw, BLOCK_N,
                    BLOCK_SIZE, HEAD_QK, HEAD_QK_PAD, V_W, V_W_PAD, part != 1, CAUSAL,
                    USE_WINDOW, USE_SOFTCAP, ALIBI, KV_QUANT, FP8_DOT, FP8_ACC, COMPUTE_DTYPE,
                    DOT_PREC, CHECK_BLOCKS, KV_LOAD, v_mult, V_STAGE, KV_BITS, BITS_ASM,
                    acc_odd, V_PAIRS, V_SC_BOOST, col_head, row_kv, stride_kh, stride_vh,
                    stride_ksh, stride_vsh, TILE_HEADS)

    if V_PAIRS:  # even and odd head columns back in place
        acc = tl.reshape(tl.join(acc, acc_odd), [BLOCK_M, HEAD_V_PAD])
    if KV_QUANT == 1 and not V_STAGE:  # the V scale, once per row, not per element
        acc = acc * tl.load(v_scale_ptr)
    if KV_BITS == 1 and not V_STAGE:
        acc = acc * 256.0
    if KV_QUANT == 2 and V_SC_BOOST != 1.0:  # P's columns were scaled by V_SC_BOOST
        acc = acc * (1.0 / V_SC_BOOST)
    if KV_LOAD >= 2:  # an understated max_seqlen_k: rows that see unstaged keys are NaN
        if CAUSAL:
            row_hi = tl.minimum(seq_len, q_pos + 1)
        else:
            row_hi = tl.zeros_like(q_pos) + seq_len
        past = row_ok & ((row_hi > staged_keys) | unstaged)
        l_i = tl.where(past, float("nan"), l_i)
        acc = tl.where(past[:, None], float("nan"), acc)
    if CHECK_BLOCKS and KV_LOAD < 2:
        poisoned = _full_tiles_have_bad_blocks(first_ids, bt_row, bt_width, num_blocks,
                                               scan_lo, scan_hi, BLOCK_SIZE)
    else:
        poisoned = False
    if poisoned:  # NaN in both: a NaN sum alone would be read as "no visible key"
        l_i = tl.where(row_ok, float("nan"), l_i)
        acc = tl.where(row_ok[:, None], float("nan"), acc)
    if not SPLIT:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a NaN sum (a NaN sink) stays NaN
        _store_rows(out_ptr, acc / l_safe[:, None], q_start, row_tok, row_head, row_ok,
                    offs_dv, stride_ot, stride_oh, stride_od, out_scale_ptr, HEAD_V, FP8_OUT,
                    FP8_MAX)
    else:
        part_row = ((seq * BLOCK_Q + row_tok).to(tl.int64) * num_q_heads + row_head) \
            * num_segments + segment
        tl.store(part_m_ptr + part_row, m_i, mask=row_ok)
        tl.store(part_l_ptr + part_row, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_V_PAD + offs_dv[None, :], acc,
                 mask=row_ok[:, None])
        if MERGE_SEGMENTS > 0:  # the last segment of this (sequence, kv head) merges
            tl.debug_barrier()  # every thread's partials stored before the release
            ticket = ticket_ptr + seq * num_kv_heads + kv_head
            arrived = tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu")
            if arrived == num_segments - 1:
                tl.store(ticket, 0)  # 0 again for the next launch (stream order)
                _merge_tile_partials(
                    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, sinks_ptr, out_scale_ptr,
                    seq, kv_head, q_start, q_len, num_q_heads, num_segments, stride_ot,
                    stride_oh, stride_od, GROUP, BLOCK_Q, HEAD_V, HEAD_V_PAD, USE_SINKS,
                    FP8_OUT, FP8_MAX, MERGE_SEGMENTS, MERGE_LOAD)


@triton.jit
def _merge_tile_partials(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, sinks_ptr,
                         out_scale_ptr, seq, kv_head, q_start, q_len, num_q_heads,
                         num_segments, stride_ot, stride_oh, stride_od, GROUP: tl.constexpr,
                         BLOCK_Q: tl.constexpr, HEAD_V: tl.constexpr,
                         HEAD_V_PAD: tl.constexpr, USE_SINKS: tl.constexpr,
                         FP8_OUT: tl.constexpr, FP8_MAX: tl.constexpr,
                         MERGE_SEGMENTS: tl.constexpr, MERGE_LOAD: tl.constexpr):
    """The split-KV merge of one decode tile's rows (``BLOCK_Q`` queries x ``GROUP``
    heads) by the segment program that finished last: the sum of
    :mod:`portattn.kernels.reduce` (its :func:`combine_segments`), with every segment of
    ``MERGE_ROWS`` rows loaded at once as a ``[MERGE_ROWS, MERGE_SEGMENTS, HEAD_V_PAD]``
    tile (not one segment after another: a serial chain of L2 round trips lost to the
    merge kernel, NOTES.md). Partials written by other programs are read through L2
    (``.cg``), after the ticket's acquire."""
    MERGE_ROWS: tl.constexpr = _merge_rows(BLOCK_Q * GROUP, MERGE_SEGMENTS * HEAD_V_PAD,
                                           MERGE_LOAD)
    segs = tl.arange(0, MERGE_SEGMENTS)
    offs_dv = tl.arange(0, HEAD_V_PAD)
    seg_ok = segs < num_segments
    rows = q_len * GROUP  # q_len <= BLOCK_Q here: only the rows of real queries
    for r0 in tl.range(0, rows, MERGE_ROWS):
        r = r0 + tl.arange(0, MERGE_ROWS)
        tok = r // GROUP
        head = kv_head * GROUP + r % GROUP
        ok = r < rows
        first = ((seq * BLOCK_Q + tok).to(tl.int64) * num_q_heads + head) * num_segments
        idx = first[:, None] + segs[None, :]
        both = ok[:, None] & seg_ok[None, :]
        m = tl.load(part_m_ptr + idx, mask=both, other=float("-inf"), cache_modifier=".cg")
        l_seg = tl.load(part_l_ptr + idx, mask=both, other=0.0, cache_modifier=".cg")
        acc = tl.load(part_acc_ptr + idx[:, :, None] * HEAD_V_PAD + offs_dv[None, None, :],
                      mask=both[:, :, None], other=0.0, cache_modifier=".cg")
        if USE_SINKS:
            sink = tl.load(sinks_ptr + head, mask=ok, other=0.0).to(tl.float32)
        else:
            sink = tl.zeros([MERGE_ROWS], tl.float32)
        result = combine_segments(m, l_seg, acc, sink, USE_SINKS, 1)
        _store_rows(out_ptr, result, q_start, tok, head, ok, offs_dv, stride_ot, stride_oh,
                    stride_od, out_scale_ptr, HEAD_V, FP8_OUT, FP8_MAX)


@triton.constexpr_function
def _merge_rows(rows, per_row, limit):
    """Rows merged at once: as many as keep the loaded partials within ``limit``
    elements (a power of two, at least one, at most the tile's rows rounded up)."""
    fit = 1
    while fit * 2 * per_row <= limit and fit < rows:
        fit *= 2
    return fit

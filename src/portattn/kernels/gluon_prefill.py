"""Warp-specialized causal prefill over the paged cache, for Hopper (sm90), in Gluon.

Written with ``triton.experimental.gluon`` because Triton 3.6's automatic warp
specialization gave wrong results or hung on the H200 (benchmarks/NOTES.md, session 12).
Imports Gluon: only :mod:`portattn.kernels.gluon_launch` imports this module, when a plan
has chosen the kernel (:mod:`portattn.backends.gluon_rules`).

Layout
------
* ``q_desc``: a host descriptor over ``q`` seen as ``[num_tokens, num_q_heads * HEAD]``
  (q's head stride is ``HEAD``), box ``[64, HEAD]``: one box per consumer partition;
* ``k_desc`` / ``v_desc``: host descriptors over the caches seen as rows ``[num_blocks *
  BLOCK_SIZE, row_elems]`` (a cache row is one slot: its block stride is ``BLOCK_SIZE``
  slot strides), box ``[min(BLOCK_SIZE, BLOCK_N), HEAD]`` at column ``kv_head *
  stride_head``: key ``k`` of sequence ``b`` is slot ``k % BLOCK_SIZE`` of block
  ``block_table[b, k // BLOCK_SIZE]``. A K/V tile of ``BLOCK_N`` keys is ``BLOCK_N //
  BLOCK_SIZE`` boxes, each landing in its row slice of the tile's shared-memory buffer
  (blocks up to ``BLOCK_N`` slots: the paged cache itself, no staging copy), or the
  tile's slice of one block (larger blocks: the 128-slot blocks of a staged copy, which
  is how 8-bit caches reach this kernel, widened to q's dtype by
  :mod:`portattn.kernels.stage`);
* a head narrower than the tiles (``HEAD_SIZE`` < ``HEAD``: 96 or 80 in 128, 192 in
  256): the three descriptors are rank 3 instead, ``[num_tokens, num_q_heads,
  HEAD_SIZE]`` (q's head stride is ``HEAD_SIZE``) and ``[num_blocks * BLOCK_SIZE,
  num_kv_heads, HEAD_SIZE]``, with boxes ``[rows, 1, 64]`` at ``(row, head, 64 c)``: each
  box above is ``HEAD // 64`` boxes, one per 64 columns ``c`` of the tile, and TMA fills
  the columns past ``HEAD_SIZE`` with zeros (they add nothing to QK^T, and the output's
  are not stored), so a box never brings a neighbouring head's values;
* ``out`` through (token, head) strides, last dim contiguous; ``cu_seqlens_q``,
  ``seq_lens`` and ``block_table`` as the metadata gives them.

Grid and tiles
--------------
Grid ``((num_tokens // 128 + num_seqs) * num_q_heads,)``: program ``p`` takes q head ``p %
num_q_heads`` of global query tile ``T - 1 - p // num_q_heads`` (``T`` tiles in all; so
each sequence's last, heaviest tiles run first), found by binary search over
``cu_seqlens_q`` (:func:`portattn.kernels.common.find_seq_of_tile`, the unified kernel's
own, called from Gluon: sequence ``b`` owns tiles from ``cu_seqlens_q[b] // 128 + b``).
A tile is 128 queries of one q head; programs past their sequence's queries, and
sequences with fewer than ``min_q`` queries (served by another launch), return at once.
The grid covers every query of the batch whatever ``max_seqlen_q`` says.

``LONG_TILES`` (a launch that skips the sequences of fewer than ``min_q`` queries, and
may hold many: a mixed batch's decodes): grid ``(tiles * num_q_heads,)`` with ``tiles =
num_tokens // 128 + min(num_seqs, num_tokens // min_q)``, a bound on the query tiles of
the sequences with ``min_q`` queries or more; the tiles are numbered over those
sequences only (:func:`_long_tile`, a prefix sum over ``cu_seqlens_q``), the last
first, and programs past them return. The short sequences then cost no program each.

Partitions (``gl.warp_specialize``)
-----------------------------------
* load (1 warp, 24 registers): Q once, then for every visible key tile K and V into a
  ring of ``NUM_BUF`` buffers, each guarded by a ``ready`` mbarrier (the TMA copies
  landed) and an ``empty`` one (both consumers are done with it);
* two consumers (4 warps each: one warpgroup of 64 query rows; the default partition and
  a worker with ``CONSUMER_REGS`` registers): per key tile QK^T (``warpgroup_mma``), the
  online softmax in base 2 with the scale folded, PV with P from registers. The QK^T of
  tile j+1 is issued before the PV of tile j, and tile j+1's softmax runs while that PV
  is on the tensor cores (FA3's intra-warpgroup overlap). Tiles every row sees whole
  run without masks; only tiles from ``n_full`` on (the causal diagonal, the sequence
  end) and, with a window, below ``j_full_lo`` (its leading edge) are masked. Each
  consumer waits and arrives on its own, so one's softmax overlaps the other's matmuls.

Causality: query ``i`` of a sequence with ``q_len`` queries over ``k_len`` keys sees keys
``<= i + k_len - q_len`` (``CAUSAL``; else all ``k_len``), and with a sliding window
only keys ``> i + k_len - q_len - window``: the key tiles before the window of a tile's
first row are neither loaded nor computed. Scores as the unified kernel (DESIGN.md's
order: scale, softcap, mask, ALiBi bias; sinks start the softmax).

Bad metadata never reads out of bounds: block ids outside ``[0, num_blocks)`` read block
0 and table columns past ``bt_width`` read the last column, and every row that would see
such a key (or a key past the table's width) is written NaN: a scan of the table columns
the program reads (each consumer's own, while the load warp brings the first tiles) finds
the range from the first to the last bad key, and the rows whose visible keys meet that
range are NaN (exactly the rows that see a bad key, but for a window that falls wholly
between two bad blocks: those rows are NaN too). Blocks an engine freed before a window
do not matter: the scan starts at the program's first visible key, and the V rows of keys
before it that its first tile brings are zeroed. A TMA box brings a whole cache block, so
the slots past a sequence's last key (and the blocks read for bad ids) arrive with
whatever the cache holds there: the V rows of keys in the bad range or past the sequence
end are zeroed in shared memory before their PV (:func:`_zero_rows`: the last tile of a
sequence whose length is not a multiple of ``BLOCK_N``), as P = 0 times a NaN is NaN.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from portattn.kernels.common import (
    clamp_span,
    find_seq_of_tile,
    query_span,
    sink_logit2,
    small_argument_tanh,
)

#: query rows of one consumer partition (a program's tile is two: 128 rows,
#: ``gluon_launch.TILE_ROWS``)
CONSUMER_ROWS = 64


@gluon.constexpr_function
def _product(a, b):
    return a * b


@gluon.constexpr_function
def _box_rows(block_n, block_size):
    """Rows of one TMA box: a whole cache block, or a tile's slice of a larger block."""
    return min(block_n, block_size)


@gluon.constexpr_function
def _tile_layout(rows, head, dtype):
    """The shared-memory layout of a ``[rows, head]`` operand tile (the tensor cores'
    swizzled layout; a rank-2 descriptor's own)."""
    return gl.NVMMASharedLayout.get_default_for([rows, head], dtype)


@gluon.constexpr_function
def _boxes_per_row(padded, head, box_cols):
    """TMA boxes that fill a tile's ``head`` columns: 1, or with rank-3 descriptors one
    per ``box_cols`` (64: one 128-byte swizzle span) columns."""
    return head // box_cols if padded else 1


def _renamed(owner, new: str, old: str):
    """``owner.new`` where the installed Triton has it, else ``owner.old``: a Gluon builtin
    that releases renamed (the new name first: 3.9 keeps a stub under one old name that
    only raises). Builtins, so a kernel may read them as globals: Triton records no
    global for them, and a relaunch checks none."""
    return getattr(owner, new, None) or getattr(owner, old)


#: The TMA copy of a box into shared memory (3.8 has both names, 3.6 only the older;
#: same positional arguments).
tma_load = _renamed(tma, "async_load", "async_copy_global_to_shared")
#: A shared-memory view's reinterpretation (``view, dtype, shape, layout``; 3.9's name).
reinterpret = _renamed(gl.shared_memory_descriptor, "reinterpret", "_reinterpret")


@gluon.jit
def _column_spans(bufs, desc, SPANS: gl.constexpr):
    """Buffers ``bufs`` (``[n, rows, HEAD]``, the tiles' swizzled layout) seen as the boxes
    of rank-3 descriptor ``desc`` (``[rows, 1, 64]``): ``[n * SPANS, rows, 1, 64]``, span
    ``c`` of buffer ``b`` at ``b * SPANS + c``. The tile keeps each 64-column (128-byte)
    swizzle span's rows together, span after span, so a box lands in its span as it would
    in a tile of its own. The whole allocation is reinterpreted, then indexed: Triton 3.8
    refuses to reinterpret a subview (3.6 took a column slice of each buffer)."""
    n: gl.constexpr = bufs.type.shape[0]
    rows: gl.constexpr = bufs.type.shape[1]
    return reinterpret(bufs, bufs.dtype, [n * SPANS, rows, 1, desc.block_type.shape[2]],
                       desc.layout)


@gluon.jit
def _copy_box(desc, row, col, bar, dst, b, r0, SPANS: gl.constexpr, PADDED: gl.constexpr):
    """``desc``'s box at ``(row, col)`` into rows ``[r0, r0 + box rows)`` of buffer ``b``:
    ``dst`` holds the buffers themselves (``[n, rows, HEAD]``), or with ``PADDED`` (the
    descriptor is rank 3, ``col`` the head, boxes ``[rows, 1, 64]``) their column spans
    (:func:`_column_spans`): one box per span, ``SPANS`` per buffer."""
    rows: gl.constexpr = desc.block_type.shape[0]
    if PADDED:
        cols: gl.constexpr = desc.block_type.shape[2]
        for c in gl.static_range(SPANS):
            tma_load(desc, [row, col, c * cols], bar,
                     dst.index(b * SPANS + c).slice(r0, rows))
    else:
        tma_load(desc, [row, col], bar, dst.index(b).slice(r0, rows))


@gluon.jit
def _copy_tile(desc, bufs, idx, ready, empty, phase, j, kv_col, bt_row_ptr, bt_width,
               num_blocks, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr,
               SPANS: gl.constexpr, PADDED: gl.constexpr):
    """Key tile ``j`` of one cache into buffer ``idx`` of ``bufs`` (:func:`_copy_box`)
    once its ``empty`` barrier allows: a box per cache block (blocks of ``BLOCK_N`` slots
    or fewer) or the tile's slice of its block (larger blocks), all counted on ``ready``
    (bad ids read block 0, see the module doc)."""
    box: gl.constexpr = _box_rows(BLOCK_N, BLOCK_SIZE)
    per_tile: gl.constexpr = BLOCK_N // box
    # a fresh mbarrier counts as having completed the phase before 0
    mbarrier.wait(empty, phase ^ 1)
    mbarrier.expect(ready, _product(_product(per_tile, desc.block_type.nbytes), SPANS))
    for i in gl.static_range(per_tile):
        key = j * BLOCK_N + i * box
        block = gl.load(bt_row_ptr + gl.minimum(key // BLOCK_SIZE, bt_width - 1))
        block = gl.where((block >= 0) & (block < num_blocks), block, 0)
        _copy_box(desc, block * BLOCK_SIZE + key % BLOCK_SIZE, kv_col, ready, bufs, idx,
                  i * box, SPANS, PADDED)


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready,
                    k_empty, v_empty, q_row, q_col, kv_col, bt_row_ptr, bt_width, num_blocks,
                    j_lo, n_tiles, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                    SPANS: gl.constexpr, PADDED: gl.constexpr):
    """One warp: the two Q boxes, then K and V of key tiles ``[j_lo, n_tiles)``, a box per
    cache block, into the ring (bad ids read block 0: the consumers NaN the rows that see
    them). ``q_col`` / ``kv_col``: the heads' columns, or with ``PADDED`` the heads, whose
    buffers are given as their column spans (:func:`_column_spans`)."""
    num_buf: gl.constexpr = k_bufs.type.shape[0] // SPANS
    rows: gl.constexpr = q_desc.block_type.shape[0]
    mbarrier.expect(q_bar, _product(_product(2, q_desc.block_type.nbytes), SPANS))
    for i in gl.static_range(2):
        _copy_box(q_desc, q_row + i * rows, q_col, q_bar, q_bufs, i, 0, SPANS, PADDED)
    for j in range(j_lo, n_tiles):
        idx = (j - j_lo) % num_buf
        phase = ((j - j_lo) // num_buf) & 1
        _copy_tile(k_desc, k_bufs, idx, k_ready.index(idx), k_empty.index(idx), phase,
                   j, kv_col, bt_row_ptr, bt_width, num_blocks, BLOCK_N, BLOCK_SIZE, SPANS,
                   PADDED)
        _copy_tile(v_desc, v_bufs, idx, v_ready.index(idx), v_empty.index(idx), phase,
                   j, kv_col, bt_row_ptr, bt_width, num_blocks, BLOCK_N, BLOCK_SIZE, SPANS,
                   PADDED)


@gluon.jit
def _tanh(x, SERIES: gl.constexpr):
    """tanh through one exp2 and a fast (non-IEEE, 2-ulp) division, saturating to +-1
    for large |x|. With the IEEE division of the unified kernel's ``apply_softcap`` a
    softcapped 1 x 8192 prefill took 2562 us here, 1624 with this (H200,
    benchmarks/NOTES.md, session 14): the softmax is on the consumers' critical path.
    ``SERIES``: below |x| = 1/8, where the subtraction cancels, the odd series to x^7
    instead (``common.small_argument_tanh``, shared with the unified kernel; for large
    softcaps only: it costs a softcapped Gluon prefill 60-62% on an H100, NOTES.md
    session 40)."""
    e = gl.exp2(x * 2.8853900817779268)  # exp(2 x)
    t = 1.0 - gl.fdiv(gl.full_like(e, 2.0), e + 1.0)
    if SERIES:
        t = small_argument_tanh(x, t)
    return t


@gluon.jit
def _scores(s, mods, rows, cols, key0, off, k_len, MASK: gl.constexpr, CAUSAL: gl.constexpr,
            USE_WINDOW: gl.constexpr, USE_SOFTCAP: gl.constexpr, ALIBI: gl.constexpr):
    """Raw ``q.k`` products -> base-2 logits, in DESIGN.md's order (scale, softcap, mask,
    bias). ``mods`` = (``qk_scale``: the scale, times log2(e), or over the softcap with
    ``USE_SOFTCAP``; ``softcap``: the softcap times log2(e); ``slope2``: the head's ALiBi
    slope times log2(e); ``window``); ``ALIBI`` 1
    adds ``slope * (k - p)``, 2 subtracts ``slope * sqrt(p - k)`` (p: the query's key
    position). ``MASK``: keys past ``k_len``, after p (``CAUSAL``) or ``window`` or more
    before it (``USE_WINDOW``) get -inf."""
    qk_scale, softcap, slope2, window = mods
    s = s * qk_scale
    if USE_SOFTCAP:
        s = _tanh(s, USE_SOFTCAP == 2) * softcap
    keys = gl.expand_dims(key0 + cols, 0)
    if ALIBI == 1:
        s = s + slope2 * (keys - gl.expand_dims(rows + off, 1)).to(gl.float32)
    elif ALIBI == 2:
        dist = gl.maximum(gl.expand_dims(rows + off, 1) - keys, 0).to(gl.float32)
        s = s - slope2 * gl.sqrt(dist)
    if MASK:
        ok = keys < k_len
        if CAUSAL:
            ok = ok & (keys <= gl.expand_dims(rows + off, 1))
        if USE_WINDOW:
            ok = ok & (gl.expand_dims(rows + off, 1) - keys < window)
        s = gl.where(ok, s, float("-inf"))
    return s


@gluon.jit
def _softmax_step(s, m_i, l_i, mods, rows, cols, key0, off, k_len, MASK: gl.constexpr,
                  CAUSAL: gl.constexpr, USE_WINDOW: gl.constexpr, USE_SOFTCAP: gl.constexpr,
                  ALIBI: gl.constexpr):
    """One online-softmax step on a score tile (:func:`_scores`): P, the new row max and
    sum, and the factor that rescales the accumulator (base 2)."""
    s = _scores(s, mods, rows, cols, key0, off, k_len, MASK, CAUSAL, USE_WINDOW, USE_SOFTCAP,
                ALIBI)
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    # rows that see no key yet keep a max of -inf: shift by 0 there (their P is 0)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - gl.expand_dims(m_safe, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.constexpr_function
def _row_layout(rows, head, num_warps):
    """A blocked layout of a ``[rows, head]`` 16-bit tile: 16-byte vectors along head."""
    cols = min(32, head // 8)
    return gl.BlockedLayout([1, 8], [32 // cols, cols], [num_warps, 1], [1, 0])


@gluon.jit
def _needs_zeroing(key0, bad_lo, bad_hi, k_lo, k_len, BLOCK_N: gl.constexpr):
    """Whether the V tile of keys ``key0 + [0, BLOCK_N)`` holds keys of the bad range
    ``[bad_lo, bad_hi)``, before ``k_lo`` (the program's first visible key: the window's
    first tile) or past the sequence end (the same answer in both consumers)."""
    return (((key0 + BLOCK_N > bad_lo) & (key0 < bad_hi)) | (key0 + BLOCK_N > k_len)
            | (key0 < k_lo))


@gluon.jit
def _zero_rows(v_buf, fix_bar, uses, key0, bad_lo, bad_hi, k_lo, k_len,
               BLOCK_N: gl.constexpr, HEAD: gl.constexpr, num_warps: gl.constexpr):
    """Zero the rows of a V tile whose keys are in ``[bad_lo, bad_hi)`` (blocks read for
    bad ids), before ``k_lo`` (blocks before every row's window, which an engine may have
    freed) or at or past ``k_len`` (the sequence end): whatever the cache holds there
    (NaN included) would otherwise reach every row through P = 0 times V. Both consumers
    write the same values, then meet at ``fix_bar`` (count 2, used ``uses`` times before)
    before either reads the tile with the tensor cores. Returns the new use count."""
    CHUNK: gl.constexpr = 64  # columns at a time (few registers beside the accumulator)
    layout: gl.constexpr = _row_layout(BLOCK_N, CHUNK, num_warps)
    keys = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    keep = gl.expand_dims((keys < k_len) & (keys >= k_lo) & ((keys < bad_lo) | (keys >= bad_hi)),
                          1)
    for c in gl.static_range(HEAD // CHUNK):
        part = v_buf.slice(c * CHUNK, CHUNK, dim=1)
        v = part.load(layout)
        part.store(gl.where(keep, v, gl.zeros_like(v)))
    fence_async_shared()
    mbarrier.arrive(fix_bar, count=1)
    mbarrier.wait(fix_bar, uses & 1)
    return uses + 1


@gluon.jit
def _softmax_tile(s, m_i, l_i, mods, rows, cols, key0, off, k_len, masked,
                  CAUSAL: gl.constexpr, USE_WINDOW: gl.constexpr, USE_SOFTCAP: gl.constexpr,
                  ALIBI: gl.constexpr):
    """:func:`_softmax_step` with the masks only where ``masked`` (a runtime flag: the
    tile holds the causal diagonal, the window's leading edge or the sequence end)."""
    if masked:
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, mods, rows, cols, key0, off, k_len,
                                           True, CAUSAL, USE_WINDOW, USE_SOFTCAP, ALIBI)
    else:
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, mods, rows, cols, key0, off, k_len,
                                           False, CAUSAL, USE_WINDOW, USE_SOFTCAP, ALIBI)
    return p, m_i, l_i, alpha


@gluon.jit
def _bad_key_range(bt_row_ptr, bt_width, num_blocks, col_lo, n_cols,
                   BLOCK_SIZE: gl.constexpr, num_warps: gl.constexpr):
    """``[lo, hi)``: the keys from the first to the end of the last of the table columns
    ``[col_lo, n_cols)`` a tile reads whose block id is outside ``[0, num_blocks)`` or
    whose column is past ``bt_width`` (``lo`` 2**30 and ``hi`` 0: none)."""
    SCAN: gl.constexpr = 128
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    first = 1 << 30
    last = -1
    for c0 in range(col_lo, n_cols, SCAN):
        cols = c0 + gl.arange(0, SCAN, layout=layout)
        inside = cols < gl.minimum(n_cols, bt_width)
        ids = gl.load(bt_row_ptr + cols, mask=inside, other=0)
        bad = ((ids < 0) | (ids >= num_blocks)) & inside
        bad = bad | ((cols >= bt_width) & (cols < n_cols))
        first = gl.minimum(first, gl.min(gl.where(bad, cols, 1 << 30), axis=0))
        last = gl.maximum(last, gl.max(gl.where(bad, cols, -1), axis=0))
    return gl.where(first < (1 << 30), first * BLOCK_SIZE, 1 << 30), (last + 1) * BLOCK_SIZE


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _long_tiles_in(cu_seqlens_q_ptr, b, num_seqs, num_tokens, min_q):
    """Query tiles of 128 of each sequence ``b`` (a vector of sequence indices) with at
    least ``min_q`` queries (spans clamped as :func:`query_span` does), 0 for the others
    and past ``num_seqs``."""
    inside = b < num_seqs
    _, n = clamp_span(gl.load(cu_seqlens_q_ptr + b, mask=inside, other=0),
                      gl.load(cu_seqlens_q_ptr + b + 1, mask=inside, other=0), num_tokens)
    return gl.where(inside & (n >= min_q), (n + 127) // 128, 0)


@gluon.jit
def _long_tile(cu_seqlens_q_ptr, num_seqs, num_tokens, min_q, t_rev,
               num_warps: gl.constexpr):
    """``(seq, m0)`` of the ``t_rev``-th query tile from the last among the tiles of the
    sequences with at least ``min_q`` queries (in sequence order, each sequence's tiles in
    query order; ``seq`` -1 past the last): the grid of a launch that skips the short
    sequences has a program per such tile and none for the others (a mixed batch's
    decodes would otherwise each take a whole program slot of this kernel's shared
    memory to return). Two passes over ``cu_seqlens_q``, ``32 * num_warps`` sequences a
    load: the tile count, then the owner of tile ``count - 1 - t_rev`` (a prefix sum);
    the second pass's loads hit the lines the first brought."""
    SEARCH: gl.constexpr = 32 * num_warps
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    total = 0
    for c0 in range(0, num_seqs, SEARCH):
        b = c0 + gl.arange(0, SEARCH, layout=layout)
        total += gl.sum(_long_tiles_in(cu_seqlens_q_ptr, b, num_seqs, num_tokens, min_q),
                        axis=0)
    t = total - 1 - t_rev
    seq = -1
    m0 = 0
    before = 0  # long tiles of the earlier chunks
    for c0 in range(0, num_seqs, SEARCH):
        b = c0 + gl.arange(0, SEARCH, layout=layout)
        tiles = _long_tiles_in(cu_seqlens_q_ptr, b, num_seqs, num_tokens, min_q)
        first = gl.associative_scan(tiles, 0, _add) - tiles + before
        mine = (first <= t) & (t < first + tiles)
        seq = gl.maximum(seq, gl.max(gl.where(mine, b, -1), axis=0))
        m0 = gl.maximum(m0, gl.max(gl.where(mine, (t - first) * 128, 0), axis=0))
        before += gl.sum(tiles, axis=0)
    return seq, m0


@gluon.jit
def _program_bad_keys(bt_row_ptr, bt_width, num_blocks, k_lo, k_len, n_tiles,
                      BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                      num_warps: gl.constexpr):
    """``[bad_lo, bad_hi)`` of a program (:func:`_bad_key_range` over the table columns its
    key tiles read), widened to every key past the table's capacity when ``k_len`` exceeds
    it. Each consumer finds it on its own, before it first waits for the ring, so the scan
    runs while the load warp brings the first tiles (the same values in both consumers:
    they zero the same V tiles and meet at the fix barrier as often)."""
    capacity = bt_width * BLOCK_SIZE
    bad_lo, bad_hi = _bad_key_range(
        bt_row_ptr, bt_width, num_blocks, k_lo // BLOCK_SIZE,
        gl.cdiv(gl.minimum(n_tiles * BLOCK_N, k_len), BLOCK_SIZE), BLOCK_SIZE, num_warps)
    bad_lo = gl.where(k_len > capacity, gl.minimum(bad_lo, capacity), bad_lo)
    bad_hi = gl.where(k_len > capacity, gl.maximum(bad_hi, k_len), bad_hi)
    return bad_lo, bad_hi


@gluon.jit
def _pv_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, CAST: gl.constexpr):
    """P as the PV MMA's register operand (``dtype``, ``p_layout``) where ``CAST``, else
    ``p`` as it is (cast already, or to be cast where the MMA takes it)."""
    if CAST:
        operand = gl.convert_layout(p.to(dtype), p_layout)
    else:
        operand = p
    return operand


@gluon.jit
def _consumer_partition(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                        fix_bar, out_ptr, stride_ot, stride_oh, bt_row_ptr, bt_width,
                        num_blocks, q_start, q_len, head, row0, off, k_lo, k_len, j_lo,
                        j_full_lo, n_full, n_tiles,
                        qk_scale, softcap, slope2, window, sink2, out_mul,
                        ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD: gl.constexpr,
                        HEAD_SIZE: gl.constexpr, BLOCK_SIZE: gl.constexpr, CAUSAL: gl.constexpr,
                        USE_WINDOW: gl.constexpr, USE_SOFTCAP: gl.constexpr,
                        ALIBI: gl.constexpr, USE_SINKS: gl.constexpr, P_EARLY: gl.constexpr,
                        num_warps: gl.constexpr):
    """One warpgroup: ``ROWS`` query rows from ``row0`` over key tiles ``[j_lo,
    n_tiles)`` of the program (the ring's ``empty`` barriers count both consumers); tiles
    below ``j_full_lo`` (the window's leading edge) and from ``n_full`` on (the causal
    diagonal, the sequence end) are masked. ``[bad_lo, bad_hi)``: the keys from the first
    to the last bad one (a bad block id, a key past the table; ``bad_lo`` 2**30: none),
    found by each consumer from the table row at ``bt_row_ptr`` before its first wait on
    the ring (:func:`_program_bad_keys`: the same in both, so that they zero the same V
    tiles and meet at ``fix_bar`` the same number of times); rows whose visible keys meet
    that range are NaN.
    Scores as :func:`_scores` says; ``sink2``: the head's sink logit times log2(e)
    (``USE_SINKS``: it starts the row max with weight 1); ``out_mul`` scales the output
    (the V scale of a per-tensor cache). ``HEAD``: the tiles' width; the output's first
    ``HEAD_SIZE`` columns are stored."""
    num_buf: gl.constexpr = k_bufs.type.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_layout: gl.constexpr = gl.SliceLayout(0, o_layout)
    dtype: gl.constexpr = k_bufs.dtype

    rows = row0 + gl.arange(0, ROWS, layout=row_layout)
    cols = gl.arange(0, BLOCK_N, layout=col_layout)
    mods = (qk_scale, softcap, slope2, window)
    if USE_SINKS:
        m_i = gl.full([ROWS], sink2, gl.float32, layout=row_layout)
        l_i = gl.full([ROWS], 1.0, gl.float32, layout=row_layout)
    else:
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([ROWS, HEAD], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    uses = 0
    n_t = n_tiles - j_lo  # tiles read; ring slot t % num_buf holds tile j_lo + t
    bad_lo, bad_hi = _program_bad_keys(bt_row_ptr, bt_width, num_blocks, k_lo, k_len, n_tiles,
                                       BLOCK_N, BLOCK_SIZE, num_warps)
    mbarrier.wait(q_bar, 0)

    # the first tile: scores and probabilities before the loop
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, mods, rows, cols, j_lo * BLOCK_N, off,
                                       k_len, (j_lo < j_full_lo) | (j_lo >= n_full), CAUSAL,
                                       USE_WINDOW, USE_SOFTCAP, ALIBI)
    # P_EARLY: P crosses the loop already as PV's A operand in the tiles' dtype (q's): 32
    # registers a thread at 64 x 128, where fp32 P takes 64 beside the next QK^T's scores
    # and the accumulator (gluon_launch.casts_p_early says where each is taken)
    p = _pv_operand(p, dtype, p_layout, P_EARLY)
    for t in range(1, n_t):
        j = j_lo + t
        idx = t % num_buf
        prev = (t - 1) % num_buf
        mbarrier.wait(k_ready.index(idx), (t // num_buf) & 1)
        s = warpgroup_mma(q_smem, k_bufs.index(idx).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        mbarrier.wait(v_ready.index(prev), ((t - 1) // num_buf) & 1)
        if _needs_zeroing((j - 1) * BLOCK_N, bad_lo, bad_hi, k_lo, k_len, BLOCK_N):
            uses = _zero_rows(v_bufs.index(prev), fix_bar, uses, (j - 1) * BLOCK_N, bad_lo,
                              bad_hi, k_lo, k_len, BLOCK_N, HEAD, num_warps)
        acc = warpgroup_mma(_pv_operand(p, dtype, p_layout, not P_EARLY), v_bufs.index(prev),
                            acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        mbarrier.arrive(k_empty.index(idx), count=1)
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, mods, rows, cols, j * BLOCK_N, off,
                                           k_len, (j < j_full_lo) | (j >= n_full), CAUSAL,
                                           USE_WINDOW, USE_SOFTCAP, ALIBI)
        p = _pv_operand(p, dtype, p_layout, P_EARLY)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
    last = (n_t - 1) % num_buf
    mbarrier.wait(v_ready.index(last), ((n_t - 1) // num_buf) & 1)
    if _needs_zeroing((n_tiles - 1) * BLOCK_N, bad_lo, bad_hi, k_lo, k_len, BLOCK_N):
        uses = _zero_rows(v_bufs.index(last), fix_bar, uses, (n_tiles - 1) * BLOCK_N, bad_lo,
                          bad_hi, k_lo, k_len, BLOCK_N, HEAD, num_warps)
    acc = warpgroup_mma(_pv_operand(p, dtype, p_layout, not P_EARLY), v_bufs.index(last), acc,
                        is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last), count=1)

    orows = row0 + gl.arange(0, ROWS, layout=orow_layout)
    ocols = gl.arange(0, HEAD, layout=ocol_layout)
    # rows that saw no key (more queries than keys: bad metadata) are 0, as elsewhere
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)  # a NaN sum (a NaN sink) stays NaN
    o = acc * gl.expand_dims(gl.convert_layout(out_mul / l_safe, orow_layout), 1)
    # the keys each row sees: [lo, hi]
    if CAUSAL:
        hi = gl.minimum(orows + off, k_len - 1)
    else:
        hi = gl.full_like(orows, 0) + (k_len - 1)
    if USE_WINDOW:
        lo = orows + off - window + 1
    else:
        lo = gl.full_like(orows, 0)
    sees_bad = (lo < bad_hi) & (hi >= bad_lo) & (lo <= hi)
    o = gl.where(gl.expand_dims(sees_bad, 1), float("nan"), o)
    offs = gl.expand_dims((q_start + orows).to(gl.int64) * stride_ot, 1) + \
        head * stride_oh + gl.expand_dims(ocols, 0)
    if HEAD_SIZE == HEAD:
        keep = gl.expand_dims(orows < q_len, 1)
    else:
        keep = gl.expand_dims(orows < q_len, 1) & gl.expand_dims(ocols < HEAD_SIZE, 0)
    gl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=keep)


@gluon.jit(do_not_specialize=["num_tokens"])
def gluon_prefill_kernel(q_desc, k_desc, v_desc, out_ptr, stride_ot, stride_oh,
                         cu_seqlens_q_ptr, seq_lens_ptr, bt_ptr, bt_stride, bt_width,
                         num_blocks, num_seqs, num_tokens, num_tiles, min_q, scale, softcap,
                         window,
                         k_scale_ptr, v_scale_ptr, alibi_ptr, sinks_ptr,
                         NUM_Q_HEADS: gl.constexpr, GROUP: gl.constexpr,
                         KV_HEAD_STRIDE: gl.constexpr, BLOCK_N: gl.constexpr,
                         HEAD: gl.constexpr, HEAD_SIZE: gl.constexpr,
                         BLOCK_SIZE: gl.constexpr, NUM_BUF: gl.constexpr, CAUSAL: gl.constexpr,
                         USE_WINDOW: gl.constexpr, KV_SCALED: gl.constexpr,
                         USE_SOFTCAP: gl.constexpr, ALIBI: gl.constexpr,
                         USE_SINKS: gl.constexpr, LONG_TILES: gl.constexpr,
                         P_EARLY: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         num_warps: gl.constexpr):
    """Paged prefill, one (query tile, q head) per program; layout, grid and partitions
    in the module doc. Switches: ``NUM_BUF`` (K/V ring depth), ``CAUSAL``, ``USE_WINDOW``
    (query at key position p sees keys after ``p - window``; tiles wholly before the
    tile's first row's window are not read), ``KV_SCALED``
    (per-tensor K / V scales at ``k_scale_ptr`` / ``v_scale_ptr``, fp32 scalars: the K
    scale folds into the softmax scale, the V scale into the output), ``USE_SOFTCAP`` (0,
    1, or 2 with the exact small-argument tanh: ``heuristics.softcap_code``),
    ``ALIBI`` (0 none, 1 linear, 2 sqrt; slopes ``[num_q_heads]`` at ``alibi_ptr``),
    ``USE_SINKS`` (logits ``[num_q_heads]`` at ``sinks_ptr``), ``LONG_TILES`` (the
    grid numbers the tiles of the sequences with ``min_q`` queries or more only; else
    every sequence's, ``num_tiles`` of them), ``P_EARLY`` (the consumers cast P to PV's
    operand right after each softmax, else where the PV MMA takes it:
    ``gluon_launch.casts_p_early``); launched with
    ``num_warps=4`` (one consumer warpgroup; the other consumer and the load warp are
    worker partitions). ``KV_HEAD_STRIDE``: the caches' head stride in elements (the
    column of kv head ``h`` in the row view is ``h * KV_HEAD_STRIDE``). ``HEAD``: the
    tiles' width, a power of two; ``HEAD_SIZE``: q's, the caches' and the output's head
    size, ``HEAD`` or less (then the descriptors are rank 3, see the module doc)."""
    pid = gl.program_id(0)
    head = pid % NUM_Q_HEADS
    qk_scale = scale
    out_mul = 1.0
    if KV_SCALED:
        qk_scale = qk_scale * gl.load(k_scale_ptr)
        out_mul = gl.load(v_scale_ptr)
    if USE_SOFTCAP:  # softcap * tanh(scale * qk / softcap), then to base 2
        qk_scale = qk_scale / softcap
        softcap = softcap * 1.4426950408889634
    else:
        qk_scale = qk_scale * 1.4426950408889634
    slope2 = 0.0
    if ALIBI != 0:
        slope2 = gl.load(alibi_ptr + head).to(gl.float32) * 1.4426950408889634
    sink2 = 0.0
    if USE_SINKS:
        sink2 = sink_logit2(gl.load(sinks_ptr + head).to(gl.float32))
    if LONG_TILES:
        seq, m0 = _long_tile(cu_seqlens_q_ptr, num_seqs, num_tokens, min_q,
                             pid // NUM_Q_HEADS, num_warps)
        found = seq >= 0
        seq = gl.maximum(seq, 0)
        q_start, q_len = query_span(cu_seqlens_q_ptr, seq, num_tokens)
        q_len = gl.where(found, q_len, 0)
    else:
        tile = num_tiles - 1 - pid // NUM_Q_HEADS
        seq = find_seq_of_tile(cu_seqlens_q_ptr, num_seqs, tile, 128)
        q_start, q_len = query_span(cu_seqlens_q_ptr, seq, num_tokens)
        m0 = (tile - (q_start // 128 + seq)) * 128  # < 0 only for bad metadata
    if (m0 < q_len) & (q_len >= min_q) & (m0 >= 0):
        k_len = gl.load(seq_lens_ptr + seq)
        off = k_len - q_len
        if CAUSAL:
            visible = gl.minimum(k_len, gl.minimum(m0 + 128, q_len) + off)
            n_full = gl.minimum((m0 + off + 1) // BLOCK_N, k_len // BLOCK_N)
        else:
            visible = k_len
            n_full = k_len // BLOCK_N
        # never past what the table can hold (a garbage seq_lens must not loop for long):
        # the rows that would see keys beyond it are NaN through the bad range
        capacity = bt_width * BLOCK_SIZE
        n_tiles = gl.maximum(gl.cdiv(gl.minimum(visible, capacity), BLOCK_N), 1)
        n_full = gl.maximum(n_full, 0)
        if USE_WINDOW:  # tiles before the first row's window are skipped, and tiles
            # before the last row's are masked (the window's leading edge)
            k_lo = gl.maximum(m0 + off - window + 1, 0)
            j_lo = gl.minimum(k_lo // BLOCK_N, n_tiles - 1)
            last_row = gl.minimum(m0 + 128, q_len) - 1
            j_full_lo = gl.cdiv(gl.maximum(last_row + off - window + 1, 0), BLOCK_N)
        else:
            k_lo = n_tiles * 0
            j_lo = n_tiles * 0
            j_full_lo = n_tiles * 0
        bt_row_ptr = bt_ptr + seq.to(gl.int64) * bt_stride

        PADDED: gl.constexpr = HEAD_SIZE != HEAD
        q_rows: gl.constexpr = q_desc.block_type.shape[0]
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2, q_rows, HEAD],
                                           _tile_layout(q_rows, HEAD, q_desc.dtype))
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_BUF, BLOCK_N, HEAD],
                                           _tile_layout(BLOCK_N, HEAD, k_desc.dtype))
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, BLOCK_N, HEAD],
                                           _tile_layout(BLOCK_N, HEAD, v_desc.dtype))
        # TMA boxes per tile row: 1, or with rank-3 descriptors one per 64 columns (q's and
        # the caches' boxes alike: gluon_launch.PADDED_BOX_COLS)
        SPANS: gl.constexpr = _boxes_per_row(PADDED, HEAD, q_desc.block_type.shape[-1])
        if PADDED:  # rank-3 descriptors: the heads themselves, boxes into column spans
            q_col = head
            kv_col = head // GROUP
            q_dst = _column_spans(q_bufs, q_desc, SPANS)
            k_dst = _column_spans(k_bufs, k_desc, SPANS)
            v_dst = _column_spans(v_bufs, v_desc, SPANS)
        else:  # the heads' first columns in the row views
            q_col = head * HEAD
            kv_col = (head // GROUP) * KV_HEAD_STRIDE
            q_dst = q_bufs
            k_dst = k_bufs
            v_dst = v_bufs
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        fix_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(fix_bar, count=2)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()
        # (the arguments are written out in the call: a tuple assigned to a local first
        # turns its constexprs into tensors)
        gl.warp_specialize([
            (_consumer_partition, (q_bufs.index(0), k_bufs, v_bufs, q_bar, k_ready, v_ready,
                                   k_empty, v_empty, fix_bar, out_ptr, stride_ot, stride_oh,
                                   bt_row_ptr, bt_width, num_blocks, q_start, q_len, head, m0,
                                   off, k_lo, k_len, j_lo, j_full_lo, n_full, n_tiles, qk_scale,
                                   softcap, slope2, window, sink2, out_mul, 64, BLOCK_N, HEAD,
                                   HEAD_SIZE, BLOCK_SIZE, CAUSAL,
                                   USE_WINDOW, USE_SOFTCAP, ALIBI, USE_SINKS, P_EARLY, num_warps)),
            (_consumer_partition, (q_bufs.index(1), k_bufs, v_bufs, q_bar, k_ready, v_ready,
                                   k_empty, v_empty, fix_bar, out_ptr, stride_ot, stride_oh,
                                   bt_row_ptr, bt_width, num_blocks, q_start, q_len, head,
                                   m0 + 64, off, k_lo, k_len, j_lo, j_full_lo, n_full, n_tiles,
                                   qk_scale, softcap, slope2, window, sink2, out_mul, 64,
                                   BLOCK_N, HEAD, HEAD_SIZE, BLOCK_SIZE, CAUSAL,
                                   USE_WINDOW, USE_SOFTCAP, ALIBI, USE_SINKS, P_EARLY, num_warps)),
            (_load_partition, (q_desc, k_desc, v_desc, q_dst, k_dst, v_dst, q_bar, k_ready,
                               v_ready, k_empty, v_empty, q_start + m0, q_col, kv_col,
                               bt_row_ptr, bt_width, num_blocks, j_lo, n_tiles, BLOCK_N,
                               BLOCK_SIZE, SPANS, PADDED)),
        ], [num_warps, 1], [CONSUMER_REGS, 24])  # (a literal: a global would send every
        # launch through the JIT's per-launch global check, fast_launch refuses those)

"""Launch heuristics of the unified kernel: pure Python, no Triton, no torch.

Every choice is a function of the problem's shape (bucketed sizes) and of the device
(SM count, architecture for the shared-memory budget); nothing is a constant tuned for one
GPU. The numbers behind the defaults (tile sizes, warps, stages, segment targets) come from
the sweeps recorded in ``benchmarks/NOTES.md``.

Modes (the ``SEQ_MODE`` of the kernel, see :mod:`portattn.kernels.unified`):

* ``decode``: every sequence's queries fit one tile of ``BLOCK_M`` rows (queries x the
  GQA group): decode, spec-decode, short chunks. One program per (sequence, kv head)
  (per group of kv heads where :func:`decode_tile_heads` says so), split into segments
  over the keys (3D) when that would not fill the GPU. The segment
  count is decided for the bucket's largest batch, plus a rule for the smaller batches
  of the bucket that fit more (:func:`batch_segments`, resolved per launch by
  :func:`segments_for`). Tiles: 128 keys in general; 8-bit caches on sm90 read V as
  pairs (:func:`reads_v_pairs`); 16-bit decodes on sm90 whose programs are a quarter to
  a half of the SMs take a narrow split tile (:func:`narrow_decode`);
* ``prefill``: one sequence (bucketed batch of 1) with many queries: 128-row tiles
  (64 for wide heads) over the queries, found by binary search;
* ``mixed``: several sequences, some with many queries: a ``decode`` launch serves the
  sequences with at most ``short_q`` queries and a ``prefill`` launch the others, both
  decided on the device from ``cu_seqlens_q`` (no host sync), so the decodes of a mixed
  batch keep decode tiles and the chunk keeps tensor-core tiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

#: Programs wanted in flight per SM before splitting a decode over the keys.
WAVES_BEFORE_SPLIT = 2
#: A segment covers at least this many KV tiles (fewer: the merge costs more than it saves).
MIN_TILES_PER_SEGMENT = 2
MAX_SEGMENTS = 64
#: Split decode launches merge their partials in the attention kernel (the last segment
#: program of each (sequence, kv head); one launch) instead of in a second, merge kernel
#: (launch.merges_in_kernel; NOTES.md, session 11).
MERGE_IN_KERNEL = True
#: Largest row count (queries x group) that still runs as one decode tile.
MAX_DECODE_ROWS = 64
#: 8-bit decode with V read as int16 pairs (the kernel's V_PAIRS, sm90): registers per
#: thread of the 128-key, 4-warp tile (168 uncapped: 3 programs per SM; 128: 4), and the
#: programs per SM that fit with the cap.
PAIRED_DECODE_MAXNREG = 128
PAIRED_DECODE_PROGRAMS_PER_SM = 4
#: The paired 8-bit decode tile over several kv heads (:func:`decode_tile_heads`): the
#: GQA groups it serves, each with ``MULTI_HEAD_DECODE_ROWS // group`` heads per program,
#: where the per-head programs (sequence, kv head) fill the SMs at least once. A slot's
#: heads lie side by side in the cache, so such a tile reads runs of heads x 128 bytes
#: (fp8, head 128) where a per-head tile reads 128-byte rows, which read 4.5-5% slower
#: than whole blocks (H100, NOTES.md session 32). H100, eager do_bench, three alternating
#: pairs, 4 heads against 1 at GQA 4 (8 kv heads): fp8 per-tensor 32 x 8192 205.4-205.9
#: us against 208.7-209.5, 128 x 8192 734-736 against 775-777; int8 / fp8 per-token-head
#: 32 x 8192 211-212 / 210-212 against 220-222 / 220-221, int8 128 x 8192 768-770
#: against 881-884; e5m2 32 / 128 x 8192 202-203 / 736-738 against 209 / 775. 2 heads at
#: GQA 8 (64 / 8 heads): fp8 32 / 128 x 8192 198.8 / 730.7 against 209.0 / 776.6, int8
#: per-token-head 209.2 against 219.5. Lost where the per-head programs are fewer than
#: the SMs: fp8 8 x 8192 (64 programs) 73.0-73.7 against 66.7-66.8 (32 segments, whose
#: merge of 16 rows each costs more than the reads save) (NOTES.md session 33).
MULTI_HEAD_DECODE_GROUPS: tuple[int, ...] = (4, 8)
MULTI_HEAD_DECODE_ROWS = 16
#: 16-bit decode whose unsplit grid fills a quarter to a half of the SMs (batch 5-8 at 8 kv
#: heads on 132 SMs): narrow tiles (keys, warps) split to about this many programs per SM
#: instead of 128-key 4-warp tiles at 2 (:func:`narrow_decode`). bf16, 32 / 8 heads,
#: kernel-only: H200 sweep 8 x 8192 75.8 us against 77.7, 8 x 32768 255.6 against 259.7;
#: H100, three alternating pairs, 8 x 8192 101.9-102.6 against 102.6-104.1, 8 x 32768
#: 367.2-367.9 against 368.9-369.4, 8 x 1024 20.3-20.8 against 20.6-21.2 (NOTES.md s31).
SPLIT_NARROW_DECODE = True
NARROW_DECODE_BLOCK_N = 64
NARROW_DECODE_WARPS = 2
NARROW_DECODE_PROGRAMS_PER_SM = 4


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def head_pad(head_size: int) -> int:
    """The power-of-two tile width holding ``head_size`` (at least 16)."""
    return max(16, next_pow2(head_size))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def shared_memory_budget(arch: str) -> int:
    """Usable shared memory per block (bytes), by architecture; conservative default."""
    if arch in ("sm90", "sm100", "sm103"):
        return 227 * 1024
    if arch in ("sm80", "sm87"):
        return 163 * 1024
    if arch.startswith("gfx9"):
        return 64 * 1024
    return 99 * 1024  # sm86, sm89, sm120, unknown


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_q: int
    block_n: int
    num_warps: int
    num_stages: int
    segments: int = 1
    maxnreg: int | None = None   # Triton's register cap per thread (None: the compiler's)
    #: smaller batches that take more segments: ((largest num_seqs, segments), ...),
    #: ascending (:func:`batch_segments`); empty: ``segments`` for every batch
    segments_upto: tuple = ()
    #: kv heads one decode program serves (the kernel's ``TILE_HEADS``): a KV tile of
    #: ``block_n`` columns is ``block_n // tile_heads`` keys x that many heads, its rows
    #: their query heads (:func:`decode_tile_heads`)
    tile_heads: int = 1

    def smem_bytes(self, head_pad: int, elem_bytes: int, head_pad_v: int | None = None) -> int:
        """Shared memory of the pipelined K and V tiles plus the query tile (``head_pad``
        is the K/Q width, ``head_pad_v`` the V width, equal unless DiffKV)."""
        head_pad_v = head_pad if head_pad_v is None else head_pad_v
        kv = self.block_n * (head_pad + head_pad_v) * elem_bytes * max(1, self.num_stages)
        return kv + self.block_m * head_pad * elem_bytes

    def as_dict(self) -> dict:
        """The fields as a dict; ``maxnreg``, ``segments_upto`` and ``tile_heads`` only
        where set."""
        out = asdict(self)
        if out["maxnreg"] is None:
            del out["maxnreg"]
        if not out["segments_upto"]:
            del out["segments_upto"]
        if out["tile_heads"] == 1:
            del out["tile_heads"]
        return out


@dataclass(frozen=True)
class Shape:
    """What the heuristics look at (a :class:`Problem` reduced to numbers)."""

    num_q_heads: int
    num_kv_heads: int
    head_size: int           # of q and K
    elem_bytes: int          # of the KV cache's storage dtype
    max_seqlen_q: int
    max_seqlen_k: int
    num_seqs: int
    sm_count: int
    arch: str
    head_size_v: int | None = None  # of V (None: same as head_size)
    kv_quant: str = "none"  # the cache's quantization mode (KVQuant.mode)

    @property
    def scales_per_token(self) -> bool:
        """An 8-bit cache with per-(slot, kv head) scales."""
        return scales_per_token_head(self.kv_quant)

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def head_pad(self) -> int:
        return head_pad(self.head_size)

    @property
    def head_pad_v(self) -> int:
        return head_pad(self.head_size if self.head_size_v is None else self.head_size_v)

    @property
    def widest_pad(self) -> int:
        """The wider of the K and V tile widths: what registers and shared memory scale
        with (DiffKV 192/128 is sized like head 256)."""
        return max(self.head_pad, self.head_pad_v)

    @classmethod
    def from_problem(cls, problem, sm_count: int, arch: str) -> "Shape":
        import torch  # the dtype size only

        elem = torch.empty((), dtype=problem.kv_dtype).element_size()
        return cls(problem.num_q_heads, problem.num_kv_heads, problem.head_size_qk, elem,
                   max(1, problem.max_seqlen_q), max(1, problem.max_seqlen_k),
                   max(1, problem.num_seqs), max(1, int(sm_count or 1)), arch or "",
                   problem.head_size_v, quant_mode(problem.kv_quant))


#: Softcaps above this take the kernels' exact small-argument tanh (``USE_SOFTCAP`` 2).
#: Below it the fast tanh's score error (about softcap * 2e-7: 1.3e-5 at 64) is within
#: fp32's tolerance; above it grows with the softcap (0.1 at 1e6). The exact form slows a
#: softcapped prefill 24-62% on an H100 (NOTES.md, session 40), so the common softcaps
#: (30, 50) keep the fast one.
EXACT_TANH_SOFTCAP = 64.0


def softcap_code(softcap: float | None) -> int:
    """The kernels' ``USE_SOFTCAP``: 0 without softcap, 1 with it, 2 with it and the exact
    small-argument tanh (softcaps above :data:`EXACT_TANH_SOFTCAP`)."""
    if softcap is None:
        return 0
    return 2 if softcap > EXACT_TANH_SOFTCAP else 1


def quant_mode(kv_quant_key: str) -> str:
    """The mode of a ``KVQuant.key`` (``"fp8_per_tensor:e5m2"`` -> ``"fp8_per_tensor"``)."""
    return kv_quant_key.split(":")[0]


def scales_per_token_head(kv_quant_key: str) -> bool:
    """Whether a ``KVQuant.key`` names a mode with per-(slot, kv head) scales."""
    return kv_quant_key.split(":")[0] in ("int8_per_token_head", "fp8_per_token_head")


def _fit_smem(cfg: TileConfig, shape: Shape, min_block_n: int = 16) -> TileConfig:
    """Shrink until the tiles fit the shared-memory budget: drop stages to 2, halve
    BLOCK_N down to ``min_block_n``, halve BLOCK_M down to the smallest tile that holds a
    whole GQA group (keeping BLOCK_Q = BLOCK_M / group), then a single stage."""
    budget = shared_memory_budget(shape.arch)
    min_block_m = max(16, next_pow2(shape.group))
    replace = dataclasses.replace
    while cfg.smem_bytes(shape.head_pad, shape.elem_bytes, shape.head_pad_v) > budget:
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_n > min_block_n:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        elif cfg.block_m > min_block_m and cfg.block_m // 2 >= shape.group:
            cfg = replace(cfg, block_m=cfg.block_m // 2,
                          block_q=max(1, cfg.block_m // 2 // shape.group))
        elif cfg.num_stages > 1:
            cfg = replace(cfg, num_stages=1)
        else:
            break
    return cfg


def decode_rows(shape: Shape, max_q: int) -> int:
    return max(16, next_pow2(max_q * shape.group))


def uses_decode_tiles(shape: Shape) -> bool:
    """Whether every sequence's queries fit one tile (decode / spec-decode)."""
    return shape.max_seqlen_q == 1 or decode_rows(shape, shape.max_seqlen_q) <= MAX_DECODE_ROWS


def decode_segments(shape: Shape, block_n: int, programs: int) -> int:
    """Split-KV segments. No split once the (sequence, kv head) programs fill one wave of
    SMs (splitting then only adds the merge: H100 sweep, 32 x 8192); below that, about
    WAVES_BEFORE_SPLIT programs per SM, as far as the keys give each segment
    MIN_TILES_PER_SEGMENT tiles. A power of two (the merge kernel's arange)."""
    if programs >= shape.sm_count:
        return 1
    tiles = cdiv(shape.max_seqlen_k, block_n)
    by_length = max(1, tiles // MIN_TILES_PER_SEGMENT)
    wanted = max(1, WAVES_BEFORE_SPLIT * shape.sm_count // programs)
    segments = min(wanted, by_length, MAX_SEGMENTS)
    return 1 << (max(1, segments).bit_length() - 1)  # a power of two, not above


def reads_v_pairs(shape: Shape, block_m: int) -> bool:
    """Whether a decode tile of ``block_m`` rows reads this 8-bit cache's V as int16 pairs
    of codes (the kernel's V_PAIRS) with the paired tile: where it was measured (sm90, K
    and V tiles 128 wide, one tile row per query head of a GQA group up to 16). Other
    heads (DiffKV, 64-wide tiles) are served correctly with it (GPU tests) but were not
    timed, so they keep the byte-wise V path."""
    return shape.arch == "sm90" and shape.elem_bytes == 1 and block_m <= 16 and \
        shape.head_pad == 128 and shape.head_pad_v == 128


def paired_decode_segments(shape: Shape, programs: int, tile_keys: int = 128) -> int:
    """Split-KV segments of the paired 8-bit decode tile: the largest power of two that
    keeps every program resident at once (PAIRED_DECODE_PROGRAMS_PER_SM per SM), each
    segment MIN_TILES_PER_SEGMENT tiles (of ``tile_keys`` keys) or more. H200, fp8
    per-tensor 32 x 8192 (256 programs): 2 segments 150.3 us, 1 166.1, 4 152.8; 128 x 8192
    (1024): 1 segment 538.4, 2 559.1 (NOTES.md). ``programs``: (sequence, head group)
    pairs, a group being the tile's ``tile_heads`` kv heads."""
    fit = max(1, PAIRED_DECODE_PROGRAMS_PER_SM * shape.sm_count // programs)
    by_length = max(1, cdiv(shape.max_seqlen_k, tile_keys) // MIN_TILES_PER_SEGMENT)
    segments = min(fit, by_length, MAX_SEGMENTS)
    return 1 << (segments.bit_length() - 1)


def decode_tile_heads(shape: Shape, max_q: int, num_seqs: int) -> int:
    """How many kv heads one program of the paired 8-bit decode tile serves: ``16 //
    group`` for one query per sequence of a GQA group in
    :data:`MULTI_HEAD_DECODE_GROUPS` (16 rows: the paired tile's), where the kv heads
    split into whole groups of that many and the (sequence, kv head) pairs of
    ``num_seqs`` sequences (a plan's: its bucket's largest batch, whose smaller batches
    keep the tile) are at least the SMs; else 1 (a program per kv head). Asked of the
    paired tile only (:func:`decode_config`'s V-pairs branch)."""
    if max_q != 1 or shape.group not in MULTI_HEAD_DECODE_GROUPS or \
            num_seqs * shape.num_kv_heads < shape.sm_count:
        return 1
    heads = MULTI_HEAD_DECODE_ROWS // shape.group
    if heads < 2 or heads * shape.group != MULTI_HEAD_DECODE_ROWS or \
            shape.num_kv_heads % heads:
        return 1
    return heads


def narrow_decode(shape: Shape, max_q: int, programs: int) -> bool:
    """Whether a decode of ``programs`` (sequence, kv head) pairs takes the narrow split
    tile (:data:`NARROW_DECODE_BLOCK_N` keys, :data:`NARROW_DECODE_WARPS` warps, about
    :data:`NARROW_DECODE_PROGRAMS_PER_SM` programs per SM), in the regime it was measured
    in only: sm90, a 16-bit cache, one query per sequence (``max_q``) of a GQA group up to
    16 (one 16-row tile), K and V tiles 128 wide, the programs a quarter to a half of the
    SMs, and keys enough for more than one segment. Elsewhere the 128-key tile."""
    return SPLIT_NARROW_DECODE and shape.arch == "sm90" and shape.elem_bytes == 2 and \
        max_q == 1 and shape.group <= 16 and shape.head_pad == 128 and \
        shape.head_pad_v == 128 and 4 * programs >= shape.sm_count and \
        2 * programs <= shape.sm_count and narrow_decode_segments(shape, programs) > 1


def narrow_decode_segments(shape: Shape, programs: int) -> int:
    """Split-KV segments of the narrow decode tile: the largest power of two that keeps
    about :data:`NARROW_DECODE_PROGRAMS_PER_SM` programs per SM, each segment
    MIN_TILES_PER_SEGMENT tiles or more."""
    fit = max(1, NARROW_DECODE_PROGRAMS_PER_SM * shape.sm_count // programs)
    by_length = max(1, cdiv(shape.max_seqlen_k, NARROW_DECODE_BLOCK_N) // MIN_TILES_PER_SEGMENT)
    segments = min(fit, by_length, MAX_SEGMENTS)
    return 1 << (segments.bit_length() - 1)


def tile_segments(shape: Shape, cfg: TileConfig, v_pairs: bool, programs: int) -> int:
    """The split-KV segments of ``programs`` (sequence, kv head) pairs launched with the
    decode tile ``cfg`` planned for ``shape`` (its bucket's largest batch): by the rule of
    that tile (paired 8-bit, narrow, or the others'). The narrow tile is known by its
    keys and warps at 16 bits (no other 16-bit decode tile has 2 warps)."""
    if v_pairs:
        return paired_decode_segments(shape, programs // cfg.tile_heads,
                                      cfg.block_n // cfg.tile_heads)
    if shape.elem_bytes == 2 and \
            (cfg.block_n, cfg.num_warps) == (NARROW_DECODE_BLOCK_N, NARROW_DECODE_WARPS):
        return narrow_decode_segments(shape, programs)
    return decode_segments(shape, cfg.block_n, programs)


def batch_segments(shape: Shape, cfg: TileConfig, v_pairs: bool) -> tuple:
    """The split-KV segments of the smaller batches that share ``cfg``'s plan.

    A plan serves a bucket of batch sizes (``dispatch.problem.bucket``: ``num_seqs // 2 +
    1`` to ``num_seqs`` sequences) and is decided for its largest, while the segment rules
    count programs: a batch below the top can fit more segments in one wave. H200, fp8
    per-tensor, 8 kv heads: 33 x 8192 ran the 64-sequence plan's 1 segment in 162-163 us
    against 145 with the 2 its own count fits (NOTES.md, session 21). Returns ``((largest
    num_seqs, segments), ...)`` ascending, only where the count differs from ``cfg``'s
    (every tile's rule gives fewer segments to larger batches, so the scan stops at the
    first batch that takes ``cfg.segments``)."""
    rule: list[tuple[int, int]] = []
    for num_seqs in range(shape.num_seqs // 2 + 1, shape.num_seqs):
        segments = tile_segments(shape, cfg, v_pairs, num_seqs * shape.num_kv_heads)
        if segments <= cfg.segments:
            break
        if rule and rule[-1][1] == segments:
            rule[-1] = (num_seqs, segments)
        else:
            rule.append((num_seqs, segments))
    return tuple(rule)


def segments_for(cfg: dict, num_seqs: int) -> int:
    """The split-KV segments of a launch of decode tiles ``cfg`` over ``num_seqs``
    sequences: the first ``segments_upto`` entry that covers the batch, else
    ``segments``."""
    for largest, segments in cfg.get("segments_upto", ()):
        if num_seqs <= largest:
            return segments
    return cfg["segments"]


def decode_config(shape: Shape, max_q: int, num_seqs: int,
                  segments: int | None = None, v_pairs: bool = False,
                  split_narrow: bool = False) -> TileConfig:
    """Decode tiles; ``v_pairs``: the launch reads V as pairs (:func:`reads_v_pairs`);
    ``split_narrow``: a decode launch (not a mixed batch's) may take the narrow split
    tile (:func:`narrow_decode`)."""
    block_m = decode_rows(shape, max_q)
    block_q = block_m // shape.group
    if v_pairs:
        # V as int16 pairs, 128 keys, 4 warps, registers capped to 128 so 4 programs fit
        # an SM; H200 fp8 per-tensor 32 / 128 x 8192: 150.3 / 538.4 us against 188.8 /
        # 674.0 with byte-wise V and 64-key tiles at 128 (NOTES.md). 128 columns of
        # several kv heads where decode_tile_heads says so.
        heads = decode_tile_heads(shape, max_q, num_seqs)
        if segments is None:
            segments = paired_decode_segments(shape, num_seqs * shape.num_kv_heads // heads,
                                              128 // heads)
        return TileConfig(block_m, block_m // (shape.group * heads), 128, 4, 2, segments,
                          maxnreg=PAIRED_DECODE_MAXNREG, tile_heads=heads)
    programs = num_seqs * shape.num_kv_heads
    if split_narrow and narrow_decode(shape, max_q, programs) and \
            (segments is None or segments > 1):  # forced unsplit: the 128-key tile
        if segments is None:
            segments = narrow_decode_segments(shape, programs)
        return TileConfig(block_m, block_q, NARROW_DECODE_BLOCK_N, NARROW_DECODE_WARPS, 2,
                          segments)
    # Decode is bandwidth-bound: big KV tiles (32 KB of K per stage at head 128) keep
    # enough bytes in flight per SM; 128 keys beat 32/64 at every batch on the H100 sweep
    # of the first kernel (the narrow split regime above excepted, session 31).
    # Up to 384 K+V columns (DiffKV 192/128 pads to 256 + 128): 128 keys too, H200 sweep
    # 8 x 8192 DiffKV: 92.8 us against 106.6 with 64 (NOTES.md); wider rows take 64.
    block_n = 128 if shape.head_pad + shape.head_pad_v <= 384 else 64
    if shape.elem_bytes == 4:
        block_n //= 2
    warps = 4 if block_m <= 32 else 8
    if shape.elem_bytes == 1 and block_m <= 16 and \
            num_seqs * shape.num_kv_heads >= 6 * shape.sm_count:
        # 8-bit caches, many programs per SM: 64-key tiles and 2 warps. H200 128 x 8192
        # (7.8 waves): fp8 per-tensor 681-690 us against 728-741, int8 per-token-head 738
        # against 840, fp8 per-token-head 701 against 783; at 32 x 8192 (1.9 waves) they
        # lose (fp8 278 against 189) (NOTES.md)
        block_n, warps = 64, 2
    # 2 stages: on the H200 the kernel with quantized-KV switches ran 32 x 8192 bf16 at
    # 340 us with 3 stages and 257 us with 2 (= the previous kernel's 256; NOTES.md 9)
    cfg = _fit_smem(TileConfig(block_m, block_q, block_n, warps, 2), shape)
    if segments is None:
        segments = decode_segments(shape, cfg.block_n, num_seqs * shape.num_kv_heads)
    return TileConfig(cfg.block_m, cfg.block_q, cfg.block_n, cfg.num_warps, cfg.num_stages,
                      segments)


def prefill_config(shape: Shape) -> TileConfig:
    # Tensor-core tiles: 128 rows for heads up to 128, 64 for wider ones (registers).
    # 128 x 128 with 8 warps and 3 stages was best or within 1% on the H100 prefill sweep;
    # smaller shared memory drops stages, then BLOCK_N (_fit_smem).
    if shape.widest_pad <= 128 and shape.elem_bytes <= 2:
        block_m, block_n, warps = 128, 128, 8
    elif shape.head_pad > 128 and shape.head_pad_v <= 128 and shape.elem_bytes <= 2 and \
            shared_memory_budget(shape.arch) > 200 * 1024:
        # DiffKV with wide keys (192/128): 256 x 64, 8 warps, 2 stages ran 2.49 ms on the
        # H200 sweep against 6.25 ms with the 64 x 64 tiles wide heads get (NOTES.md)
        return _fit_smem(TileConfig(max(256, next_pow2(shape.group)),
                                    max(256, next_pow2(shape.group)) // shape.group, 64, 8,
                                    2), shape)
    else:
        block_m, block_n, warps = 64, 32 if shape.elem_bytes == 4 else 64, 4
    block_m = max(block_m, next_pow2(shape.group))
    stages = 3 if shared_memory_budget(shape.arch) > 160 * 1024 else 2
    return _fit_smem(TileConfig(block_m, block_m // shape.group, block_n, warps, stages),
                     shape)


def plan_launch(shape: Shape, *, mode: str | None = None, segments: int | None = None,
                short: TileConfig | None = None, long: TileConfig | None = None,
                fp8_dot: bool = False) -> dict:
    """The launch parameters: ``mode`` plus ``short`` (decode tiles, with ``segments``)
    and/or ``long`` (prefill tiles) configs as dicts, ``fp8_dot`` (QK^T on fp8 tensor
    cores, decided by the backend from the dtypes and the device) and ``kv_bits`` (the
    kernel's ``KV_BITS``: int8 codes rebuilt with integer operations, set for decode over
    int8 per-token-head caches on sm90; the backend sets it for fp8 caches on GPUs
    without the format), ``v_pairs`` (the kernel's ``V_PAIRS``: 8-bit V read as int16
    pairs of codes, :func:`reads_v_pairs`). ``v_stage`` (the kernel's ``V_STAGE``) is never
    set here: a measured switch that lost (NOTES.md). Every keyword overrides one automatic choice
    (tests force 2D/3D, the sweep forces tiles)."""
    if segments is not None and (segments < 1 or segments & (segments - 1)):
        raise ValueError(f"segments must be a power of two >= 1 (the merge kernel tiles "
                         f"over them), got {segments}")
    if mode is None:
        if uses_decode_tiles(shape):
            mode = "decode"
        else:
            mode = "prefill" if shape.num_seqs == 1 else "mixed"
    params: dict = {"mode": mode}
    if fp8_dot:
        params["fp8_dot"] = True
    if mode == "decode":
        v_pairs = reads_v_pairs(shape, decode_rows(shape, shape.max_seqlen_q))
        if short is None:
            short = decode_config(shape, shape.max_seqlen_q, shape.num_seqs, segments,
                                  v_pairs, split_narrow=True)
            if segments is None:
                short = dataclasses.replace(
                    short, segments_upto=batch_segments(shape, short, v_pairs))
        params["short"] = short.as_dict()
        # int8 codes rebuilt with integer ops (fp16 dots) instead of the int -> float
        # conversion unit, on sm90 only (where it was measured): H200, 32 / 128 / 8 x 8192,
        # 219.8 / 846.2 / 66.0 us against 234.0 / 914.4 / 70.7 with the conversion and
        # V_STAGE (NOTES.md). V_STAGE itself is never planned: it lost for fp8 (per-tensor
        # 207 vs 189 us, per-token-head 221 vs 199) and for these int8 codes (233.5 vs
        # 219.8); it stays a measured switch (kernel_experiments.py).
        if shape.arch == "sm90" and shape.kv_quant == "int8_per_token_head":
            params["kv_bits"] = "int8"
        if v_pairs:
            params["v_pairs"] = True
    elif mode == "mixed":
        short = short or decode_config(shape, 1, shape.num_seqs, segments)
        params["short"] = short.as_dict()
        params["long"] = (long or prefill_config(shape)).as_dict()
    elif mode == "prefill":
        params["long"] = (long or prefill_config(shape)).as_dict()
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return params


#: Staged prefill (:mod:`portattn.kernels.stage`): slots per staged block, one descriptor
#: box of the prefill tile.
STAGE_BLOCK = 128
#: Staging costs one pass over the keys a prefill reads; it pays where the prefill's query
#: tiles are many (its queries), so short chunks keep reading the cache. Compared with the
#: plan's power-of-two ``max_seqlen_q``: staged from 513 queries on. Smallest measured
#: wins: 512 queries over 8192 keys (H200: 188.3 vs 204.7 us), 1 x 1024 (58.3 vs 68.0).
STAGE_MIN_QUERIES = 1024
#: Within a staged plan, a sequence's keys are staged when it has at least this many
#: queries (``stage["min_q"]``); shorter ones read the cache in a launch of their own.
#: The staging workspace then holds ``num_tokens // STAGE_SEQ_MIN_QUERIES`` sequences at
#: most, not every sequence of the batch: a chunk beside 63 decodes stages one sequence's
#: keys (H200: staged from 512 queries on was measured faster, see STAGE_MIN_QUERIES).
#: H200, block 16, bf16: 2048 queries over 10240 keys beside 63 x 4096 decodes, 846 us
#: against 1136 reading the cache (its 4 GiB all-sequence workspace was refused before);
#: the parts alone 582 + 260 us (benchmarks/NOTES.md, session 8).
STAGE_SEQ_MIN_QUERIES = 512
#: The largest staging workspace a call allocates (per call, from torch's allocator).
STAGE_MAX_BYTES = 1 << 30
#: Problem classes where staging was measured faster than reading the cache itself (each
#: entry like DESCRIPTOR_PREFERRED's: ``arch``, ``heads`` ((K, V) head-size pairs),
#: ``block_sizes`` (cache block sizes measured), ``evidence``), any cache dtype.
STAGED_PREFERRED: tuple[dict, ...] = (
    {"arch": "sm90", "heads": ((128, 128),), "block_sizes": (16,),
     "evidence": "H200 2026-12-02, block 16, staged vs the cache read in the loop: prefill "
                 "1 x 8192 bf16 1332 vs 1551 us, fp8 per-tensor 1343 vs 1899, int8 / fp8 "
                 "per-token-head 1344 / 1329 vs 3273 / 3461, 4 x 2048 487 vs 563, 1 x 4096 "
                 "367 vs 436, 1 x 1024 58 vs 68, 512 queries over 8192 keys 188 vs 205, "
                 "2048-query chunk + 15 decodes 817 vs 938"},
    {"arch": "sm90", "heads": ((64, 64), (256, 256)), "block_sizes": (16,),
     "evidence": "H200 2026-12-02, block 16, bf16, staged vs the cache read in the loop: "
                 "head 64 prefill 1 x 8192 1074 vs 1176 us, 4 x 2048 387 vs 415; head 256 "
                 "1 x 8192 3262 vs 4442, 4 x 2048 1140 vs 1374"},
    {"arch": "sm90", "heads": ((96, 96), (192, 192)), "block_sizes": (16,),
     "evidence": "H200 2026-12-04, block 16, bf16, kernel-only, staged vs the cache read in "
                 "the loop (benchmarks/gluon_heads_bench.py): head 96 1 x 8192 1096 vs 1575 "
                 "us, 4 x 2048 371 vs 566, 1 x 4096 303 vs 440; head 192 2089 vs 4197, 613 "
                 "vs 1326, 546 vs 1178 (the Gluon prefill, which takes these plans' long "
                 "sequences, faster again: kernels.gluon_launch.MEASURED_HEADS). 8-bit "
                 "caches at these heads were not timed: they follow head 128, where staging "
                 "measured 1.4-2.6x the cache read (the first entry)"},
)


def stage_config(shape: Shape, block: int = STAGE_BLOCK,
                 min_q: int = STAGE_SEQ_MIN_QUERIES) -> dict:
    """The staging launch of a plan: staged block size, staged blocks per sequence
    (``max_seqlen_k``, the plan's power-of-two bound, in staged blocks) and the fewest
    queries a sequence has for its keys to be staged (``min_q``)."""
    return {"block": block, "sblocks": cdiv(shape.max_seqlen_k, block), "min_q": min_q}


def staged_from(stage: dict, short_q: int) -> int:
    """The fewest queries of a sequence whose keys a plan stages: ``stage["min_q"]`` (1
    where absent), and above the short tiles of a mixed batch (``short_q``)."""
    return max(int(stage.get("min_q", 1)), short_q + 1)


def fewest_queries(num_tokens: int, num_seqs: int, max_seqlen_q: int | None) -> int:
    """A floor on every sequence's query count from host numbers alone: the call's tokens
    less what the other sequences hold at most (``max_seqlen_q`` each); 0 without the
    hint. A 4 x 2048 prefill with its hint gives 2048: no sequence can be short."""
    if max_seqlen_q is None or num_seqs < 1:
        return 0
    return max(0, num_tokens - (num_seqs - 1) * int(max_seqlen_q))


def align16(elems: int) -> int:
    """float32 elements rounded up to a 16-byte multiple (descriptor base alignment)."""
    return -(-elems // 4) * 4


def stage_parts(num_seqs: int, slots: int, num_kv_heads: int, head_size_qk: int,
                head_size_v: int, stage: dict, scales: bool) -> tuple[int, ...]:
    """float32 elements of each part of a staging workspace, in order, each 16-byte
    aligned: 16-bit K, 16-bit V, (with ``scales``) fp32 K and V scales, for ``slots``
    staged sequences, then the int32 table (a row per sequence of the batch)."""
    rows = slots * stage["sblocks"] * stage["block"] * num_kv_heads
    return (align16(-(-rows * head_size_qk // 2)), align16(-(-rows * head_size_v // 2)),
            *((align16(rows),) * 2 * scales), align16(num_seqs * stage["sblocks"]))


def stage_bytes(shape: Shape, stage: dict, slots: int) -> int:
    """Bytes of the staging workspace for ``slots`` staged sequences, at most (scales
    counted for any per-token-head cache, though bf16 q stages its values dequantized)."""
    head_v = shape.head_size if shape.head_size_v is None else shape.head_size_v
    return 4 * sum(stage_parts(shape.num_seqs, slots, shape.num_kv_heads, shape.head_size,
                               head_v, stage, shape.scales_per_token))


def staging_reasons(shape: Shape, mode: str, block_size: int, q_bits: int,
                    table: tuple[dict, ...] | None = None) -> list[str]:
    """Why a prefill or mixed plan keeps reading the cache rather than staging its keys
    (empty: stage them)."""
    table = STAGED_PREFERRED if table is None else table
    reasons = []
    if mode not in ("prefill", "mixed"):
        reasons.append(f"{mode} launches read the cache (staging serves prefill tiles)")
    if q_bits != 16:
        reasons.append("q is not float16 / bfloat16 (the staged loop is the 16-bit one)")
    if shape.max_seqlen_q < STAGE_MIN_QUERIES:
        reasons.append(f"max_seqlen_q {shape.max_seqlen_q} < {STAGE_MIN_QUERIES}: too few "
                       "query tiles to pay for one pass over the keys")
    need = stage_bytes(shape, stage_config(shape), 1)
    if need > STAGE_MAX_BYTES:
        reasons.append(f"staging one sequence's keys would take {need >> 20} MiB (> "
                       f"{STAGE_MAX_BYTES >> 20} MiB)")
    head_v = shape.head_size if shape.head_size_v is None else shape.head_size_v
    measured = [e for e in table if e.get("arch") == shape.arch
                and (shape.head_size, head_v) in e.get("heads", ())
                and block_size in e.get("block_sizes", ())]
    if not measured:
        reasons.append(f"no measurement recorded that staging wins for this class on "
                       f"{shape.arch or 'this device'} (heuristics.STAGED_PREFERRED)")
    return reasons


#: The staged loop's tiles by head pad, from the H200 sweep (bf16, block 16; NOTES.md):
#: head 64 1 x 8192 755 us with 128 x 128 / 4 warps / 3 stages against 1072 with the
#: 8-warp tile; head 256 1 x 8192 2254 us (4 x 2048 762) with 128 x 64 / 8 warps / 2
#: stages against 3239 (1140) with 64 x 64 / 4 warps; head 128 keeps prefill_config's
#: 128 x 128 / 8 warps / 3 stages (1330 us, the best of seven tiles).
STAGED_TILES = {64: TileConfig(128, 0, 128, 4, 3), 256: TileConfig(128, 0, 64, 8, 2)}
#: Head pads whose staged tiles launch on a flat grid (the kernel's ``FLAT_GRID``: a query
#: tile's kv heads neighbours in launch order), from the H200 (bf16, block 16, session 9
#: in NOTES.md): head 64 4 x 2048 225 vs 239 us, 1 x 4096 182 vs 210; head 256 4 x 2048
#: 645 vs 674, 1 x 4096 562 vs 583, 1 x 8192 2147 vs 2125. Head 128 stays on the 2-D grid
#: (1 x 8192 1067 vs 1042, 1 x 4096 289 vs 287, 4 x 2048 367 vs 372).
STAGED_FLAT_GRID = (64, 256)
#: Head pads whose staged tiles run the kernel's ``ONE_LOOP`` (edge tiles inside the full
#: tiles' pipelined loop), from the H200 (bf16, block 16, session 9 run 2 in NOTES.md):
#: head 128 4 x 2048 359 vs 372 us, 1 x 4096 283 vs 288, 1 x 8192 1065 vs 1061; head 256
#: 4 x 2048 638 vs 642, 1 x 4096 563 vs 571, 1 x 8192 2185 vs 2171. Head 64 keeps three
#: loops (4 x 2048 229 vs 225, 1 x 4096 189 vs 181).
STAGED_ONE_LOOP = (128, 256)


def staged_long_config(shape: Shape) -> dict:
    """The prefill tile over the staged 16-bit blocks, its keys one staged block's box,
    with the launch's program order (``flat_grid``) and loop (``one_loop``) where they
    measured faster."""
    shape16 = dataclasses.replace(shape, elem_bytes=2)
    measured_class = shape.head_pad == shape.head_pad_v  # DiffKV was not measured
    measured = STAGED_TILES.get(shape.head_pad) if measured_class else None
    if measured is not None:
        block_m = max(measured.block_m, next_pow2(shape.group))
        cfg = _fit_smem(dataclasses.replace(measured, block_m=block_m,
                                            block_q=block_m // shape.group), shape16)
    else:
        cfg = prefill_config(shape16)
    out = cfg.as_dict()
    out["block_n"] = min(out["block_n"], STAGE_BLOCK)
    if measured_class and shape.head_pad in STAGED_FLAT_GRID:
        out["flat_grid"] = True
    if measured_class and shape.head_pad in STAGED_ONE_LOOP:
        out["one_loop"] = True
    return out


def variant_name(params: dict) -> str:
    short = params.get("short", {})
    split = short.get("segments", 1) > 1
    name = f"{params['mode']}-{'3d' if split else '2d'}"
    if (short.get("block_n"), short.get("num_warps")) == (64, 2):  # the narrow tiles
        name += "-k64w2"
    for largest, segments in short.get("segments_upto", ()):
        name += f"-{segments}seg-upto-{largest}"
    if params.get("fp8_dot"):
        name += "-fp8dot"
    if params.get("kv_bits"):
        name += f"-{params['kv_bits']}-codes"
    if params.get("v_pairs"):
        name += "-vpairs"
    if short.get("tile_heads", 1) > 1:
        name += f"-{short['tile_heads']}heads"
    if params.get("gluon"):
        name += "-gluon" if params["gluon"]["reads"] == "cache" else "-staged-gluon"
    elif params.get("stage"):
        name += "-staged"
    return name + "-td" if params.get("kv_load") == "descriptor" else name


#: Problem classes where descriptor (TMA) K/V loads beat pointer loads, by measurement
#: (selection by evidence, issue 12). Each entry: ``arch`` and optional ``mode``
#: (decode / prefill / mixed), ``elem_bytes`` (cache storage width), ``min_block_size``
#: or ``block_sizes`` (the cache block sizes measured), ``head_sizes`` (K head sizes) or
#: ``heads`` ((K, V) head-size pairs), and ``evidence`` (the numbers, from
#: benchmarks/NOTES.md). Classes not listed keep pointer loads; ``PORTATTN_TD=1`` forces
#: descriptors to measure them.
DESCRIPTOR_PREFERRED: tuple[dict, ...] = (
    {"arch": "sm90", "mode": "prefill", "elem_bytes": 2, "block_sizes": (64, 128),
     "heads": ((128, 128),),
     "evidence": "H200 2026-12-02, descriptor vs pointer, prefill 1 x 8192: 1325 vs 1538 us "
                 "(block 128), 1616 vs 1678 us (block 64); 1 x 4096: 370 vs 436 us (128), "
                 "451 vs 463 us (64); block 16 loses (0.53-0.67x)"},
    {"arch": "sm90", "mode": "prefill", "elem_bytes": 2, "block_sizes": (128,),
     "heads": ((192, 128),),
     "evidence": "H200 2026-12-02, block 128, DiffKV 192/128 prefill 1 x 8192: descriptor "
                 "1794 vs pointer 1874 us (1.04x)"},
    {"arch": "sm90", "mode": "mixed", "elem_bytes": 2, "block_sizes": (64, 128),
     "heads": ((128, 128),),
     "evidence": "H200 2026-12-02, descriptor vs pointer: 4 x 2048 469 vs 557 us (block "
                 "128), 520 vs 593 us (64); 2048 chunk + 63 decodes 1021 vs 1125 us (128), "
                 "1203 vs 1224 us (64)"},
)


def prefers_descriptors(shape: Shape, mode: str, block_size: int,
                        table: tuple[dict, ...] | None = None) -> tuple[bool, str]:
    """Whether the measurement table says descriptor loads win for this class, and why."""
    table = DESCRIPTOR_PREFERRED if table is None else table
    for entry in table:
        if entry.get("arch") != shape.arch:
            continue
        if "mode" in entry and entry["mode"] != mode:
            continue
        if "elem_bytes" in entry and entry["elem_bytes"] != shape.elem_bytes:
            continue
        if block_size < entry.get("min_block_size", 0):
            continue
        if "block_sizes" in entry and block_size not in entry["block_sizes"]:
            continue
        if "head_sizes" in entry and shape.head_size not in entry["head_sizes"]:
            continue
        head_v = shape.head_size if shape.head_size_v is None else shape.head_size_v
        if "heads" in entry and (shape.head_size, head_v) not in entry["heads"]:
            continue
        return True, f"measured faster here ({entry.get('evidence', 'NOTES.md')})"
    return False, (f"no measurement recorded that descriptor loads win for {mode} on "
                   f"{shape.arch or 'this device'} (heuristics.DESCRIPTOR_PREFERRED)")

"""How the unified kernel loads K/V tiles: pointer loads or tensor descriptors (TMA).

Pure Python, no torch, no Triton: the eligibility rules of the kernel's ``KV_LOAD``
switch (see :mod:`portattn.kernels.unified`) as functions returning reasons (an empty
list: eligible). Two levels:

* :func:`problem_reasons`: what the plan can see (block size, head sizes, the storage
  dtype's width);
* :func:`tensor_reasons`: what only the tensors say (base address and strides 16-byte
  aligned, last dim contiguous), checked by the launcher.

The descriptor path loads one TMA box ``[1, BLOCK_N, 1, HEAD_PAD]`` of a 4-D descriptor
``[num_blocks, block_size, num_kv_heads, head]`` per tile, so a tile must lie inside one
cache block: :func:`descriptor_block_n` picks the tile length (a block split into whole
tiles; a tile is never made of several blocks, which would need one box per block joined
in registers).
"""

from __future__ import annotations

from portattn.kernels.heuristics import head_pad

#: the unified kernel's ``KV_LOAD`` codes; ``staged`` / ``staged_host``: keys staged by
#: :mod:`portattn.kernels.stage`, read as rows of 3-D descriptors built in the kernel / on
#: the host (the launcher of staged prefills uses :data:`STAGED_KV_LOAD`; ``staged`` is
#: kept as the measured alternative: ``params["stage_kv_load"]``, benchmarks only). Their
#: tiles too lie inside one staged block (``BLOCK_SIZE % BLOCK_N == 0``, checked by
#: :func:`launch_reasons`): per-token-head scales are read per staged block.
KV_LOAD_CODES = {"pointer": 0, "descriptor": 1, "staged": 2, "staged_host": 3}
#: how the long tiles of a staged prefill read the staged keys: rows of host-built
#: descriptors, 2-9% faster than the same built per program and 13-29% faster than the
#: 4-D boxes through the staged block table (H200, benchmarks/NOTES.md, session 7)
STAGED_KV_LOAD = "staged_host"
#: TMA: global address and every stride but the last a multiple of 16 bytes.
TMA_ALIGN_BYTES = 16
#: TMA: at most 256 elements per box dimension.
TMA_BOX_MAX = 256
#: tl.dot needs at least 16 keys per tile.
MIN_TILE_KEYS = 16


def _pow2_divisor(n: int) -> int:
    """The largest power of two dividing ``n`` (n >= 1)."""
    return n & -n


def descriptor_block_n(block_n: int, block_size: int) -> int:
    """The descriptor path's tile length for a planned ``block_n``: the largest power of
    two not above ``block_n`` that divides ``block_size`` (a cache block split into whole
    tiles). Below :data:`MIN_TILE_KEYS` the path is not eligible (:func:`problem_reasons`)."""
    return min(block_n, _pow2_divisor(max(1, block_size)))


def problem_reasons(*, block_size: int, head_size_qk: int, head_size_v: int,
                    elem_bytes: int) -> list[str]:
    """Why descriptor K/V loads cannot serve a problem of this class (empty: they can)."""
    reasons = []
    if block_size < 1 or _pow2_divisor(block_size) < MIN_TILE_KEYS:
        reasons.append(
            f"block size {block_size}: a descriptor tile is one TMA box inside one cache "
            f"block, so the block must split into whole tiles of >= {MIN_TILE_KEYS} keys "
            f"(a power-of-two factor >= {MIN_TILE_KEYS}); pointer loads gather any block size")
    for what, head in (("K head size", head_size_qk), ("V head size", head_size_v)):
        if head_pad(head) > TMA_BOX_MAX:
            reasons.append(f"{what} {head} pads to {head_pad(head)}, above TMA's "
                           f"{TMA_BOX_MAX}-element box")
        if head_pad(head) * elem_bytes < TMA_ALIGN_BYTES:
            reasons.append(f"{what} {head} x {elem_bytes} bytes is under TMA's "
                           f"{TMA_ALIGN_BYTES}-byte minimum row")
    return reasons


def tensor_reasons(name: str, data_ptr: int, strides: tuple[int, ...],
                   elem_bytes: int) -> list[str]:
    """Why a cache tensor ``[num_blocks, block_size, num_kv_heads, head]`` cannot back a
    TMA descriptor (empty: it can). ``name`` names the argument in the reasons."""
    reasons = []
    if len(strides) != 4:
        return [f"{name} has {len(strides)} dims, a descriptor view needs 4"]
    if strides[-1] != 1:
        reasons.append(f"{name}'s last dim is not contiguous (stride {strides[-1]})")
    if data_ptr % TMA_ALIGN_BYTES:
        reasons.append(f"{name}'s base address is not {TMA_ALIGN_BYTES}-byte aligned "
                       f"(address % {TMA_ALIGN_BYTES} = {data_ptr % TMA_ALIGN_BYTES})")
    for dim, stride in zip(("block", "slot", "head"), strides[:-1]):
        if (stride * elem_bytes) % TMA_ALIGN_BYTES:
            reasons.append(f"{name}'s {dim} stride {stride} x {elem_bytes} bytes is not a "
                           f"multiple of {TMA_ALIGN_BYTES} bytes")
    return reasons


def descriptor_params(params: dict, block_size: int) -> dict:
    """``params`` (from ``plan_launch``) with ``kv_load="descriptor"`` and every tile
    config's ``block_n`` cut to :func:`descriptor_block_n`; a decode tile over several kv
    heads (``tile_heads``: a box holds one head's keys) becomes a tile per kv head with
    the same rows (``block_q`` that many times more queries: its GQA group's rows); its
    segment counts stay the plan's (decided for that many times fewer programs: more than
    the per-head rule gives; only ``PORTATTN_TD=1`` gets there, no decode class prefers
    descriptors)."""
    out = dict(params)
    for key in ("short", "long"):
        if key in out:
            cfg = dict(out[key])
            heads = cfg.pop("tile_heads", 1)
            if heads > 1:
                cfg["block_q"] = cfg["block_q"] * heads
            cfg["block_n"] = descriptor_block_n(cfg["block_n"], block_size)
            out[key] = cfg
    out["kv_load"] = "descriptor"
    return out


def launch_reasons(params: dict, block_size: int) -> list[str]:
    """Why a plan's tiles cannot run with descriptor loads (a tile crossing a block, a
    decode tile over several kv heads)."""
    reasons = []
    for key in ("short", "long"):
        if key in params:
            block_n = params[key]["block_n"]
            if block_n < MIN_TILE_KEYS:
                reasons.append(f"{key} tile of {block_n} keys is below the {MIN_TILE_KEYS} "
                               f"keys of a descriptor tile")
            elif block_size % block_n:
                reasons.append(f"{key} tile of {block_n} keys is not a whole part of a "
                               f"{block_size}-slot cache block")
            heads = params[key].get("tile_heads", 1)
            if heads > 1:
                reasons.append(f"{key} tile reads {heads} kv heads per key (a descriptor "
                               f"box holds one head's keys)")
    return reasons


def cache_reasons(cache, params: dict) -> list[str]:
    """Why descriptor K/V loads cannot run on these cache tensors with a plan's tiles
    (:func:`launch_reasons`, then each tensor's :func:`tensor_reasons`): the launch then
    reads them with pointer loads (``PORTATTN_TD=1``: an ``InputError``)."""
    why = launch_reasons(params, cache.block_size)
    for name, t in (("key_cache", cache.key_cache), ("value_cache", cache.value_cache)):
        why += tensor_reasons(name, t.data_ptr(), tuple(t.stride()), t.element_size())
    return why

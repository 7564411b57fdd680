"""Python launchers of the unified kernel: grids, meta-parameters, workspaces.

:func:`launch_unified` turns a public call plus the launch parameters chosen by
:func:`portattn.kernels.heuristics.plan_launch` into one to five kernel launches (a
staged prefill, ``params["stage"]``, first runs :mod:`portattn.kernels.stage`). It
reads no device value (everything is sized from tensor shapes and the plan; scales given
as Python floats become cached one-element device tensors), so it never synchronizes and
can be captured in a CUDA graph; the split-KV and staging workspaces are allocated per
call (:func:`new_workspace`) unless the caller passes one: the :data:`MERGE_TICKETS`
int32 tickets that split launches merging in the kernel count on (zero when made, zero
after every launch), then :func:`plan_workspace_size` elements of data. A split decode
captured in a graph without a workspace takes its tickets from
:mod:`portattn.kernels.graph_tickets` instead (no memset on every replay).

The kernels are wrapped by :func:`portattn.kernels.fast_launch.capturable` (a no-op
outside :func:`~portattn.kernels.fast_launch.capture`), so plans can record these
launches once and relaunch the compiled kernels cheaply. A workspace passed in must come
from :func:`new_workspace` (or be one that only such launches have used): its merge
tickets must be zero, or split launches merging in the kernel merge early or never; a
plan's own holds :func:`plan_workspace_size` float32 elements of data after them.
"""

from __future__ import annotations

import torch

from portattn import settings
from portattn.devices import capturing_on
from portattn.errors import InputError
from portattn.kernels import graph_tickets, heuristics, reduce, unified
from portattn.kernels import kv_load as kv_load_rules
from portattn.kernels.byte_decode import PAIR_FORMATS
from portattn.kernels.compile_options import compile_options
from portattn.kernels.fast_launch import capturable
from portattn.kernels.heuristics import (
    STAGE_MAX_BYTES,
    align16,
    fewest_queries,
    head_pad,
    next_pow2,
    softcap_code,
    staged_from,
)
from portattn.kernels.scalars import device_scalars, kv_scale_args
from portattn.kernels.stage_launch import (
    StagedCache,
    stage_kv,
    stage_workspace_size,
    stages_scales,
)
from portattn.types import FP8_DTYPES, FP8_DTYPES_BY_NAME, FP8_FORMAT_NAMES, fp8_max

unified_attention_kernel = capturable(unified.unified_attention_kernel)
merge_segments_kernel = capturable(reduce.merge_segments_kernel)

ALIBI_CODES = {"none": 0, "linear": 1, "sqrt": 2}
#: COMPUTE_DTYPE codes of the kernel (plain ints keep launches replayable)
_COMPUTE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
#: fp8 QK^T dots promote their partial sums to fp32 every this many products (the
#: smallest Hopper fp8 MMA depth): accurate at any context length, see benchmarks/NOTES.md.
FP8_DOT_PROMOTE_EVERY = 32
#: The first elements of every workspace: int32 tickets of the split-KV merge in the
#: kernel (one per (sequence, kv head), or per kv head group of a tile over several:
#: the kernel's MERGE_SEGMENTS), zero when the
#: workspace is made and after every launch. Data starts after them (at the same offset
#: in a workspace of any size, so a recorded launch replays into a grown one), and no
#: data is ever written there, so any plan may share a workspace with any other. A split
#: launch with more (sequence, kv head) pairs merges with the merge kernel instead.
MERGE_TICKETS = 1024
#: The kernel's ``V_SC_BOOST`` for e5m2 per-token-head caches with fp16 dots: their V
#: scales (absmax / 57344) times P are fp16 subnormals for any V of unit size; x128
#: brings them to e4m3fn's range (absmax / 448). Interpreter, fp16 q, head 64, decode
#: and prefill: relative error 2.2-2.6e-3 -> 2.9-3.0e-4, as e4m3fn's (NOTES.md, session 25).
E5M2_V_SCALE_BOOST = 128.0



def kernel_scalars(q, cache, options, fp8_dot: bool, compute: str | None = None,
                   codes: bool = False) -> dict:
    """The quantization arguments of both kernels: scale pointers, their strides and the
    switches (see the kernel's module doc); ``codes``: the cache's 8-bit codes are rebuilt
    as fp16 in the kernel (``KV_BITS``), so a bf16 q dots in fp16 and no fp8 QK^T."""
    device = q.device
    dummy = q
    code, k_scale, v_scale, k_strides, v_strides = kv_scale_args(cache, device, dummy)
    q_fp8 = q.dtype in FP8_DTYPES
    fp8_out = options.out_dtype in FP8_DTYPES
    if codes and q.dtype == torch.bfloat16:  # the rebuilt values are fp16: so are the dots
        compute = "float16"
    elif compute is None:  # fp8 caches: fp16 dots (fp8 -> fp16 is exact, one conversion)
        fp8_cache = cache.dtype in FP8_DTYPES
        compute = "float16" if q_fp8 or (fp8_cache and q.dtype == torch.bfloat16) else None
    prescale = compute == "float16" and q.dtype == torch.bfloat16
    compute_code = 0 if compute == "float16" else _COMPUTE_CODES[q.dtype]
    # the quant's format, not the tensors' dtype: a staged cache holds the e5m2 codes as
    # 16-bit values beside the scales (KV_QUANT 2 still)
    boost = E5M2_V_SCALE_BOOST if (code == 2 and cache.quant.fp8_dtype == torch.float8_e5m2
                                   and compute_code == 0) else 1.0  # fp16 dots
    return dict(
        q_scale_ptr=device_scalars.get(options.q_scale, device, "q") if q_fp8 else dummy,
        k_scale_ptr=k_scale, v_scale_ptr=v_scale,
        out_scale_ptr=device_scalars.get(options.output_scale, device, "out") if fp8_out else dummy,
        stride_ksb=k_strides[0], stride_kss=k_strides[1], stride_ksh=k_strides[2],
        stride_vsb=v_strides[0], stride_vss=v_strides[1], stride_vsh=v_strides[2],
        KV_QUANT=code, Q_SCALED=q_fp8, Q_PRESCALE=prescale,
        FP8_DOT=bool(fp8_dot and q_fp8 and not codes),
        FP8_ACC=FP8_DOT_PROMOTE_EVERY, FP8_OUT=fp8_out,
        FP8_MAX=fp8_max(options.out_dtype) if fp8_out else 0.0,
        COMPUTE_DTYPE=compute_code, V_SC_BOOST=boost,
    )


#: KV_BITS codes of the kernel: 8-bit codes rebuilt as fp16 with integer operations
#: (``params["kv_bits"]``: fp8 caches where the GPU has no conversion for the format,
#: int8 caches where that measured faster than the conversion unit; byte_decode.py).
KV_BITS_CODES = {None: 0, "e4m3fn": 1, "e5m2": 2, "int8": 3}
_KV_BITS_DTYPES = {**FP8_DTYPES_BY_NAME, "int8": torch.int8}


def v_pairs_code(cache_dtype: torch.dtype, kv_bits: str | None) -> int:
    """The kernel's ``V_PAIRS`` format for an 8-bit cache read as int16 pairs of codes
    (``byte_decode.PAIR_FORMATS``); 0 for caches of wider elements."""
    if cache_dtype == torch.int8:
        return PAIR_FORMATS["int8"]
    name = FP8_FORMAT_NAMES.get(cache_dtype)
    if name == "e5m2":
        return PAIR_FORMATS["e5m2"]
    if name == "e4m3fn":
        return PAIR_FORMATS["e4m3fn_bits" if kv_bits == "e4m3fn" else "e4m3fn"]
    return 0


def _as_pairs(value_cache: torch.Tensor) -> torch.Tensor | None:
    """An 8-bit V cache viewed as int16 (two codes per element), or None where its
    strides or offset are odd (then V is read byte-wise)."""
    try:
        return value_cache.view(torch.uint8).view(torch.int16)
    except RuntimeError:
        return None


def _common_args(q, cache, metadata, options, out, fp8_dot: bool,
                 compute: str | None = None, kv_bits: str | None = None,
                 v_pairs: bool = False) -> dict:
    dummy = q
    bits = KV_BITS_CODES[kv_bits]
    if kv_bits is not None and cache.dtype != _KV_BITS_DTYPES[kv_bits]:
        raise ValueError(f"kv_bits={kv_bits!r} planned for a {cache.dtype} cache")
    key_cache, value_cache = cache.key_cache, cache.value_cache
    if bits in (1, 2):  # fp8 caches: the kernel reads the bytes, rebuilds fp16 from them
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    pairs = v_pairs_code(cache.dtype, kv_bits) if v_pairs else 0
    if pairs:
        paired = _as_pairs(value_cache)
        if paired is None:
            pairs = 0
        else:
            value_cache = paired
    return dict(
        q_ptr=q, k_ptr=key_cache, v_ptr=value_cache, out_ptr=out,
        block_table_ptr=metadata.block_table, cu_seqlens_q_ptr=metadata.cu_seqlens_q,
        seq_lens_ptr=metadata.seq_lens,
        alibi_ptr=options.alibi_slopes if options.alibi_slopes is not None else dummy,
        sinks_ptr=options.sinks if options.sinks is not None else dummy,
        num_seqs=metadata.seq_lens.shape[0], num_tokens=q.shape[0], num_q_heads=q.shape[1],
        num_blocks=cache.num_blocks, bt_width=metadata.block_table.shape[1],
        scale=float(options.scale), v_one=1.0,
        softcap=float(options.softcap) if options.softcap is not None else 0.0,
        window=int(options.sliding_window) if options.sliding_window is not None else 0,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_qd=q.stride(2),
        stride_ot=out.stride(0), stride_oh=out.stride(1), stride_od=out.stride(2),
        stride_kb=cache.key_cache.stride(0), stride_ks=cache.key_cache.stride(1),
        stride_kh=cache.key_cache.stride(2), stride_vb=value_cache.stride(0),
        stride_vs=value_cache.stride(1), stride_vh=value_cache.stride(2),
        stride_bt=metadata.block_table.stride(0),
        GROUP=q.shape[1] // cache.num_kv_heads, BLOCK_SIZE=cache.block_size,
        HEAD_QK=cache.head_size_qk, HEAD_QK_PAD=head_pad(cache.head_size_qk),
        HEAD_V=cache.head_size_v, HEAD_V_PAD=head_pad(cache.head_size_v),
        CAUSAL=bool(options.causal), USE_WINDOW=options.sliding_window is not None,
        USE_SOFTCAP=softcap_code(options.softcap), ALIBI=ALIBI_CODES[options.alibi],
        USE_SINKS=options.sinks is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", KV_BITS=bits,
        V_PAIRS=pairs,
        # inline PTX on NVIDIA GPUs (not the interpreter, not ROCm)
        BITS_ASM=bool(bits or pairs) and q.device.type == "cuda" and
        torch.version.hip is None and not settings.TRITON_INTERPRET.value(),
        **kernel_scalars(q, cache, options, fp8_dot, compute, codes=bool(bits)),
    )


def split_workspace_size(num_seqs: int, num_q_heads: int, head_size_v: int, cfg: dict) -> int:
    """float32 elements of the split-KV partials of a SEQ_MODE 1 launch over ``num_seqs``
    sequences (0: no split); ``head_size_v``: the V head size (the partials are that
    wide)."""
    segments = heuristics.segments_for(cfg, num_seqs)
    if segments <= 1:
        return 0
    rows = num_seqs * cfg["block_q"] * num_q_heads * segments
    return rows * (head_pad(head_size_v) + 2)


def new_workspace(elements: int, device) -> torch.Tensor:
    """A workspace: :data:`MERGE_TICKETS` zeroed tickets, then ``elements`` float32
    values of data."""
    workspace = torch.empty(MERGE_TICKETS + elements, dtype=torch.float32, device=device)
    workspace[:MERGE_TICKETS].zero_()
    return workspace


def has_room(workspace: torch.Tensor, elements: int) -> bool:
    """Whether ``workspace`` holds ``elements`` values of data after its tickets."""
    return workspace.numel() >= MERGE_TICKETS + elements


def merges_in_kernel(cfg: dict, num_seqs: int, num_kv_heads: int) -> bool:
    """Whether a split launch of decode tiles ``cfg`` merges its partials in the kernel
    (the tile's ``merge_in_kernel``, else ``heuristics.MERGE_IN_KERNEL``) rather than with
    the merge kernel: one ticket per (sequence, kv head) must fit :data:`MERGE_TICKETS`
    (``num_kv_heads``: the launch's programs per sequence and segment, kv heads over the
    tile's ``tile_heads``)."""
    return heuristics.segments_for(cfg, num_seqs) > 1 and \
        cfg.get("merge_in_kernel", heuristics.MERGE_IN_KERNEL) and \
        num_seqs * num_kv_heads <= MERGE_TICKETS


def _launch_short(args, q, cache, metadata, out, cfg: dict, long_follows: bool,
                  workspace: torch.Tensor | None = None) -> None:
    """SEQ_MODE 1: one tile per sequence with at most BLOCK_Q queries (2D or 3D); a split
    launch merges in the kernel (:func:`merges_in_kernel`) or runs the merge kernel. A
    tile of ``tile_heads`` kv heads (the kernel's ``TILE_HEADS``) is launched per group
    of that many heads, its rows their query heads (the kernel's ``GROUP``)."""
    num_seqs = metadata.seq_lens.shape[0]
    heads = cfg.get("tile_heads", 1)
    if heads > 1:
        if cache.num_kv_heads % heads or cfg["block_m"] < cfg["block_q"] * args["GROUP"] * heads:
            raise ValueError(f"a decode tile of {heads} kv heads needs the kv heads "
                             f"({cache.num_kv_heads}) in whole groups of {heads} and "
                             f"block_m >= block_q x their query heads, got {cfg}")
        args = dict(args, GROUP=args["GROUP"] * heads)
    num_kv_heads = cache.num_kv_heads // heads  # programs per (sequence, segment)
    segments = heuristics.segments_for(cfg, num_seqs)
    block_q = cfg["block_q"]
    pad_v = args["HEAD_V_PAD"]
    in_kernel = merges_in_kernel(cfg, num_seqs, num_kv_heads)
    if segments > 1 and not in_kernel and segments & (segments - 1):
        raise ValueError(f"the merge kernel needs a power-of-two segment count, got "
                         f"{segments} (only the merge in the kernel takes others)")
    if segments > 1:  # one workspace: [tickets | acc rows x HEAD_V_PAD | m | l | ...]
        need = split_workspace_size(num_seqs, q.shape[1], cache.head_size_v, cfg)
        rows = need // (pad_v + 2)
        own_tickets = None
        if in_kernel:
            if not _capturing(q.device):
                if q.is_cuda:  # the slab later captures take from (kernels/graph_tickets)
                    graph_tickets.prepare(q.device)
            elif workspace is None:  # captured: tickets of its own, no memset per replay
                own_tickets = graph_tickets.take(q.device, num_seqs * num_kv_heads)
        if own_tickets is not None:
            tickets, data = own_tickets, torch.empty(need, dtype=torch.float32,
                                                     device=q.device)
        else:
            if workspace is None or not has_room(workspace, need):
                workspace = new_workspace(need, q.device)
            tickets = workspace[:MERGE_TICKETS].view(torch.int32) if in_kernel else q
            data = workspace[MERGE_TICKETS:]
        part_acc = data[:rows * pad_v]
        part_m = data[rows * pad_v:rows * (pad_v + 1)]
        part_l = data[rows * (pad_v + 1):need]
    else:
        part_m = part_l = part_acc = tickets = q
    merge_load = unified.MERGE_LOAD_ELEMENTS  # one value where nothing merges: one compile
    if in_kernel:  # (only split launches merge in the kernel)
        merge_load = merge_load_of(cfg, args["GROUP"], segments, pad_v)
    unified_attention_kernel[(num_seqs, num_kv_heads, segments)](
        part_m_ptr=part_m, part_l_ptr=part_l, part_acc_ptr=part_acc, ticket_ptr=tickets,
        BLOCK_M=cfg["block_m"], BLOCK_Q=block_q, BLOCK_N=cfg["block_n"], SEQ_MODE=1,
        SHORT_Q=0, STAGED_Q=0, SPLIT=segments > 1, LONG_FOLLOWS=long_follows, num_segments=segments,
        MERGE_SEGMENTS=next_pow2(segments) if in_kernel else 0,
        MERGE_LOAD=merge_load, TILE_HEADS=heads,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_register_cap(cfg),
        **compile_options(), **args)
    if segments > 1 and not in_kernel:
        merge_segments_kernel[(num_seqs, q.shape[1], block_q)](
            part_m, part_l, part_acc, out, metadata.cu_seqlens_q, args["sinks_ptr"],
            args["out_scale_ptr"], q.shape[0], q.shape[1], out.stride(0), out.stride(1),
            out.stride(2),
            BLOCK_Q=block_q, NUM_SEGMENTS=segments, HEAD_V=args["HEAD_V"], HEAD_V_PAD=pad_v,
            USE_SINKS=args["USE_SINKS"], FP8_OUT=args["FP8_OUT"], FP8_MAX=args["FP8_MAX"],
            num_warps=4 if pad_v * segments >= 4096 else 2, **compile_options())


_capturing = capturing_on  # a module name the tests can replace


def _register_cap(cfg: dict) -> dict:
    """Triton's ``maxnreg`` launch option where a tile config caps registers per thread
    (more programs resident per SM); nothing otherwise."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}


def _launch_long(args, q, cache, metadata, cfg: dict, short_q: int,
                 staged_q: int = 0) -> None:
    """SEQ_MODE 0 (every sequence) or 2 (sequences with more than ``short_q`` queries);
    with ``staged_q`` > 0, not the sequences with at least that many queries."""
    num_seqs = metadata.seq_lens.shape[0]
    block_q = cfg["block_q"]
    tiles = q.shape[0] // block_q + num_seqs
    flat = bool(cfg.get("flat_grid"))  # heuristics.STAGED_FLAT_GRID
    grid = (tiles * cache.num_kv_heads, 1, 1) if flat else (tiles, cache.num_kv_heads, 1)
    unified_attention_kernel[grid](
        part_m_ptr=q, part_l_ptr=q, part_acc_ptr=q, ticket_ptr=q, FLAT_GRID=flat,
        ONE_LOOP=bool(cfg.get("one_loop")) and args.get("KV_LOAD", 0) >= 2,
        BLOCK_M=cfg["block_m"], BLOCK_Q=block_q, BLOCK_N=cfg["block_n"],
        SEQ_MODE=2 if short_q > 0 else 0, SHORT_Q=short_q, STAGED_Q=staged_q, SPLIT=False,
        LONG_FOLLOWS=False,
        num_segments=1, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **_register_cap(cfg), **compile_options(), **args)


def launch_unified(q: torch.Tensor, cache, metadata, options, out: torch.Tensor,
                   params: dict, workspace: torch.Tensor | None = None) -> None:
    """Run the unified kernel(s) as ``params`` (from ``plan_launch``) says; writes ``out``.

    A decode plan used with more queries per sequence than its tile holds (an understated
    ``metadata.max_seqlen_q`` that nothing checked) writes NaN into those sequences' rows
    rather than leaving them stale. A plan with ``stage`` first copies the keys its long
    tiles read into staged blocks (:func:`launch_staged`)."""
    if params.get("stage"):  # planned for prefill and mixed launches only
        launch_staged(q, cache, metadata, options, out, params, workspace)
        return
    _with_kv_loads(q, cache, metadata, options, out, params,
                   lambda args, p: _launch_modes(q, cache, metadata, out, p, args, workspace))


def v_pairs_compile_right(params: dict, head_size_v: int) -> bool:
    """Whether the kernel's ``V_PAIRS`` may serve every tile of ``params``: not V rows
    padded below 128 (64 pairs) in tiles of more than 16 rows. Those came out wrong on the
    H100 (Triton 3.6, head 64, 64- and 128-row tiles of 4 warps: relative error 0.14-0.16,
    one illegal memory access; 8 warps right; NOTES.md session 33). The plan pairs V only
    in 16-row decode tiles of head 128 (``heuristics.reads_v_pairs``); this keeps a forced
    ``v_pairs`` from reaching the others, which read V byte-wise instead."""
    if head_pad(head_size_v) >= 128:
        return True
    return all(params[key]["block_m"] <= 16 for key in ("short", "long") if key in params)


def _with_kv_loads(q, cache, metadata, options, out, params: dict, run) -> None:
    """``run(args, params)`` with the kernel arguments of ``params`` over ``cache``,
    descriptor loads where the plan chose them and these tensors allow (auto mode: a
    descriptor launch that raises is rerun with pointer loads and remembered); the
    ``params`` passed on may drop a register cap the arguments cannot use."""
    args = _common_args(q, cache, metadata, options, out, params.get("fp8_dot", False),
                        params.get("compute"), params.get("kv_bits"),
                        bool(params.get("v_pairs")) and not params.get("v_stage")
                        and v_pairs_compile_right(params, cache.head_size_v))
    if params.get("v_pairs") and not args["V_PAIRS"]:
        # V could not be viewed as int16 (odd head size, stride or offset) or such tiles
        # miscompile: read byte-wise, without the register cap that was measured for the
        # paired tile only
        params = {k: {n: x for n, x in v.items() if n != "maxnreg"} if k in ("short", "long")
                  else v for k, v in params.items()}
    if "check_blocks" in params:  # a measurement switch (benchmarks/kernel_experiments.py)
        args["CHECK_BLOCKS"] = bool(params["check_blocks"])
    if params.get("v_stage") and args["KV_QUANT"]:  # forced (experiments), 8-bit caches only
        args["V_STAGE"] = True
    kind = params.get("kv_load", "pointer")
    if kind.startswith("staged") and not isinstance(cache, StagedCache):
        raise ValueError(f"kv_load={kind!r} reads staged keys; this cache is not staged")
    if kind != "pointer":  # "descriptor", or staged keys ("staged" / "staged_host")
        forced = bool(params.get("_kv_load_forced"))
        why = descriptor_launch_reasons(cache, params)
        if why and forced:
            raise InputError("cache", "tensors descriptor (TMA) loads can read "
                             "(PORTATTN_TD=1 forces them)", "; ".join(why))
        key = _descriptor_key(args, params) + (kind,)
        if not why and (forced or key not in DESCRIPTOR_FAILED):
            args["KV_LOAD"] = kv_load_rules.KV_LOAD_CODES[kind]
            if q.device.type == "cuda":  # device-side descriptors need triton scratch
                ensure_scratch_allocator()
            if forced:
                run(args, params)
                return
            try:
                run(args, params)
                return
            except Exception as exc:  # auto: a variant the gate did not cover failed
                _remember_failure(DESCRIPTOR_FAILED, key, exc, "descriptor (TMA) K/V loads "
                                  "failed, pointer loads used instead for this kernel variant")
                if kind == "descriptor" and "mode" in params:  # what a plan chose: plans
                    # made from now on take pointer loads for this class, and say why
                    DESCRIPTOR_CLASS_FAILED[descriptor_class_key(
                        params, q.dtype, q.shape[1], cache.num_kv_heads, cache.head_size_qk,
                        cache.head_size_v, cache.block_size, options.causal,
                        options.sliding_window is not None, options.softcap is not None,
                        options.alibi, options.sinks is not None, cache.quant.mode,
                        options.out_dtype)] = DESCRIPTOR_FAILED[key]
                    _forget_plans()
                args["KV_LOAD"] = kv_load_rules.KV_LOAD_CODES["pointer"]
        # else: these tensors cannot back descriptors, or this variant failed before
    run(args, params)


# --- staged prefill (kernels/stage.py, launched by kernels/stage_launch.py) -------------

def plan_workspace_size(num_seqs: int, num_q_heads: int, num_kv_heads: int,
                        head_size_qk: int, head_size_v: int, per_token: bool,
                        q_dtype: torch.dtype, params: dict, num_tokens: int = 0) -> int:
    """float32 elements of everything a plan's launches need beside their tensors: the
    split-KV partials, then (16-byte aligned) the staged blocks of a call with
    ``num_tokens`` queries (:func:`staging_slots`; none where it stages nothing, nor for a
    plan whose long sequences take the Gluon prefill: it stages only where that launch
    is refused, into a workspace :func:`launch_staged` then makes for the call)."""
    split = _split_size(num_seqs, num_q_heads, head_size_v, params)
    if reads_cache(params):
        return split
    scales = stages_scales(per_token, q_dtype)
    slots = staging_slots(params, num_seqs, num_tokens, num_kv_heads, head_size_qk,
                          head_size_v, scales)
    if not slots:
        return split
    return align16(split) + stage_workspace_size(
        num_seqs, slots, num_kv_heads, head_size_qk, head_size_v, params["stage"], scales)


def staging_slots(params: dict, num_seqs: int, num_tokens: int, num_kv_heads: int,
                  head_size_qk: int, head_size_v: int, scales: bool) -> int:
    """Sequences a staged plan's call with ``num_tokens`` queries stages at most
    (a bound: as many as the tokens allow sequences of ``heuristics.staged_from``
    queries, at most the batch's); 0 where the plan does not stage or that
    workspace would pass ``heuristics.STAGE_MAX_BYTES`` (the call then reads the cache
    throughout, and nothing is allocated for staging)."""
    stage = params.get("stage")
    if not stage:
        return 0
    slots = min(num_seqs, num_tokens // staged_from(stage, _short_q(params)))
    if slots and 4 * stage_workspace_size(num_seqs, slots, num_kv_heads, head_size_qk,
                                          head_size_v, stage, scales) > STAGE_MAX_BYTES:
        return 0
    return slots


def _short_q(params: dict) -> int:
    """The queries a mixed plan's short tiles hold (0 for other plans)."""
    return params["short"]["block_q"] if params["mode"] == "mixed" else 0


def _split_size(num_seqs: int, num_q_heads: int, head_size_v: int, params: dict) -> int:
    """The split-KV partials of the largest launch a plan for up to ``num_seqs``
    sequences makes (smaller batches may take more segments: ``segments_upto``)."""
    short = params.get("short")
    if not short:
        return 0
    batches = [num_seqs] + [largest for largest, _ in short.get("segments_upto", ())
                            if largest < num_seqs]
    return max(split_workspace_size(n, num_q_heads, head_size_v, short) for n in batches)


def launch_staged(q, cache, metadata, options, out, params: dict,
                  workspace: torch.Tensor | None = None) -> None:
    """A prefill or mixed plan with ``stage`` (and ``gluon`` reading the cache:
    :func:`_launch_gluon` takes the long sequences where it can, and nothing is staged;
    ``gluon`` reading the staged copy: the Gluon prefill replaces the unified kernel over
    the staged blocks where it can): sequences with at least
    ``heuristics.staged_from`` queries (``stage["min_q"]``, above a mixed batch's short
    tiles) have their keys staged (:func:`stage_kv`) and read as
    ``kv_load.STAGED_KV_LOAD`` says (``params["stage_kv_load"]`` overrides it in
    measurements): rows of 3-D descriptors built on the host by default; pointer loads
    through the staged block table where a descriptor launch fails, unless the plan
    forces descriptors (``_kv_load_forced``, as the gate and the tests do). The others read
    the cache as the plan says: the short tiles of a mixed batch, and (where a batch can
    hold them) sequences between the short tiles and ``staged_from``, in a launch of the
    plan's long tile. A call whose tokens cannot make a staged sequence, or whose staging
    workspace would pass ``heuristics.STAGE_MAX_BYTES``, reads the cache throughout."""
    if reads_cache(params) and _launch_gluon(q, cache, metadata, options, out, params,
                                             workspace):
        return
    num_seqs = metadata.seq_lens.shape[0]
    short_q = _short_q(params)
    scales = stages_scales(cache.quant.per_token_head, q.dtype)
    dims = (cache.num_kv_heads, cache.head_size_qk, cache.head_size_v)
    slots = staging_slots(params, num_seqs, q.shape[0], *dims, scales)
    if not slots:
        _with_kv_loads(q, cache, metadata, options, out, params,
                       lambda args, p: _launch_modes(q, cache, metadata, out, p, args,
                                                     workspace))
        return
    split = align16(_split_size(num_seqs, q.shape[1], cache.head_size_v, params))
    need = split + stage_workspace_size(num_seqs, slots, *dims, params["stage"], scales)
    if workspace is None or not has_room(workspace, need):
        workspace = new_workspace(need, q.device)
    stage_from = _long_from(params["stage"], short_q, num_seqs)
    data = workspace[MERGE_TICKETS:]  # after the merge tickets, split partials first
    staged, staged_meta = stage_kv(q, cache, metadata, options, params["stage"], stage_from,
                                   slots, data[split:need])
    _launch_over_cache(q, cache, metadata, options, out, params, workspace, short_q,
                       stage_from)
    if params.get("gluon") and not reads_cache(params) and _try_gluon(
            q, staged, staged_meta, options, out, params, stage_from, "staged", cache):
        return
    long = params["stage_long"]
    _with_kv_loads(q, staged, staged_meta, options, out,
                   {"long": long,
                    "kv_load": params.get("stage_kv_load", kv_load_rules.STAGED_KV_LOAD),
                    "_kv_load_forced": bool(params.get("_kv_load_forced"))},
                   lambda args, p: _launch_long(_host_descriptors(args, staged, long), q,
                                                staged, staged_meta, long, stage_from - 1))


#: Gluon prefill launches that raised in auto mode, by :func:`gluon_class_key`: those
#: calls stage their keys (and run the unified kernel over them) from then on, in this
#: process, and plans made after the failure say so (``backends.gluon_rules``).
GLUON_FAILED: dict[tuple, str] = {}


def gluon_class_key(q_dtype, head_size: int, block_size: int, causal: bool, reads: str,
                    sliding_window: bool, softcap: bool, alibi: str, sinks: bool,
                    quant_mode: str) -> tuple:
    """The class of a Gluon prefill launch in :data:`GLUON_FAILED`: q dtype, head and
    block size, causal, what it reads (``"cache"`` / ``"staged"``), the score features
    used (``alibi``: ``"none"`` / ``"linear"`` / ``"sqrt"``) and the cache's quant mode."""
    return (q_dtype, head_size, block_size, bool(causal), reads, bool(sliding_window),
            bool(softcap), alibi, bool(sinks), quant_mode)


def _forget_plans() -> None:
    """Decisions and plans made while a kernel was thought to work (a routing that chose
    our backend for it among them) are made again at the next call; plans the caller
    holds (:func:`portattn.plan`) keep theirs, whose launches take the other way (staging
    for a Gluon failure, pointer loads for a descriptor one) from then on."""
    from portattn import planning
    from portattn.dispatch.selector import decision_cache

    decision_cache.clear()
    planning.forget_plans()


def reads_cache(params: dict) -> bool:
    """Whether a plan's long sequences go to the Gluon prefill over the paged cache
    itself (``params["gluon"]["reads"]`` ``"cache"``), nothing staged."""
    return bool(params.get("gluon")) and params["gluon"]["reads"] == "cache"


def _launch_gluon(q, cache, metadata, options, out, params: dict, workspace) -> bool:
    """A staged plan's long sequences (``params["gluon"]["min_q"]`` queries or more, above
    a mixed batch's short tiles) through the Gluon prefill over the cache itself
    (:mod:`portattn.kernels.gluon_launch`), the others as :func:`launch_staged` serves
    them; every sequence where the call's tokens and ``metadata.max_seqlen_q`` leave none
    of them fewer queries than that (:func:`heuristics.fewest_queries`: a 4 x 2048
    prefill is one launch, not three). False (nothing launched; the caller stages
    instead) where :func:`_try_gluon` launched nothing."""
    short_q = _short_q(params)
    num_seqs = metadata.seq_lens.shape[0]
    if fewest_queries(q.shape[0], num_seqs, metadata.max_seqlen_q) >= \
            staged_from(params["gluon"], short_q):
        # no sequence can be short of the kernel's share: it takes every one (whatever
        # cu_seqlens_q says, so an understated hint leaves no row unwritten) and nothing
        # reads the cache beside it (no launches of programs that would all return)
        return _try_gluon(q, cache, metadata, options, out, params, 1, "cache")
    min_q = _long_from(params["gluon"], short_q, num_seqs)
    if not _try_gluon(q, cache, metadata, options, out, params, min_q, "cache"):
        return False
    _launch_over_cache(q, cache, metadata, options, out, params, workspace, short_q, min_q)
    return True


def _try_gluon(q, cache, metadata, options, out, params: dict, min_q: int,
               reads: str, paged=None) -> bool:
    """The Gluon prefill of the sequences with ``min_q`` queries or more over ``cache``
    (the paged cache, or the staged copy and ``metadata`` pointing into it; ``paged``:
    then the call's own cache, whose block size and quant mode class a failure as
    ``gluon_rules.gluon_failure`` looks it up, by the problem's). False
    (nothing launched) for a call with no tokens or an empty block table, where these
    tensors cannot back its descriptors, and in auto where the launch raises now or
    raised before for this class (remembered); forced (``_gluon_forced``,
    ``PORTATTN_GLUON=1``) a tensor reason is an ``InputError`` and a launch error is
    raised."""
    from portattn.kernels import gluon_launch

    if q.shape[0] == 0 or metadata.block_table.shape[1] == 0:
        return False  # nothing to attend, or nothing the kernel could read
    forced = bool(params.get("_gluon_forced"))
    why = gluon_launch.tensor_reasons(q, cache, out)
    if why:
        if forced:
            raise InputError("q / cache / out", "tensors the Gluon prefill's descriptors "
                             "can read (PORTATTN_GLUON=1 forces it)", "; ".join(why))
        return False
    paged = cache if paged is None else paged
    key = gluon_class_key(q.dtype, q.shape[2], paged.block_size, options.causal, reads,
                          options.sliding_window is not None, options.softcap is not None,
                          options.alibi, options.sinks is not None, paged.quant.mode)
    if key in GLUON_FAILED and not forced:
        return False
    try:
        gluon_launch.launch_gluon_prefill(q, cache, metadata, options, out, min_q)
    except Exception as exc:
        if forced:
            raise
        _remember_failure(GLUON_FAILED, key, exc, "the Gluon prefill failed, staged prefill "
                          "used instead for this class")
        _forget_plans()
        return False
    return True


def _long_from(part: dict, short_q: int, num_seqs: int) -> int:
    """The fewest queries of a sequence that a plan's long launch (staged or Gluon, its
    ``part`` of the plan with ``min_q``) serves. One sequence (q's rows allow it
    ``min_q`` queries) is served whatever ``cu_seqlens_q`` says it has, so no launch over
    the cache is needed for it."""
    return staged_from(part, short_q) if num_seqs > 1 else short_q + 1


def _launch_over_cache(q, cache, metadata, options, out, params: dict, workspace,
                       short_q: int, long_from: int) -> None:
    """The parts of a staged plan that read the cache in the loop: a mixed batch's short
    tiles, and the sequences of more than ``short_q`` and fewer than ``long_from`` queries
    (when there can be any) in a launch of the plan's long tile."""
    mixed = params["mode"] == "mixed"
    middle = long_from > short_q + 1
    if mixed or middle:
        def over_cache(args, p):
            if mixed:
                _launch_short(args, q, cache, metadata, out, p["short"], True, workspace)
            if middle:
                _launch_long(args, q, cache, metadata, p["long"], short_q, long_from)
        _with_kv_loads(q, cache, metadata, options, out, params, over_cache)


def _host_descriptors(args: dict, staged, cfg: dict) -> dict:
    """``args`` with the staged K/V as host-built 3-D descriptors ``[rows, num_kv_heads,
    HEAD]`` (box ``[BLOCK_N, 1, HEAD_PAD]``) where the launch reads them so
    (``KV_LOAD`` 3); unchanged otherwise."""
    if args.get("KV_LOAD") != kv_load_rules.KV_LOAD_CODES["staged_host"]:
        return args
    from triton.tools.tensor_descriptor import TensorDescriptor

    def rows(t, pad):  # [num_blocks, block, heads, head] with blocks back to back
        if t.stride(0) != t.shape[1] * t.stride(1) or t.numel() >= 2 ** 31:
            raise ValueError(f"staged tensor of shape {tuple(t.shape)} and strides "
                             f"{t.stride()} is not rows of int32-addressable blocks")
        return TensorDescriptor(t, [t.shape[0] * t.shape[1], t.shape[2], t.shape[3]],
                                [t.stride(1), t.stride(2), 1], [cfg["block_n"], 1, pad])
    return dict(args, k_ptr=rows(staged.key_cache, args["HEAD_QK_PAD"]),
                v_ptr=rows(staged.value_cache, args["HEAD_V_PAD"]))


#: Descriptor launches that raised in auto mode (e.g. a compile failure in a feature
#: combination the functional gate's tiny problem did not cover), by the kernel's
#: switches and tiles: they run pointer loads from then on, in this process.
DESCRIPTOR_FAILED: dict[tuple, str] = {}


#: The same failures by the problem class a plan chose descriptor loads for
#: (:func:`descriptor_class_key`): plans made after one take pointer loads for that class,
#: with the failure as their reason (``backends.triton_kv_load.choose_kv_load``).
DESCRIPTOR_CLASS_FAILED: dict[tuple, str] = {}


def descriptor_class_key(params: dict, q_dtype, num_q_heads: int, num_kv_heads: int,
                         head_size_qk: int, head_size_v: int, block_size: int, causal: bool,
                         sliding_window: bool, softcap: bool, alibi: str, sinks: bool,
                         quant_mode: str, out_dtype) -> tuple:
    """The class of a plan's descriptor launch in :data:`DESCRIPTOR_CLASS_FAILED`: the
    plan's launch mode and tiles (its descriptor ``params``), q dtype, head counts, head
    and block sizes, the score features used (``alibi``: ``"none"`` / ``"linear"`` /
    ``"sqrt"``), the cache's quant mode and the output dtype: what picks the kernel's
    switches, so a failure turns off only the variants that can meet it."""
    # the tiles as planned (a launch drops the register cap where V pairs cannot run)
    return (params["mode"], _tiles(params, ("segments_upto", "maxnreg")), q_dtype,
            num_q_heads, num_kv_heads, head_size_qk, head_size_v, block_size, bool(causal),
            bool(sliding_window), bool(softcap), alibi, bool(sinks), quant_mode, out_dtype)


def _descriptor_key(args: dict, params: dict) -> tuple:
    """The kernel's switches and tiles (not ``segments_upto``: a per-batch rule of the
    grid, which compiles nothing of its own and may be lists after a JSON round trip)."""
    switches = tuple(sorted((k, v) for k, v in args.items() if k.isupper()))
    return switches + _tiles(params, ("segments_upto",))


def _tiles(params: dict, left_out: tuple[str, ...]) -> tuple:
    """A plan's tile configs (``short``, ``long``) as sorted items, without ``left_out``."""
    return tuple(tuple(sorted((name, value) for name, value in params[k].items()
                              if name not in left_out))
                 for k in ("short", "long") if k in params)


def _remember_failure(table: dict, key: tuple, exc: Exception, what: str) -> None:
    """Record a launch that failed in auto mode under ``key`` in ``table`` and say so
    (WARNING, ``what: reason``): the same call is rerun the other way, which rewrites
    every output row, and later calls of that key go that way at once."""
    import logging

    from portattn.capabilities._text import one_line

    reason = one_line(exc)
    table[key] = reason
    logging.getLogger("portattn").warning("%s: %s", what, reason)


def descriptor_launch_reasons(cache, params: dict) -> list[str]:
    """Why descriptor K/V loads cannot run on these cache tensors with these tiles."""
    return kv_load_rules.cache_reasons(cache, params)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's global scratch (the descriptors built on the device), from torch's
    caching allocator on the current device (stream-ordered, CUDA-graph safe)."""
    return torch.empty(size, dtype=torch.uint8, device="cuda")


def merge_load_of(cfg: dict, group: int, segments: int, head_v_pad: int) -> int:
    """The ``MERGE_LOAD`` of a split launch of decode tile ``cfg`` that merges in the
    kernel: :func:`unified.merge_load_elements`, its registers tight where the tile caps
    them (``maxnreg``) or has fewer than 4 warps (the narrow split tile)."""
    tight = bool(cfg.get("maxnreg")) or cfg["num_warps"] < 4
    return unified.merge_load_elements(group, next_pow2(segments), head_v_pad, tight)


def ensure_scratch_allocator() -> None:
    """Install :func:`_scratch` as Triton's allocator in this context unless the caller
    set one. Set in the caller's context, not a copy: the fast relaunch path
    (:mod:`.fast_launch`) calls the compiled launcher later, which reads the allocator
    at that moment."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        _allocation.set_allocator(_scratch)


def _launch_modes(q, cache, metadata, out, params, args, workspace) -> None:
    mode = params["mode"]
    if mode == "decode":
        cfg = params["short"]
        if metadata.max_seqlen_q is not None and metadata.max_seqlen_q > cfg["block_q"]:
            raise ValueError(f"plan for at most {cfg['block_q']} queries per sequence used "
                             f"with max_seqlen_q={metadata.max_seqlen_q}")
        _launch_short(args, q, cache, metadata, out, cfg, False, workspace)
    elif mode == "mixed":
        short = params["short"]
        _launch_short(args, q, cache, metadata, out, short, True, workspace)
        _launch_long(args, q, cache, metadata, params["long"], short["block_q"])
    elif mode == "prefill":
        _launch_long(args, q, cache, metadata, params["long"], 0)
    else:
        raise ValueError(f"unknown launch mode {mode!r}")

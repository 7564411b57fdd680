"""Python launchers of the unified kernel: grids, meta-parameters, workspaces.

:func:`launch_unified` turns a public call plus the launch parameters chosen by
:func:`portattn.kernels.heuristics.plan_launch` into one to three kernel launches. It
reads no device value (everything is sized from tensor shapes and the plan), so it never
synchronizes and can be captured in a CUDA graph; the split-KV workspace is allocated per
call with ``torch.empty`` unless the caller passes one (``workspace``: a plan's own
buffer of at least :func:`split_workspace_size` float32 elements).

The kernels are wrapped by :func:`portattn.kernels.fast_launch.capturable` (a no-op
outside :func:`~portattn.kernels.fast_launch.capture`), so plans can record these
launches once and relaunch the compiled kernels cheaply.
"""

from __future__ import annotations

import torch

from portattn.kernels import reduce, unified
from portattn.kernels.fast_launch import capturable
from portattn.kernels.heuristics import next_pow2

unified_attention_kernel = capturable(unified.unified_attention_kernel)
merge_segments_kernel = capturable(reduce.merge_segments_kernel)

ALIBI_CODES = {"none": 0, "linear": 1, "sqrt": 2}


def _common_args(q, cache, metadata, options, out):
    dummy = q
    return dict(
        q_ptr=q, k_ptr=cache.key_cache, v_ptr=cache.value_cache, out_ptr=out,
        block_table_ptr=metadata.block_table, cu_seqlens_q_ptr=metadata.cu_seqlens_q,
        seq_lens_ptr=metadata.seq_lens,
        alibi_ptr=options.alibi_slopes if options.alibi_slopes is not None else dummy,
        sinks_ptr=options.sinks if options.sinks is not None else dummy,
        num_seqs=metadata.seq_lens.shape[0], num_q_heads=q.shape[1],
        scale=float(options.scale),
        softcap=float(options.softcap) if options.softcap is not None else 0.0,
        window=int(options.sliding_window) if options.sliding_window is not None else 0,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_qd=q.stride(2),
        stride_ot=out.stride(0), stride_oh=out.stride(1), stride_od=out.stride(2),
        stride_kb=cache.key_cache.stride(0), stride_ks=cache.key_cache.stride(1),
        stride_kh=cache.key_cache.stride(2), stride_vb=cache.value_cache.stride(0),
        stride_vs=cache.value_cache.stride(1), stride_vh=cache.value_cache.stride(2),
        stride_bt=metadata.block_table.stride(0),
        GROUP=q.shape[1] // cache.num_kv_heads, BLOCK_SIZE=cache.block_size,
        HEAD=q.shape[2], HEAD_PAD=max(16, next_pow2(q.shape[2])),
        CAUSAL=bool(options.causal), USE_WINDOW=options.sliding_window is not None,
        USE_SOFTCAP=options.softcap is not None, ALIBI=ALIBI_CODES[options.alibi],
        USE_SINKS=options.sinks is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )


def split_workspace_size(num_seqs: int, num_q_heads: int, head_size: int, cfg: dict) -> int:
    """float32 elements of the split-KV workspace of a SEQ_MODE 1 launch (0: no split)."""
    if cfg["segments"] <= 1:
        return 0
    rows = num_seqs * cfg["block_q"] * num_q_heads * cfg["segments"]
    return rows * (max(16, next_pow2(head_size)) + 2)


def _launch_short(args, q, cache, metadata, options, out, cfg: dict, workspace=None) -> None:
    """SEQ_MODE 1: one tile per sequence with at most BLOCK_Q queries (2D or 3D)."""
    num_seqs = metadata.seq_lens.shape[0]
    num_kv_heads = cache.num_kv_heads
    segments = cfg["segments"]
    block_q = cfg["block_q"]
    head_pad = args["HEAD_PAD"]
    if segments > 1:  # one workspace: [acc rows x HEAD_PAD | m | l]
        rows = num_seqs * block_q * q.shape[1] * segments
        size = rows * (head_pad + 2)
        if workspace is not None and workspace.numel() >= size:
            work = workspace
        else:
            work = torch.empty(size, dtype=torch.float32, device=q.device)
        part_acc = work[:rows * head_pad]
        part_m = work[rows * head_pad:rows * (head_pad + 1)]
        part_l = work[rows * (head_pad + 1):]
    else:
        part_m = part_l = part_acc = q
    unified_attention_kernel[(num_seqs, num_kv_heads, segments)](
        part_m_ptr=part_m, part_l_ptr=part_l, part_acc_ptr=part_acc,
        BLOCK_M=cfg["block_m"], BLOCK_Q=block_q, BLOCK_N=cfg["block_n"], SEQ_MODE=1,
        SHORT_Q=0, SPLIT=segments > 1, num_segments=segments, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **args)
    if segments > 1:
        merge_segments_kernel[(num_seqs, q.shape[1], block_q)](
            part_m, part_l, part_acc, out, metadata.cu_seqlens_q,
            args["sinks_ptr"], q.shape[1], out.stride(0), out.stride(1), out.stride(2),
            BLOCK_Q=block_q, NUM_SEGMENTS=segments, HEAD=args["HEAD"], HEAD_PAD=head_pad,
            USE_SINKS=args["USE_SINKS"], num_warps=4 if head_pad * segments >= 4096 else 2)


def _launch_long(args, q, cache, metadata, out, cfg: dict, short_q: int) -> None:
    """SEQ_MODE 0 (every sequence) or 2 (sequences with more than ``short_q`` queries)."""
    num_seqs = metadata.seq_lens.shape[0]
    block_q = cfg["block_q"]
    tiles = q.shape[0] // block_q + num_seqs
    unified_attention_kernel[(tiles, cache.num_kv_heads, 1)](
        part_m_ptr=q, part_l_ptr=q, part_acc_ptr=q,
        BLOCK_M=cfg["block_m"], BLOCK_Q=block_q, BLOCK_N=cfg["block_n"],
        SEQ_MODE=2 if short_q > 0 else 0, SHORT_Q=short_q, SPLIT=False, num_segments=1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **args)


def launch_unified(q: torch.Tensor, cache, metadata, options, out: torch.Tensor,
                   params: dict, workspace: torch.Tensor | None = None) -> None:
    """Run the unified kernel(s) as ``params`` (from ``plan_launch``) says; writes ``out``.
    ``workspace``: a float32 buffer for the split-KV partials (allocated here when None
    or too small)."""
    args = _common_args(q, cache, metadata, options, out)
    mode = params["mode"]
    if mode == "decode":
        cfg = params["short"]
        if metadata.max_seqlen_q is not None and metadata.max_seqlen_q > cfg["block_q"]:
            raise ValueError(f"plan for at most {cfg['block_q']} queries per sequence used "
                             f"with max_seqlen_q={metadata.max_seqlen_q}")
        _launch_short(args, q, cache, metadata, options, out, cfg, workspace)
    elif mode == "mixed":
        short = params["short"]
        _launch_short(args, q, cache, metadata, options, out, short, workspace)
        _launch_long(args, q, cache, metadata, out, params["long"], short["block_q"])
    elif mode == "prefill":
        _launch_long(args, q, cache, metadata, out, params["long"], 0)
    else:
        raise ValueError(f"unknown launch mode {mode!r}")

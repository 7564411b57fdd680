"""Experiment (issue 10): decode over an fp8 per-tensor cache with several kv heads'
queries packed block-diagonally into one 16-row tile.

The unified kernel's decode tile holds one kv head's query group: 16 rows of which a
GQA-4 model fills 4, so the online softmax runs on 4x the scores it needs. Here one
program takes ``HPP`` consecutive kv heads: q is a 16 x (HPP * D) tile whose row r (query
head ``r // GQA`` of the program's group) is zero outside its own kv head's D columns, K
is read as (BLOCK_N, HPP * D) rows (the heads are adjacent in a slot), so Q K^T gives
every row its own head's scores and all HPP * GQA rows are real. P V is computed against
all HPP heads' V columns and each row keeps its own block on the way out. Same tensor
core work per key as the unified kernel (its padding rows become zero columns), 1/HPP of
the softmax work per key; HPP times fewer programs, so the keys are split over more
segments, merged by a second kernel.

V is read as int16 pairs of codes and split in registers (the package's ``decode_pairs``,
as the unified kernel's ``V_PAIRS``). Decode only, no features; the question is only
whether the softmax's share of the loop is what keeps fp8 from 0.55x of bf16.

    PYTHONPATH=src python3 benchmarks/packed_heads_experiment.py           # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/packed_heads_experiment.py --check
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

from portattn.kernels.byte_decode import decode_pairs

LOG2E = 1.4426950408889634


@triton.jit
def _packed_tile(t, acc_e, acc_o, m_i, l_i, q, seq_len, bt_row, k_ptr, v_ptr, kv_col0,
                 stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, cols, cols2,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
                 ASM: tl.constexpr):
    kpos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        ok = kpos < seq_len
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        k_t = tl.load(k_ptr + (blk * stride_kb + (kpos % BLOCK_SIZE) * stride_ks)[None, :]
                      + kv_col0 + cols[:, None], mask=ok[None, :], other=0.0)
        v = tl.load(v_ptr + (blk * stride_vb + (kpos % BLOCK_SIZE) * stride_vs)[:, None]
                    + kv_col0 // 2 + cols2[None, :], mask=ok[:, None], other=0)
    else:
        blk = tl.load(bt_row + kpos // BLOCK_SIZE).to(tl.int64)
        k_t = tl.load(k_ptr + (blk * stride_kb + (kpos % BLOCK_SIZE) * stride_ks)[None, :]
                      + kv_col0 + cols[:, None])
        v = tl.load(v_ptr + (blk * stride_vb + (kpos % BLOCK_SIZE) * stride_vs)[:, None]
                    + kv_col0 // 2 + cols2[None, :])
    s = tl.dot(q, k_t.to(tl.float16)) * qk_scale
    if MASKED:
        s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_even, v_odd = decode_pairs(v, 4, ASM)
    p16 = p.to(tl.float16)
    acc_e = tl.dot(p16, v_even, acc_e * alpha[:, None])
    acc_o = tl.dot(p16, v_odd, acc_o * alpha[:, None])
    return acc_e, acc_o, m_new, l_i


@triton.jit
def packed_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_ptr,
                         ml_ptr, qk_scale, v_scale, stride_qt, stride_qh, stride_kb,
                         stride_ks, stride_vb, stride_vs, stride_bt, num_seqs,
                         NUM_Q_HEADS: tl.constexpr, GQA: tl.constexpr, HPP: tl.constexpr,
                         D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         SEGMENTS: tl.constexpr, ASM: tl.constexpr):
    """Grid (sequence, group of ``HPP`` kv heads, segment). ``q``: [T, Hq, D] (one query
    per sequence); K: [blocks, BLOCK_SIZE, Hkv, D] e4m3fn; V: the same cache read as int16
    pairs [blocks, BLOCK_SIZE, Hkv, D // 2]. Rows: 16 = up to ``HPP * GQA`` query heads.
    ``qk_scale`` holds log2(e), the softmax scale and the K scale. With ``SEGMENTS`` 1 the
    output is written; otherwise fp32 partials [S, seq, Hq, D] and (m, l) [S, seq, Hq, 2]."""
    seq = tl.program_id(0)
    grp = tl.program_id(1)
    seg = tl.program_id(2)
    W: tl.constexpr = HPP * D
    rows = tl.arange(0, 16)
    row_head = rows // GQA
    row_ok = rows < HPP * GQA
    qh = grp * HPP * GQA + rows
    cols = tl.arange(0, W)
    cols2 = tl.arange(0, W // 2)
    qmask = row_ok[:, None] & ((cols // D)[None, :] == row_head[:, None])
    q = tl.load(q_ptr + seq * stride_qt + qh[:, None] * stride_qh + (cols % D)[None, :],
                mask=qmask, other=0.0).to(tl.float16)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    per_seg = tl.cdiv(num_tiles, SEGMENTS)
    t0 = seg * per_seg
    t1 = tl.minimum(t0 + per_seg, num_tiles)
    full_end = tl.minimum(t1, seq_len // BLOCK_N)
    bt_row = bt_ptr + seq * stride_bt
    kv_col0 = grp * W
    m_i = tl.full([16], float("-inf"), tl.float32)
    l_i = tl.zeros([16], tl.float32)
    acc_e = tl.zeros([16, W // 2], tl.float32)
    acc_o = tl.zeros([16, W // 2], tl.float32)
    for t in tl.range(t0, full_end):
        acc_e, acc_o, m_i, l_i = _packed_tile(
            t, acc_e, acc_o, m_i, l_i, q, seq_len, bt_row, k_ptr, v_ptr, kv_col0,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, cols, cols2, BLOCK_N,
            BLOCK_SIZE, False, ASM)
    for t in tl.range(tl.maximum(full_end, t0), t1):
        acc_e, acc_o, m_i, l_i = _packed_tile(
            t, acc_e, acc_o, m_i, l_i, q, seq_len, bt_row, k_ptr, v_ptr, kv_col0,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, cols, cols2, BLOCK_N,
            BLOCK_SIZE, True, ASM)
    # each row keeps its own head's columns: even column c of the tile is 2c
    col_e = 2 * cols2
    keep = row_ok[:, None] & ((col_e // D)[None, :] == row_head[:, None])
    d_e = col_e % D
    if SEGMENTS == 1:
        inv = v_scale / l_i
        base = out_ptr + (seq * NUM_Q_HEADS + qh[:, None]) * D
        tl.store(base + d_e[None, :], (acc_e * inv[:, None]).to(tl.bfloat16), mask=keep)
        tl.store(base + d_e[None, :] + 1, (acc_o * inv[:, None]).to(tl.bfloat16), mask=keep)
    else:
        slot = (seg * num_seqs + seq) * NUM_Q_HEADS + qh
        base = part_ptr + slot[:, None].to(tl.int64) * D
        tl.store(base + d_e[None, :], acc_e, mask=keep)
        tl.store(base + d_e[None, :] + 1, acc_o, mask=keep)
        tl.store(ml_ptr + slot * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + slot * 2 + 1, l_i, mask=row_ok)


@triton.jit
def merge_kernel(part_ptr, ml_ptr, out_ptr, v_scale, num_seqs, NUM_Q_HEADS: tl.constexpr,
                 D: tl.constexpr, SEGMENTS: tl.constexpr):
    """Grid (sequence, query head): the segments' partials combined."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    segs = tl.arange(0, SEGMENTS)
    slot = (segs * num_seqs + seq) * NUM_Q_HEADS + h
    m = tl.load(ml_ptr + slot * 2)
    lv = tl.load(ml_ptr + slot * 2 + 1)
    m_all = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.math.exp2(m - m_all), 0.0)
    d = tl.arange(0, D)
    parts = tl.load(part_ptr + slot[:, None].to(tl.int64) * D + d[None, :])
    acc = tl.sum(parts * w[:, None], 0)
    den = tl.sum(lv * w, 0)
    tl.store(out_ptr + (seq * NUM_Q_HEADS + h) * D + d, (acc * v_scale / den).to(tl.bfloat16))


def make_problem(num_seqs: int, seq_len: int, hq: int, hkv: int, d: int, block_size: int,
                 device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = math.ceil(seq_len / block_size)
    total = num_seqs * nb
    k = (torch.randn(total + 1, block_size, hkv, d, generator=gen, device=device) * 2)
    v = (torch.randn(total + 1, block_size, hkv, d, generator=gen, device=device) * 2)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    perm = torch.randperm(total, generator=gen, device=device).to(torch.int32)
    table = perm.reshape(num_seqs, nb).contiguous()
    q = torch.randn(num_seqs, hq, d, generator=gen, device=device).to(torch.bfloat16)
    lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    return q, k8, v8, table, lens


def reference(q, k8, v8, table, lens, k_scale, v_scale, block_size):
    """float64 attention over the dequantized cache (plain casts, per sequence)."""
    hq, hkv = q.shape[1], k8.shape[2]
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        rows = table[b, :math.ceil(n / block_size)].long()
        kk = k8[rows].double().reshape(-1, hkv, k8.shape[3])[:n] * k_scale
        vv = v8[rows].double().reshape(-1, hkv, v8.shape[3])[:n] * v_scale
        kk = kk.repeat_interleave(hq // hkv, 1)
        vv = vv.repeat_interleave(hq // hkv, 1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), kk) / math.sqrt(q.shape[2])
        outs.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vv))
    return torch.stack(outs)


class Packed:
    """One configuration of the experiment kernel, with its workspaces."""

    def __init__(self, q, k8, v8, table, lens, k_scale, v_scale, block_size, hpp,
                 block_n, segments, num_warps, num_stages, asm=True, maxnreg=None):
        self.q, self.k8, self.table, self.lens = q, k8, table, lens
        self.v16 = v8.view(torch.int16)
        self.hq, self.hkv, self.d = q.shape[1], k8.shape[2], k8.shape[3]
        self.cfg = dict(hpp=hpp, block_n=block_n, segments=segments, num_warps=num_warps,
                        num_stages=num_stages)
        self.extra = {"maxnreg": maxnreg} if maxnreg else {}
        self.block_size, self.asm = block_size, asm
        self.qk_scale = LOG2E * k_scale / math.sqrt(self.d)
        self.v_scale = v_scale
        n = q.shape[0]
        self.out = torch.full_like(q, float("nan"))
        self.part = torch.empty(segments, n, self.hq, self.d, device=q.device)
        self.ml = torch.empty(segments, n, self.hq, 2, device=q.device)

    def __call__(self):
        c = self.cfg
        n = self.q.shape[0]
        packed_decode_kernel[(n, self.hkv // c["hpp"], c["segments"])](
            self.q, self.k8, self.v16, self.table, self.lens, self.out, self.part, self.ml,
            self.qk_scale, self.v_scale, self.q.stride(0), self.q.stride(1),
            self.k8.stride(0), self.k8.stride(1), self.v16.stride(0), self.v16.stride(1),
            self.table.stride(0), n, NUM_Q_HEADS=self.hq, GQA=self.hq // self.hkv,
            HPP=c["hpp"], D=self.d, BLOCK_N=c["block_n"], BLOCK_SIZE=self.block_size,
            SEGMENTS=c["segments"], ASM=self.asm, num_warps=c["num_warps"],
            num_stages=c["num_stages"], **self.extra)
        if c["segments"] > 1:
            merge_kernel[(n, self.hq)](self.part, self.ml, self.out, self.v_scale, n,
                                       NUM_Q_HEADS=self.hq, D=self.d,
                                       SEGMENTS=c["segments"], num_warps=4)
        return self.out


def check_cpu() -> int:
    """Interpreter: every HPP with and without segments against the float64 oracle."""
    worst = 0.0
    for hpp, segments, seq_len in [(1, 1, 40), (2, 2, 37), (4, 4, 50)]:
        hkv = 2 * hpp if hpp < 4 else 4
        q, k8, v8, table, lens = make_problem(2, seq_len, 4 * hkv, hkv, 16, 8, "cpu")
        lens[1] = seq_len - 5
        ref = reference(q, k8, v8, table, lens, 0.7, 1.3, 8)
        got = Packed(q, k8, v8, table, lens, 0.7, 1.3, 8, hpp, 16, segments, 4, 2,
                     asm=False)()
        err = (got.double() - ref).abs().max().item()
        print(f"hpp {hpp} segments {segments}: max err {err:.4f}")
        worst = max(worst, err)
    return 0 if worst < 0.05 else 1


def main(argv: list[str]) -> int:
    if "--check" in argv:
        return check_cpu()
    import portattn
    from portattn.bench import GraphTimer, build_inputs, default_cases, measure_ceilings

    graph = GraphTimer()
    copy = measure_ceilings("cuda", lambda fn: triton.testing.do_bench(
        fn, return_mode="median"))["copy_tbs"]
    cases = {c.name: c for c in default_cases()}
    rows = []
    for num_seqs in [int(x) for x in os.environ.get("EXP_BATCHES", "32,8,128").split(",")]:
        seq_len, hq, hkv, d, bs = 8192, 32, 8, 128, 16
        kv_bytes = num_seqs * seq_len * hkv * d * 2
        for quant in (None, "fp8_per_tensor"):
            case = cases[f"decode-{num_seqs}x8192" + ("-fp8" if quant else "")]
            inp = build_inputs(case, num_q_heads=hq, num_kv_heads=hkv, head_size=d,
                               block_size=bs, dtype=torch.bfloat16, device="cuda")
            fn = (lambda i=inp: portattn.attention(i.q, i.cache, i.metadata, out=i.out))
            fn()
            us = graph(fn) * 1e3
            by = kv_bytes * (2 if quant is None else 1)
            rows.append({"batch": num_seqs, "variant": f"package-{quant or 'bf16'}",
                         "us": us, "copy_frac": by / (us * 1e-6) / 1e12 / copy})
            print(rows[-1], flush=True)
            if quant:  # fp8 q over the same cache: QK^T on fp8 tensor cores, no K cast
                q8 = (inp.q.float() / 0.05).to(torch.float8_e4m3fn)
                out = torch.empty_like(inp.out)
                fn = (lambda i=inp: portattn.attention(q8, i.cache, i.metadata, q_scale=0.05,
                                                       out=out))
                fn()
                us = graph(fn) * 1e3
                rows.append({"batch": num_seqs, "variant": "package-fp8-q-fp8_per_tensor",
                             "us": us, "copy_frac": by / (us * 1e-6) / 1e12 / copy})
                print(rows[-1], flush=True)
            del inp
        q, k8, v8, table, lens = make_problem(num_seqs, seq_len, hq, hkv, d, bs, "cuda")
        ref = reference(q[:2], k8, v8, table[:2], lens[:2], 0.05, 0.07, bs)
        scale_ref = ref.abs().max().item()
        # (hpp, block_n, segments, warps, stages, maxnreg): EXP_CONFIGS="1/128/2/4/2/128;..."
        configs = [tuple(int(x) for x in c.split("/")) for c in os.environ.get(
            "EXP_CONFIGS", "1/128/2/4/2/0;2/128/2/4/2/0;4/64/4/4/2/0").split(";")]
        for hpp, bn, seg, warps, stages, maxnreg in configs:
            run = Packed(q, k8, v8, table, lens, 0.05, 0.07, bs, hpp, bn, seg, warps,
                         stages, maxnreg=maxnreg or None)
            try:
                out = run()
                torch.cuda.synchronize()
                err = (out[:2].double() - ref).abs().max().item() / scale_ref
                us = graph(run) * 1e3
            except Exception as exc:  # a configuration that does not compile
                print(f"hpp {hpp} bn {bn} seg {seg} w {warps}: {type(exc).__name__} "
                      f"{str(exc)[:200]}", flush=True)
                continue
            rows.append({"batch": num_seqs, "variant": f"packed hpp{hpp} bn{bn} seg{seg} "
                         f"w{warps} s{stages} r{maxnreg}", "us": us, "err": err,
                         "copy_frac": kv_bytes / (us * 1e-6) / 1e12 / copy})
            print(rows[-1], flush=True)
        del q, k8, v8, table, lens
        torch.cuda.empty_cache()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_tbs": copy, "rows": rows},
                     indent=1))
    for r in sorted(rows, key=lambda r: (r["batch"], r["us"])):
        print(f"{r['batch']:4d} {r['variant']:<32} {r['us']:8.1f} us "
              f"{r['copy_frac']:5.2f} copy  err {r.get('err', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

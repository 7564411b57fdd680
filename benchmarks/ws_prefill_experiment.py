"""Issue 14 experiment: does Triton 3.6's Hopper warp specialization (``tl.range(...,
warp_specialize=True)``: one producer warp group issuing TMA copies, two consumer warp
groups of 64 query rows each, ``setmaxnreg`` 40 / 232) bring a causal prefill loop to
FlashAttention's speed? Measured against the same loop unspecialized and SDPA (cuDNN,
flash) on contiguous K/V, in one run.

The kernel is an experiment, not the package's: causal prefill over dense keys (what the
staged prefill reads: sequence ``b``'s key ``k`` at row ``b * seq_len + k`` of
``[rows, num_kv_heads * HEAD]``), one program per (query tile, query head, sequence),
heaviest query tiles first, every load a host-built 2-D tensor descriptor. Why this
shape: offline compiles for sm90 (NOTES.md, session 12) showed Triton's Hopper pass
specializes such a loop only at ``num_warps=4`` and gives up silently on an ``if`` with
an else branch in the function, an early return, or a pointer-loaded q, all of which
the unified kernel has. Switches:

* ``WS``: ``warp_specialize`` on the key loops (``num_warps`` must be 4 then);
* ``SPLIT_DIAG``: 1: the unmasked tiles in one loop and the diagonal tiles in a second
  (Triton 3.6's pass fails on two specialized loops), 2: the same with the second loop
  not specialized; 0: one loop with a branch-free causal mask on every tile; 3: one
  loop, no mask (a timing bound: wrong on the diagonal tiles).

    PYTHONPATH=src python3 benchmarks/ws_prefill_experiment.py [--compile-only]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _causal_tiles(acc, m_i, l_i, q, k_desc, v_desc, row0, kv_col, lo, hi, n_full, qk_scale,
                  q_pos, BLOCK_N: tl.constexpr, MASK: tl.constexpr, WS: tl.constexpr):
    """Key tiles ``[lo, hi)`` through the online softmax (base 2). ``MASK``: 0 none,
    1 causal, 2 causal on tiles from ``n_full`` on (branch-free select on every tile)."""
    for j in tl.range(lo, hi, warp_specialize=WS):
        k = k_desc.load([row0 + j * BLOCK_N, kv_col])
        v = v_desc.load([row0 + j * BLOCK_N, kv_col])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK > 0:
            k_pos = j * BLOCK_N + tl.arange(0, BLOCK_N)
            keep = k_pos[None, :] <= q_pos[:, None]
            if MASK == 2:
                keep = keep | (j < n_full)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def ws_causal_prefill_kernel(q_src, k_src, v_src, out_ptr, seq_len, num_tiles, qk_scale,
                             stride_ot, rows, num_q_heads, num_kv_heads, GROUP: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
                             WS: tl.constexpr, SPLIT_DIAG: tl.constexpr,
                             DEVICE_DESC: tl.constexpr):
    """Causal prefill, equal-length sequences of ``seq_len`` (a multiple of BLOCK_M).

    Layout: q / out ``[num_seqs * seq_len, num_q_heads * HEAD]``, K / V ``[num_seqs *
    seq_len, num_kv_heads * HEAD]`` (descriptor boxes ``[BLOCK_M, HEAD]`` /
    ``[BLOCK_N, HEAD]``). Grid ``(num_tiles, num_q_heads, num_seqs)``, query tiles in
    reverse order (the longest first). ``DEVICE_DESC``: ``*_src`` are pointers to
    contiguous tensors and the descriptors are built here (else host descriptors)."""
    if DEVICE_DESC:
        q_desc = tl.make_tensor_descriptor(q_src, shape=[rows, num_q_heads * HEAD],
                                           strides=[num_q_heads * HEAD, 1],
                                           block_shape=[BLOCK_M, HEAD])
        k_desc = tl.make_tensor_descriptor(k_src, shape=[rows, num_kv_heads * HEAD],
                                           strides=[num_kv_heads * HEAD, 1],
                                           block_shape=[BLOCK_N, HEAD])
        v_desc = tl.make_tensor_descriptor(v_src, shape=[rows, num_kv_heads * HEAD],
                                           strides=[num_kv_heads * HEAD, 1],
                                           block_shape=[BLOCK_N, HEAD])
    else:
        q_desc = q_src
        k_desc = k_src
        v_desc = v_src
    tile = num_tiles - 1 - tl.program_id(0)
    head = tl.program_id(1)
    row0 = tl.program_id(2) * seq_len
    kv_col = (head // GROUP) * HEAD
    q = q_desc.load([row0 + tile * BLOCK_M, head * HEAD])
    q_pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], tl.float32)
    n_full = (tile * BLOCK_M) // BLOCK_N  # tiles every row sees whole
    hi = ((tile + 1) * BLOCK_M + BLOCK_N - 1) // BLOCK_N
    if (SPLIT_DIAG == 1) | (SPLIT_DIAG == 2):
        acc, m_i, l_i = _causal_tiles(acc, m_i, l_i, q, k_desc, v_desc, row0, kv_col, 0,
                                      n_full, n_full, qk_scale, q_pos, BLOCK_N, 0, WS)
        acc, m_i, l_i = _causal_tiles(acc, m_i, l_i, q, k_desc, v_desc, row0, kv_col,
                                      n_full, hi, n_full, qk_scale, q_pos, BLOCK_N, 1,
                                      WS and SPLIT_DIAG == 1)
    else:  # 3: no mask at all (a timing bound, wrong on the diagonal tiles)
        acc, m_i, l_i = _causal_tiles(acc, m_i, l_i, q, k_desc, v_desc, row0, kv_col, 0,
                                      hi, n_full, qk_scale, q_pos, BLOCK_N,
                                      2 if SPLIT_DIAG == 0 else 0, WS)
    acc = acc / l_i[:, None]
    offs_d = tl.arange(0, HEAD)
    rows = row0 + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_ot + head * HEAD + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty))


#: name -> (WS, SPLIT_DIAG, num_warps, num_stages, BLOCK_N or None: per head size below,
#: DEVICE_DESC: Triton's Hopper pass is said not to split rows between consumers with
#: host descriptors, triton-lang/triton#7658)
VARIANTS = {
    "plain-8w-split-diag": (False, 1, 8, 3, None, False),
    "plain-8w-one-loop": (False, 0, 8, 2, None, False),
    "ws-one-loop": (True, 0, 4, 2, None, True),
    "ws-bound-no-mask": (True, 3, 4, 2, None, True),
    "ws-one-loop-bn64": (True, 0, 4, 2, 64, True),
    "ws-one-loop-host-desc": (True, 0, 4, 2, None, False),
}
#: compiled offline only (the pass fails on them: "PassManager::run failed")
FAILING_VARIANTS = {"ws-split-diag": (True, 1, 4, 2, None, True),
                    "ws-first-loop": (True, 2, 4, 2, None, True)}
#: (name, num_seqs, seq_len, head)
CASES = [("tiny-1x256", 1, 256, 128), ("1x8192", 1, 8192, 128), ("4x2048", 4, 2048, 128),
         ("1x4096", 1, 4096, 128),
         ("4x2048-h256", 4, 2048, 256), ("1x8192-h256", 1, 8192, 256),
         ("4x2048-h64", 4, 2048, 64)]
HQ, HKV, BLOCK_M = 32, 8, 128


def block_n(head: int) -> int:
    return 64 if head > 128 else 128


def compile_offline(head: int, variant: str) -> dict:
    """Compile for sm90 without a GPU; say whether the loop was specialized."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    ws, split, warps, stages, bn, device_desc = {**VARIANTS, **FAILING_VARIANTS}[variant]
    stages = min(stages, 2) if head > 128 else stages
    bn = bn or block_n(head)
    consts = dict(GROUP=HQ // HKV, BLOCK_M=BLOCK_M, BLOCK_N=bn, HEAD=head, WS=ws,
                  SPLIT_DIAG=split, DEVICE_DESC=device_desc)
    sig, attrs = {}, {}
    for i, name in enumerate(ws_causal_prefill_kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name == "q_src" and not device_desc:
            sig[name] = f"tensordesc<bf16[{BLOCK_M}, {head}]>"
        elif name in ("k_src", "v_src") and not device_desc:
            sig[name] = f"tensordesc<bf16[{bn}, {head}]>"
        elif name in ("out_ptr", "q_src", "k_src", "v_src"):
            sig[name] = "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in ("stride_ot", "seq_len", "rows"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn=ws_causal_prefill_kernel, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return dict(specialized="ttg.warp_specialize" in ttgir or "setmaxnreg" in ptx,
                shared=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                tma=ptx.count("cp.async.bulk.tensor"))


def run_variant(q, k, v, out, num_seqs, seq_len, head, variant):
    from triton.tools.tensor_descriptor import TensorDescriptor
    ws, split, warps, stages, bn, device_desc = VARIANTS[variant]
    stages = min(stages, 2) if head > 128 else stages
    bn = bn or block_n(head)
    q2, k2, v2 = (t.view(t.shape[0], -1) for t in (q, k, v))
    if device_desc:  # descriptors built in the kernel, in Triton's global scratch
        triton.set_allocator(lambda size, align, stream: torch.empty(
            size, dtype=torch.int8, device=q.device))
        q_desc, k_desc, v_desc = q2, k2, v2
    else:
        q_desc = TensorDescriptor.from_tensor(q2, [BLOCK_M, head])
        k_desc = TensorDescriptor.from_tensor(k2, [bn, head])
        v_desc = TensorDescriptor.from_tensor(v2, [bn, head])
    num_tiles = seq_len // BLOCK_M
    o2 = out.view(out.shape[0], -1)
    qk_scale = LOG2E / math.sqrt(head)

    def launch():
        ws_causal_prefill_kernel[(num_tiles, HQ, num_seqs)](
            q_desc, k_desc, v_desc, o2, seq_len, num_tiles, qk_scale, o2.stride(0),
            q2.shape[0], HQ, HKV, GROUP=HQ // HKV, BLOCK_M=BLOCK_M, BLOCK_N=bn, HEAD=head,
            WS=ws, SPLIT_DIAG=split, DEVICE_DESC=device_desc, num_warps=warps,
            num_stages=stages)
    return launch


def sdpa_reference(q, k, v, num_seqs, seq_len, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    head = q.shape[-1]
    qb = q.view(num_seqs, seq_len, HQ, head).transpose(1, 2)
    kb = k.view(num_seqs, seq_len, HKV, head).transpose(1, 2)
    vb = v.view(num_seqs, seq_len, HKV, head).transpose(1, 2)
    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def launch():
        with sdpa_kernel(chosen):
            return torch.nn.functional.scaled_dot_product_attention(
                qb, kb, vb, is_causal=True, enable_gqa=True)
    return launch, lambda o: o.transpose(1, 2).reshape(num_seqs * seq_len, HQ, head)


def time_us(fn, rep=30) -> float:
    """Median of CUDA-event timings, one launch each, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    times.sort()
    return times[len(times) // 2]


def measure(variant: str, wanted: list) -> None:
    """One variant (or ``peers``: SDPA cuDNN and flash) over the cases, a JSON line per
    case on stdout as soon as it is measured."""
    for name, num_seqs, seq_len, head in wanted:
        torch.manual_seed(0)
        rows = num_seqs * seq_len
        q = torch.randn(rows, HQ, head, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(rows, HKV, head, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(rows, HKV, head, device="cuda", dtype=torch.bfloat16)
        flops = 4.0 * num_seqs * HQ * head * seq_len * (seq_len + 1) / 2
        entry = {"case": name, "variant": variant, "device": torch.cuda.get_device_name()}
        try:
            if variant == "peers":
                for peer in ("cudnn", "flash"):
                    launch, _ = sdpa_reference(q, k, v, num_seqs, seq_len, peer)
                    entry[f"sdpa-{peer}"] = time_us(launch)
            else:
                ref_launch, ref_view = sdpa_reference(q, k, v, num_seqs, seq_len, "flash")
                ref = ref_view(ref_launch()).float()
                out = torch.full_like(q, float("nan"))
                launch = run_variant(q, k, v, out, num_seqs, seq_len, head, variant)
                launch()
                torch.cuda.synchronize()
                entry["max_err"] = (out.float() - ref).abs().max().item()
                entry["us"] = time_us(launch)
                entry["tflops"] = flops / entry["us"] / 1e6
        except Exception as exc:  # report and go on: this is a probe
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        print("RESULT " + json.dumps(entry), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true",
                        help="compile for sm90 offline and say what specialized")
    parser.add_argument("--cases", default="", help="comma list of case names")
    parser.add_argument("--variant", default="",
                        help="measure this one in this process (else one child each)")
    parser.add_argument("--child-timeout", type=float, default=75.0)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    wanted = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    if args.compile_only:
        for head in sorted({c[3] for c in wanted}):
            for variant in {**VARIANTS, **FAILING_VARIANTS}:
                try:
                    print(head, variant, compile_offline(head, variant), flush=True)
                except Exception as exc:  # report and go on: this is a probe
                    print(head, variant, "FAILED", str(exc).splitlines()[0][:200], flush=True)
        return 0
    if args.variant:
        measure(args.variant, wanted)
        return 0
    # one child per variant: a kernel that hangs (a warp-specialized deadlock) costs
    # its own child's timeout, not the run
    results = {"triton": triton.__version__, "rows": []}
    for variant in ["peers", *VARIANTS]:
        command = [sys.executable, __file__, "--variant", variant]
        if args.cases:
            command += ["--cases", args.cases]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=args.child_timeout)
            stdout, note = done.stdout, (f"exit {done.returncode}" if done.returncode else "")
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            note = f"killed after {args.child_timeout:.0f} s (hung or slow)"
        got = [json.loads(line[7:]) for line in stdout.splitlines()
               if line.startswith("RESULT ")]
        results["rows"] += got
        for entry in got:
            print(json.dumps(entry), flush=True)
        if note:
            print(f"{variant}: {note} after {len(got)} cases", flush=True)
            results["rows"].append({"variant": variant, "note": note})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

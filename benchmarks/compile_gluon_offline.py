"""Compile the Gluon prefill for sm90 on a machine without a GPU, as its launches ask for it:
the check that the installed Triton's Gluon still takes the kernel (Triton 3.9 removed a
TMA call the kernel used; NOTES.md, session 51), before any device run.

    PYTHONPATH=src python benchmarks/compile_gluon_offline.py [--only NAMES]

Each variant is a launch of ``gluon_launch.launch_gluon_prefill``: its descriptors are
built by that module's own helpers over CPU tensors of the variant's shapes (plain rows,
or rank 3 for a head padded to the tile's width), its constexprs are the ones the launch
passes. Columns: shared memory bytes, warpgroup MMAs, TMA copies, register reallocations
(``setmaxnreg``: the warp-specialized partitions) in the PTX; a variant that does not
compile prints ``FAILED`` and the error, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

#: name -> (q dtype, head size, block size, q heads, kv heads, constexpr changes)
VARIANTS = {
    "bf16 head 128": (torch.bfloat16, 128, 16, 32, 8, {}),
    "fp16 head 64 window softcap alibi": (torch.float16, 64, 16, 16, 4,
                                          dict(USE_WINDOW=True, USE_SOFTCAP=1, ALIBI=1)),
    "bf16 head 256 sinks long tiles": (torch.bfloat16, 256, 16, 8, 1,
                                       dict(USE_SINKS=True, LONG_TILES=True)),
    "bf16 head 96 padded scaled non-causal": (torch.bfloat16, 96, 16, 8, 2,
                                              dict(CAUSAL=False, KV_SCALED=True, ALIBI=2,
                                                   USE_SOFTCAP=2)),
    "bf16 head 192 padded block 32": (torch.bfloat16, 192, 32, 8, 8, {}),
}
PTX_COUNTS = (("wgmma", "wgmma.mma_async"), ("tma", "cp.async.bulk.tensor"),
              ("setmaxnreg", "setmaxnreg"))


def _desc_type(desc, dtype_name: str) -> str:
    """The signature Triton gives a Gluon tensor descriptor argument."""
    shape = ", ".join(str(n) for n in desc.block_shape)
    return f"tensordesc<{dtype_name}[{shape}],{desc.layout!r}>"


def compile_variant(name: str, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from portattn.kernels import gluon_launch, gluon_prefill
    from portattn.kernels.compile_options import compile_options

    dtype, head, block_size, num_q_heads, num_kv_heads, changes = VARIANTS[name]
    width = gluon_launch.tile_width(head)
    block_n, num_buf = gluon_launch.TILES[width]
    gdt, short = (gl.bfloat16, "bf16") if dtype == torch.bfloat16 else (gl.float16, "fp16")
    q = torch.empty(256, num_q_heads, head, dtype=dtype)
    kc = torch.empty(16, block_size, num_kv_heads, head, dtype=dtype)
    q_desc = gluon_launch._q_descriptor(q, gluon_prefill.CONSUMER_ROWS, width, gdt)
    kv_desc = gluon_launch._rows(kc, min(block_size, block_n), width, block_n, gdt)
    signature = {"q_desc": _desc_type(q_desc, short), "k_desc": _desc_type(kv_desc, short),
                 "v_desc": _desc_type(kv_desc, short), "out_ptr": f"*{short}"}
    for arg in ("stride_ot", "stride_oh", "bt_stride", "bt_width", "num_blocks", "num_seqs",
                "num_tokens", "num_tiles", "min_q", "window"):
        signature[arg] = "i32"
    for arg in ("cu_seqlens_q_ptr", "seq_lens_ptr", "bt_ptr"):
        signature[arg] = "*i32"
    for arg in ("k_scale_ptr", "v_scale_ptr", "alibi_ptr", "sinks_ptr"):
        signature[arg] = "*fp32"
    signature.update(scale="fp32", softcap="fp32")
    consts = dict(NUM_Q_HEADS=num_q_heads, GROUP=num_q_heads // num_kv_heads,
                  KV_HEAD_STRIDE=kc.stride(2), BLOCK_N=block_n, HEAD=width, HEAD_SIZE=head,
                  BLOCK_SIZE=block_size, NUM_BUF=num_buf, CAUSAL=True, USE_WINDOW=False,
                  KV_SCALED=False, USE_SOFTCAP=0, ALIBI=0, USE_SINKS=False, LONG_TILES=False,
                  CONSUMER_REGS=gluon_launch.CONSUMER_REGS, num_warps=4)
    consts.update(changes)
    signature.update({arg: "constexpr" for arg in consts})
    source = GluonASTSource(gluon_prefill.gluon_prefill_kernel, signature, consts, {})
    options = {"num_warps": 4, **compile_options()}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (Hopper)")
    parser.add_argument("--only", default="", help="comma list of variant names (default all)")
    args = parser.parse_args(argv)
    from portattn.kernels.gluon_launch import gluon_reason

    why = gluon_reason()
    if why:
        print(f"no Gluon prefill to compile: {why}")
        return 2
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown variants {unknown}; known: {list(VARIANTS)}")
    import triton

    print(f"Triton {triton.__version__}, sm{args.arch}")
    print(f"{'variant':<40}{'shared':>8}" + "".join(f"{k:>12}" for k, _ in PTX_COUNTS))
    failed = 0
    for name in names:
        t0 = time.time()
        try:
            kernel = compile_variant(name, args.arch)
        except Exception as exc:  # a probe: report each variant and go on
            failed += 1
            print(f"{name:<40}FAILED {type(exc).__name__}: {exc}")
            continue
        ptx = kernel.asm["ptx"]
        print(f"{name:<40}{kernel.metadata.shared:>8}"
              + "".join(f"{ptx.count(token):>12}" for _, token in PTX_COUNTS)
              + f"   ({time.time() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

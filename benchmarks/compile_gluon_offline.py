"""Compile the Gluon prefill for sm90 on a machine without a GPU, in the launch forms its
plans take: the check that the installed Triton's Gluon still takes the kernel (Triton 3.9
removed a TMA call the kernel used, 3.8 a view its padded heads used; NOTES.md, session
51), before any device run.

    PYTHONPATH=src python benchmarks/compile_gluon_offline.py [--only NAMES] [--ptxas] [--dump DIR]

Each variant is a launch of ``gluon_launch.launch_gluon_prefill``: its compile-time
arguments from that module's ``kernel_switches`` and its descriptors from its
``descriptors``, over CPU tensors of the variant's shapes (plain rows, or rank 3 for a
head padded to the tile's width); the runtime arguments are typed here, unspecialized (a
real launch also declares its pointers 16-byte aligned). Columns: shared memory bytes,
warpgroup MMAs, TMA copies, register reallocations (``setmaxnreg``: the warp-specialized
partitions) in the PTX; with ``--ptxas`` the registers per thread and spill bytes
(stores / loads) this Triton's ptxas reports (``compile_offline.ptxas_usage``: the consumer
partitions' 240 registers are the most two warpgroups and the load warp can hold, and
spills there can land in the key-tile loop: NOTES.md, session 52); with ``--dump DIR``
its PTX and SASS written there and the SASS length of its loops (``compile_offline.dump``).
A variant that does not compile prints ``FAILED`` and the error, and the exit status is 1
(2 where this Triton has no Gluon the kernel can use).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

#: name -> (q dtype, head size, block size, q heads, kv heads, kernel_switches changes)
VARIANTS = {
    "bf16 head 128": (torch.bfloat16, 128, 16, 32, 8, {}),
    "fp16 head 64 window softcap alibi": (torch.float16, 64, 16, 16, 4,
                                          dict(sliding_window=True, softcap=1, alibi=1)),
    "bf16 head 256 sinks long tiles": (torch.bfloat16, 256, 16, 8, 1,
                                       dict(sinks=True, long_tiles=True)),
    "bf16 head 96 padded scaled non-causal": (torch.bfloat16, 96, 16, 8, 2,
                                              dict(causal=False, kv_scaled=True, alibi=2,
                                                   softcap=2)),
    "bf16 head 192 padded block 32": (torch.bfloat16, 192, 32, 8, 8, {}),
    "fp16 head 48 padded block 64": (torch.float16, 48, 64, 4, 4, {}),
    # the P cast this Triton's plans do not take (gluon_launch.casts_p_early), so that
    # both settings of P_EARLY keep compiling on every release
    "bf16 head 128 other P cast": (torch.bfloat16, 128, 16, 32, 8, dict(p_early="other")),
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
    from triton.experimental.gluon._runtime import GluonASTSource

    from portattn.kernels import gluon_launch, gluon_prefill
    from portattn.kernels.compile_options import compile_options

    dtype, head, block_size, num_q_heads, num_kv_heads, changes = VARIANTS[name]
    if changes.get("p_early") == "other":
        changes = {**changes, "p_early": not gluon_launch.casts_p_early()}
    q = torch.empty(256, num_q_heads, head, dtype=dtype)
    kc = torch.empty(16, block_size, num_kv_heads, head, dtype=dtype)
    switches = gluon_launch.kernel_switches(**{
        **dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
               kv_head_stride=kc.stride(2), head_size=head, block_size=block_size,
               causal=True, sliding_window=False, kv_scaled=False, softcap=0, alibi=0,
               sinks=False, long_tiles=False), **changes})
    q_desc, k_desc, v_desc = gluon_launch.descriptors(q, kc, kc, switches)
    short = "bf16" if dtype == torch.bfloat16 else "fp16"
    signature = {"q_desc": _desc_type(q_desc, short), "k_desc": _desc_type(k_desc, short),
                 "v_desc": _desc_type(v_desc, short), "out_ptr": f"*{short}"}
    for arg in ("stride_ot", "stride_oh", "bt_stride", "bt_width", "num_blocks", "num_seqs",
                "num_tokens", "num_tiles", "min_q", "window"):
        signature[arg] = "i32"
    for arg in ("cu_seqlens_q_ptr", "seq_lens_ptr", "bt_ptr"):
        signature[arg] = "*i32"
    for arg in ("k_scale_ptr", "v_scale_ptr", "alibi_ptr", "sinks_ptr"):
        signature[arg] = "*fp32"
    signature.update(scale="fp32", softcap="fp32")
    signature.update({arg: "constexpr" for arg in switches})
    source = GluonASTSource(gluon_prefill.gluon_prefill_kernel, signature, switches, {})
    options = {"num_warps": switches["num_warps"], **compile_options()}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (Hopper)")
    parser.add_argument("--only", default="", help="comma list of variant names (default all)")
    parser.add_argument("--ptxas", action="store_true",
                        help="also run ptxas -v: registers / spill bytes stored / loaded")
    parser.add_argument("--dump", metavar="DIR", default="",
                        help="also write each variant's PTX and SASS to DIR and print the "
                             "SASS length of its loops")
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

    if args.ptxas or args.dump:  # (this script's folder is on sys.path)
        from compile_offline import print_dump, ptxas_usage

    print(f"Triton {triton.__version__}, sm{args.arch}")
    print(f"{'variant':<40}{'shared':>8}" + "".join(f"{k:>12}" for k, _ in PTX_COUNTS)
          + ("  regs/spill st/ld" if args.ptxas else ""))
    failed = 0
    for name in names:
        t0 = time.time()
        try:
            kernel = compile_variant(name, args.arch)
            ptx = kernel.asm["ptx"]
            usage = f"  {ptxas_usage(ptx, args.arch):>16}" if args.ptxas else ""
        except Exception as exc:  # a probe: report each variant and go on
            failed += 1
            print(f"{name:<40}FAILED {type(exc).__name__}: {exc}")
            continue
        print(f"{name:<40}{kernel.metadata.shared:>8}"
              + "".join(f"{ptx.count(token):>12}" for _, token in PTX_COUNTS)
              + f"{usage}   ({time.time() - t0:.1f} s)")
        if args.dump:
            failed += print_dump(kernel, name, args.arch, args.dump)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

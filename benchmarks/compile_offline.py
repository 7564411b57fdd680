"""Compile the unified kernel for a GPU target on a machine without one, and count what
matters in its PTX: the cheapest check that a kernel change still compiles for sm90
(through ptxas to a cubin) and keeps its loads pipelined (NOTES.md: fp8 decode).

    PYTHONPATH=src python benchmarks/compile_offline.py [--arch 90] [--only NAMES] [--ptxas]
        [--dump DIR]

Pointers and strides are declared 16-byte divisible, as a real launch specializes them;
without that, Triton cannot vectorize or pipeline the K/V loads and the counts mislead.
Columns: shared memory bytes, 16-byte cp.async (pipelined loads), single-byte shared
loads (an 8-bit operand transposed the slow way), TMA copies (descriptor loads), and
with ``--ptxas`` the registers per thread and spill bytes (stores / loads) ptxas
reports. ``--dump DIR`` also writes each variant's PTX and SASS there (named by the Triton
release, to compare two releases' code for one source) and prints the length in SASS
instructions of each loop (``loop_lengths``; short spin waits left out).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from portattn.kernels.unified import MERGE_LOAD_ELEMENTS
from portattn.kernels.unified import unified_attention_kernel as KERNEL

BASE = dict(GROUP=4, BLOCK_M=16, BLOCK_Q=4, BLOCK_N=128, BLOCK_SIZE=16, HEAD_QK=128,
            HEAD_QK_PAD=128, HEAD_V=128, HEAD_V_PAD=128, SEQ_MODE=1, SHORT_Q=0, STAGED_Q=0,
            SPLIT=False,
            LONG_FOLLOWS=False, CAUSAL=True, USE_WINDOW=False, USE_SOFTCAP=False, ALIBI=0,
            USE_SINKS=False, KV_QUANT=0, Q_SCALED=False, Q_PRESCALE=False, FP8_DOT=False,
            FP8_ACC=32, FP8_OUT=False, FP8_MAX=0.0, COMPUTE_DTYPE=1, DOT_PREC="tf32",
            CHECK_BLOCKS=True, KV_LOAD=0, V_STAGE=False, KV_BITS=0, BITS_ASM=False,
            V_PAIRS=0, FLAT_GRID=False, ONE_LOOP=False, MERGE_SEGMENTS=0, V_SC_BOOST=1.0,
            MERGE_LOAD=MERGE_LOAD_ELEMENTS, TILE_HEADS=1)
PREFILL = dict(BLOCK_M=128, BLOCK_Q=32, SEQ_MODE=0)
#: name -> (KV storage type, constexpr changes, num_warps, num_stages)
VARIANTS = {
    "decode bf16": ("bf16", {}, 4, 2),
    "decode bf16 split+sinks+window": ("bf16", dict(SPLIT=True, USE_SINKS=True,
                                                    USE_WINDOW=True), 4, 2),
    "decode bf16 split+merge in kernel": ("bf16", dict(SPLIT=True, USE_SINKS=True,
                                                       MERGE_SEGMENTS=32, MERGE_LOAD=16384),
                                          4, 2),  # what launch.py asks for at GQA 4
    # the narrow split tile (heuristics.narrow_decode): 64 keys, 2 warps, 8 segments at
    # GQA 4, the merge's one-query load off below 4 warps (launch.merge_load_of)
    "decode bf16 narrow split+merge in kernel": ("bf16", dict(BLOCK_N=64, SPLIT=True,
                                                              USE_SINKS=True,
                                                              MERGE_SEGMENTS=8), 2, 2),
    "prefill bf16": ("bf16", PREFILL, 8, 3),
    "decode fp8 per-tensor": ("fp8e4nv", dict(KV_QUANT=1, Q_PRESCALE=True,
                                              COMPUTE_DTYPE=0), 4, 2),
    "decode fp8 per-tensor V_STAGE": ("fp8e4nv", dict(KV_QUANT=1, Q_PRESCALE=True,
                                                      COMPUTE_DTYPE=0, V_STAGE=True), 4, 2),
    "decode fp8 per-tensor V_PAIRS": ("fp8e4nv", dict(KV_QUANT=1, Q_PRESCALE=True,
                                                      COMPUTE_DTYPE=0, V_PAIRS=4,
                                                      BITS_ASM=True), 4, 2),
    # the plan's paired tiles (registers capped at 128): a kv head per program (GQA 4,
    # 2 segments at 32 x 8192), or 4 (16 rows, 8 segments, heuristics.decode_tile_heads)
    "decode fp8 V_PAIRS split cap128": ("fp8e4nv", dict(KV_QUANT=1, Q_PRESCALE=True,
                                                        COMPUTE_DTYPE=0, V_PAIRS=4,
                                                        BITS_ASM=True, SPLIT=True,
                                                        MERGE_SEGMENTS=2), 4, 2, 128),
    "decode fp8 V_PAIRS 4 heads cap128": ("fp8e4nv", dict(KV_QUANT=1, Q_PRESCALE=True,
                                                          COMPUTE_DTYPE=0, V_PAIRS=4,
                                                          BITS_ASM=True, SPLIT=True,
                                                          MERGE_SEGMENTS=8, GROUP=16,
                                                          BLOCK_Q=1, TILE_HEADS=4),
                                          4, 2, 128),
    "decode int8 codes V_PAIRS 4 heads cap128": ("i8", dict(KV_QUANT=2, KV_BITS=3,
                                                            BITS_ASM=True, Q_PRESCALE=True,
                                                            COMPUTE_DTYPE=0, V_PAIRS=3,
                                                            SPLIT=True, MERGE_SEGMENTS=8,
                                                            GROUP=16, BLOCK_Q=1,
                                                            TILE_HEADS=4), 4, 2, 128),
    "decode int8 per-token-head": ("i8", dict(KV_QUANT=2), 4, 2),
    "decode int8 codes": ("i8", dict(KV_QUANT=2, KV_BITS=3, BITS_ASM=True, Q_PRESCALE=True,
                                     COMPUTE_DTYPE=0), 4, 2),
    "decode int8 codes V_PAIRS": ("i8", dict(KV_QUANT=2, KV_BITS=3, BITS_ASM=True,
                                             Q_PRESCALE=True, COMPUTE_DTYPE=0, V_PAIRS=3),
                                  4, 2),
    "decode e4m3 bytes V_PAIRS": ("u8", dict(KV_QUANT=1, KV_BITS=1, BITS_ASM=True,
                                             Q_PRESCALE=True, COMPUTE_DTYPE=0, V_PAIRS=1),
                                  4, 2),
    "prefill fp8 per-tensor V_PAIRS": ("fp8e4nv", dict(PREFILL, KV_QUANT=1, Q_PRESCALE=True,
                                                       COMPUTE_DTYPE=0, V_PAIRS=4,
                                                       BITS_ASM=True), 8, 3),
    # what sm80 / sm86 run for e4m3fn / e5m2 caches (compile with --arch 80)
    "decode e4m3 bytes": ("u8", dict(KV_QUANT=1, KV_BITS=1, BITS_ASM=True, Q_PRESCALE=True,
                                     COMPUTE_DTYPE=0), 4, 2),
    "prefill e5m2 bytes": ("u8", dict(PREFILL, KV_QUANT=1, KV_BITS=2, BITS_ASM=True,
                                      Q_PRESCALE=True, COMPUTE_DTYPE=0), 8, 3),
    "prefill fp8 per-tensor": ("fp8e4nv", dict(PREFILL, KV_QUANT=1, Q_PRESCALE=True,
                                               COMPUTE_DTYPE=0), 8, 3),
    "prefill DiffKV 192/128": ("bf16", dict(HEAD_QK=192, HEAD_QK_PAD=256, BLOCK_M=256,
                                            BLOCK_Q=64, BLOCK_N=64, SEQ_MODE=0), 8, 2),
    "decode bf16 descriptors": ("bf16", dict(KV_LOAD=1, BLOCK_N=16), 4, 2),
    "prefill bf16 descriptors": ("bf16", dict(PREFILL, KV_LOAD=1, BLOCK_N=16), 8, 3),
}
RUNTIME_FLOATS = ("scale", "softcap", "v_one")
UNSPECIALIZED = ("stride_qd", "stride_od")  # always 1 in practice


def compile_variant(kv: str, changes: dict, warps: int, stages: int, arch: int,
                    maxnreg: int | None = None):
    consts = {**BASE, **changes}
    pointer_types = {name: "*bf16" for name in KERNEL.arg_names if name.endswith("_ptr")}
    pointer_types.update(k_ptr=f"*{kv}", v_ptr="*i16" if consts["V_PAIRS"] else f"*{kv}",
                         block_table_ptr="*i32",
                         cu_seqlens_q_ptr="*i32", seq_lens_ptr="*i32", part_m_ptr="*fp32",
                         part_l_ptr="*fp32", part_acc_ptr="*fp32", ticket_ptr="*i32",
                         q_scale_ptr="*fp32",
                         k_scale_ptr="*fp32", v_scale_ptr="*fp32", out_scale_ptr="*fp32")
    signature, attrs = {}, {}
    for i, name in enumerate(KERNEL.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in RUNTIME_FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and name not in UNSPECIALIZED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=KERNEL, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_path(arch: int) -> str:
    """The ptxas this Triton compiles ``arch`` with: Triton 3.9 compiles sm90 with its
    ``ptxas-blackwell`` (CUDA 13), whose PTX version the older ``ptxas`` refuses."""
    import inspect

    from triton.backends.nvidia import compiler

    if inspect.signature(compiler.get_ptxas).parameters:
        return compiler.get_ptxas(arch).path
    return compiler.get_ptxas().path  # Triton 3.5: one ptxas for every architecture


def _run_on_file(command: list[str], content: str | bytes, filename: str
                 ) -> subprocess.CompletedProcess:
    """``command`` run on a temporary file ``filename`` holding ``content`` (its path
    appended; ``{tmp}`` in an argument: that file's folder). RuntimeError with the tool's
    last words where it exits non-zero."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, filename)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        done = subprocess.run([arg.replace("{tmp}", tmp) for arg in command] + [path],
                              capture_output=True, text=True)
    if done.returncode:
        words = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{os.path.basename(command[0])} (exit {done.returncode}): {words}")
    return done


def ptxas_usage(ptx: str, arch: int) -> str:
    """``registers/spill stores/spill loads`` (bytes) as this Triton's ptxas
    (:func:`ptxas_path`) reports for ``ptx``; RuntimeError with ptxas's last words where
    it refuses the PTX."""
    suffix = "a" if arch == 90 else ""
    done = _run_on_file([ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}{suffix}",
                         "-o", "{tmp}/kernel.cubin"], ptx, "kernel.ptx")
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    if not (regs and spill):
        words = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"ptxas reported no registers: {words}")
    return "/".join([regs.group(1), *spill.groups()])


def sass_text(cubin: bytes, arch: int) -> str:
    """``cubin``'s SASS, from the ``nvdisasm`` beside this Triton's ptxas."""
    nvdisasm = os.path.join(os.path.dirname(ptxas_path(arch)), "nvdisasm")
    return _run_on_file([nvdisasm, "-c"], cubin, "kernel.cubin").stdout


_LABEL = re.compile(r"^\.(L_x_\d+):")
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(.+?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z]+)*\s[^`]*`\(\.(L_x_\d+)\)")
_EXIT = re.compile(r"^EXIT\b")  # unpredicated: the program ends here


def loop_lengths(sass: str) -> list[int]:
    """Instructions from a label to each branch back to it, that branch included, in code
    order (``sass``: nvdisasm's text; a label branched back to twice counts twice; the
    branch to itself that ends a kernel counts 1). A branch back over an unpredicated
    ``EXIT`` is left out: that is a wait's retry placed after the program's end (the
    mbarrier waits of TMA loads), which returns into the body rather than looping.
    Branches through a register (``BRX``) have no label to read and are not counted."""
    labels: dict[str, int] = {}
    count, last_exit, loops = 0, -1, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label[1]] = count
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        count += 1
        if _EXIT.match(instruction[1]):
            last_exit = count
        branch = _BRANCH.search(instruction[1])
        if branch and branch[1] in labels and labels[branch[1]] >= last_exit:
            loops.append(count - labels[branch[1]])
    return loops


#: the shortest loop :func:`dump` lists: below it, spin waits on a barrier or an
#: mbarrier and short warp-uniform retries
SHORTEST_LOOP = 8


def dump(compiled, name: str, arch: int, folder: str) -> str:
    """Write ``compiled``'s PTX, then its SASS, under ``folder`` as
    ``triton-<release>-<name>.{ptx,sass}``; a line with the lengths of the kernel's loops
    of :data:`SHORTEST_LOOP` instructions or more (:func:`loop_lengths`) and the files. A
    failure (no ``nvdisasm`` here) raises after the PTX is written."""
    os.makedirs(folder, exist_ok=True)
    safe = re.sub(r"[^\w.+-]", "_", name)
    base = os.path.join(folder, f"triton-{triton.__version__}-{safe}")
    with open(base + ".ptx", "w") as f:
        f.write(compiled.asm["ptx"])
    sass = sass_text(compiled.asm["cubin"], arch)
    with open(base + ".sass", "w") as f:
        f.write(sass)
    lengths = ", ".join(str(n) for n in loop_lengths(sass) if n >= SHORTEST_LOOP) or "none"
    return f"    loops of {SHORTEST_LOOP}+ SASS instructions: {lengths}; {base}.ptx / .sass"


def print_dump(compiled, name: str, arch: int, folder: str) -> int:
    """Print :func:`dump`'s line for one compiled variant, or why it failed; 1 if it did."""
    try:
        print(dump(compiled, name, arch, folder))
    except Exception as exc:  # a probe: report each variant and go on
        print(f"    dump FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--only", default="", help="comma list of variant names (default all)")
    parser.add_argument("--ptxas", action="store_true",
                        help="also run ptxas -v: registers / spill bytes stored / loaded")
    parser.add_argument("--dump", metavar="DIR", default="",
                        help="also write each variant's PTX and SASS to DIR and print the "
                             "SASS length of its loops")
    args = parser.parse_args()
    wanted = [n for n in args.only.split(",") if n] or list(VARIANTS)
    failed = 0
    print(f"{'variant':<42} {'shared':>7} {'cp.async16':>10} {'ld.b8':>6} {'tma':>4}"
          + ("  regs/spill st/ld" if args.ptxas else ""))
    for name in wanted:
        kv, changes, warps, stages, *cap = VARIANTS[name]
        try:
            compiled = compile_variant(kv, changes, warps, stages, args.arch, *cap)
            ptx = compiled.asm["ptx"]
            usage = f"  {ptxas_usage(ptx, args.arch):>16}" if args.ptxas else ""
        except Exception as exc:
            failed += 1
            print(f"{name:<42} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        print(f"{name:<42} {compiled.metadata.shared:>7} {ptx.count('cp.async.cg'):>10} "
              f"{ptx.count('ld.shared.b8'):>6} {ptx.count('cp.async.bulk.tensor'):>4}{usage}")
        if args.dump:
            failed += print_dump(compiled, name, args.arch, args.dump)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The unified kernel still compiles for sm90 (through ptxas), checked on a CPU machine.

Triton's NVIDIA backend compiles without a GPU, so CI catches a kernel change that no
longer compiles for Hopper before any device run: ``benchmarks/compile_offline.py`` in a
child process (the test session runs Triton's interpreter, whose kernels cannot be
compiled), for the plain, fp8 and descriptor variants. Also checks the property the
fp8 notes rely on: V_STAGE removes the single-byte shared loads.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["decode bf16", "decode fp8 per-tensor", "decode fp8 per-tensor V_STAGE",
            "decode bf16 descriptors"]


def _script(name: str):
    """``benchmarks/NAME.py`` loaded as a module (imports only: compiles nothing)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ptxas_available() -> bool:
    """Whether the ptxas this Triton compiles sm90 with is installed (the scripts' own
    choice: ``compile_offline.ptxas_path``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        return Path(_script("compile_offline").ptxas_path(90)).exists()
    except (ImportError, AttributeError):  # no NVIDIA backend in this Triton
        return False


def _compile_offline(*args: str, script: str = "compile_offline.py"
                     ) -> subprocess.CompletedProcess:
    """``benchmarks/SCRIPT ARGS`` in a child process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          env=env, capture_output=True, text=True, timeout=600)


needs_ptxas = pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend "
                                 "(ptxas) is not installed here")


@needs_ptxas
def test_kernel_compiles_for_sm90_offline():
    run = _compile_offline("--only", ",".join(VARIANTS))
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {line[:34].strip(): line[34:].split() for line in run.stdout.splitlines()[1:]}
    assert set(VARIANTS) <= set(rows), run.stdout
    shared, pipelined, byte_loads, tma = (int(x) for x in rows["decode bf16"])
    assert pipelined > 0 and byte_loads == 0 and tma == 0
    assert int(rows["decode fp8 per-tensor V_STAGE"][2]) == 0  # no ld.shared.b8
    assert int(rows["decode bf16 descriptors"][3]) > 0  # TMA copies


@needs_ptxas
def test_byte_decode_paths_compile_for_sm80_offline():
    """The fp8-from-bytes kernels that sm80 / sm86 run (never run on such a GPU here:
    the H200 runs them forced) and the plain ones compile for sm80 through ptxas."""
    wanted = ["decode bf16", "decode e4m3 bytes", "prefill e5m2 bytes", "decode int8 codes"]
    run = _compile_offline("--arch", "80", "--only", ",".join(wanted))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAILED" not in run.stdout, run.stdout
    assert sum(1 for line in run.stdout.splitlines()[1:] if line.strip()) == len(wanted)


@needs_ptxas
def test_paired_decode_tiles_fit_the_programs_per_sm_the_plan_assumes():
    """The paired 8-bit decode tiles (V as int16 pairs of codes, 4 kv heads, registers
    capped) keep their decoded V halves in registers: shared memory holds only the
    pipelined K / V tiles and the q / P operands, so PAIRED_DECODE_PROGRAMS_PER_SM
    programs fit an sm90 SM (228 KB, 1 KB reserved per program), as the plan's segment
    rule assumes, spilling at most a few bytes (Triton 3.6: 4 for int8 codes, 3.8: none).
    Triton 3.8 staged the odd half through shared memory
    (57-58 KB: 3 programs) while decode_pairs' PTX had two outputs (NOTES.md, session 50)."""
    from portattn.kernels.heuristics import PAIRED_DECODE_MAXNREG, PAIRED_DECODE_PROGRAMS_PER_SM

    wanted = ["decode int8 codes V_PAIRS 4 heads cap128", "decode fp8 V_PAIRS 4 heads cap128"]
    run = _compile_offline("--ptxas", "--only", ",".join(wanted))
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {line[:42].strip(): line[42:].split() for line in run.stdout.splitlines()[1:]}
    assert set(wanted) <= set(rows), run.stdout
    for name in wanted:
        shared = int(rows[name][0])
        registers, spill, _ = (int(x) for x in rows[name][4].split("/"))
        assert PAIRED_DECODE_PROGRAMS_PER_SM * (shared + 1024) <= 228 * 1024, (name, shared)
        assert registers <= PAIRED_DECODE_MAXNREG and spill <= 8, (name, registers, spill)


def test_loop_lengths_count_each_backward_branch_from_its_label():
    """Hand-written nvdisasm text: a 3-instruction loop, a forward branch (not a loop), a
    2-instruction loop closed by a warp-uniform ``BRA.U.ANY``, then after the program's
    ``EXIT`` a wait retried out of line (a 2-instruction spin, then a branch back into the
    body over the ``EXIT``: not a loop), and the branch to itself that ends the code."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   ISETP.GE.AND P0, PT, R2, 0x8, PT ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
        /*0040*/               @P1 BRA `(.L_x_2) ;
.L_x_1:
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0060*/               @P2 BRA.U.ANY `(.L_x_1) ;
.L_x_2:
        /*0070*/              @!P3 BRA `(.L_x_4) ;
.L_x_3:
        /*0080*/                   FADD R4, R4, R5 ;
        /*0090*/                   EXIT ;
.L_x_4:
        /*00a0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR4+0x10], RZ ;
        /*00b0*/              @!P3 BRA `(.L_x_4) ;
        /*00c0*/                   BRA `(.L_x_3) ;
.L_x_5:
        /*00d0*/                   BRA `(.L_x_5);
"""
    assert _script("compile_offline").loop_lengths(sass) == [3, 2, 2, 1]


@needs_ptxas
def test_dump_names_files_safely_and_writes_the_ptx_before_the_sass(tmp_path):
    """A variant name with a slash (``prefill DiffKV 192/128``) becomes one file name, and
    the PTX is on disk when the disassembly fails (a cubin nvdisasm cannot read)."""
    import triton

    script = _script("compile_offline")
    kernel = SimpleNamespace(asm={"ptx": "// a PTX stand-in\n", "cubin": b"not a cubin"})
    with pytest.raises(RuntimeError, match="nvdisasm"):
        script.dump(kernel, "prefill DiffKV 192/128", 90, str(tmp_path))
    written = tmp_path / f"triton-{triton.__version__}-prefill_DiffKV_192_128.ptx"
    assert [p.name for p in tmp_path.iterdir()] == [written.name]
    assert written.read_text() == "// a PTX stand-in\n"


def _dumped_loops(stdout: str) -> list[int]:
    """The loop lengths a ``--dump`` run printed for its one variant."""
    lines = [x for x in stdout.splitlines() if "SASS instructions:" in x]
    assert len(lines) == 1, stdout
    return [int(n) for n in lines[0].split(":")[1].split(";")[0].split(",")]


@pytest.mark.interpreter  # (runs no kernel: marked so CI's other-Triton tiers run it)
@needs_ptxas
def test_dump_writes_both_forms_and_finds_the_key_tile_loops(tmp_path):
    """``--dump``: the decode's PTX and SASS land in the folder, named by the Triton
    release, and its two key-tile loops (full tiles, then the masked last ones: each some
    hundreds of instructions) are among the loops it prints."""
    import triton

    run = _compile_offline("--only", "decode bf16", "--dump", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    base = tmp_path / f"triton-{triton.__version__}-decode_bf16"
    ptx, sass = (Path(f"{base}{suffix}").read_text() for suffix in (".ptx", ".sass"))
    assert ".entry unified_attention_kernel" in ptx and "cp.async" in ptx
    assert "LDGSTS" in sass and "MMA" in sass
    lengths = _dumped_loops(run.stdout)
    assert sum(n > 200 for n in lengths) >= 2, lengths
    assert max(lengths) < sass.count(" ;\n"), lengths  # each shorter than the program


def _gluon_offline(*args: str) -> subprocess.CompletedProcess:
    """``compile_gluon_offline.py ARGS``, asserting that it succeeded; skips where this
    Triton has no Gluon the kernel can use."""
    from portattn.kernels.gluon_launch import gluon_reason

    why = gluon_reason()
    if why:
        pytest.skip(why)
    run = _compile_offline(*args, script="compile_gluon_offline.py")
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def _gluon_rows(*args: str) -> dict:
    """``compile_gluon_offline.py ARGS``'s rows (variant -> its columns)."""
    run = _gluon_offline(*args)
    return {line[:40].strip(): line[40:].split() for line in run.stdout.splitlines()[2:]}


@pytest.mark.interpreter  # (runs no kernel: marked so CI's other-Triton tiers run it)
@needs_ptxas
def test_gluon_prefill_compiles_for_sm90_offline():
    """The Gluon prefill's launch forms of ``compile_gluon_offline.py`` (plain heads of each
    tile width, heads padded to one or two 64-column spans, both 16-bit dtypes, every
    score switch, block sizes 16 / 32 / 64) compile for sm90 on the installed Triton, as a
    warp-specialized kernel of Hopper's TMA and warpgroup MMAs within an SM's shared
    memory. Triton 3.9 removed a TMA call the kernel made and 3.8 refused its padded
    heads' view; both went unseen until a GPU ran them (NOTES.md, session 51)."""
    rows = _gluon_rows()
    assert set(rows) == set(_script("compile_gluon_offline").VARIANTS), rows
    for name, (shared, wgmma, tma, setmaxnreg, *_) in rows.items():
        assert 0 < int(shared) <= 227 * 1024, (name, shared)
        assert int(wgmma) > 0 and int(tma) > 0 and int(setmaxnreg) > 0, (name, rows[name])


#: the Gluon forms whose consumers must not spill (plain heads of both tile widths, a
#: head padded into 256)
UNSPILLED_GLUON_FORMS = ("bf16 head 128", "bf16 head 256 sinks long tiles",
                         "bf16 head 192 padded block 32")


def _gluon_spill_bytes() -> int:
    """The most spill bytes (stores, loads) allowed in those forms. Where the consumers
    cast P right after each softmax (``gluon_launch.casts_p_early``: Triton 3.8 on), 8;
    16 under 3.8's ptxas (CUDA 12.9), which leaves 16 at head 128. Where they cast it at
    the PV MMA (3.6), 32: 16 / 28 at head 128, before and after the key-tile loop
    (NOTES.md, sessions 51-52)."""
    import triton

    from portattn.kernels.gluon_launch import casts_p_early

    if not casts_p_early():
        return 32
    return 16 if triton.__version__.startswith("3.8.") else 8


@pytest.mark.interpreter  # (runs no kernel: marked so CI's other-Triton tiers run it)
@needs_ptxas
def test_gluon_prefill_consumers_spill_at_most_a_few_bytes():
    """The consumer warpgroups hold the accumulator, the next tile's scores and P within
    the 240 registers a thread that warp specialization leaves them: ptxas spills at most
    :func:`_gluon_spill_bytes` in the plain and padded forms. With P crossing the key-tile
    loop in fp32 (cast at the PV MMA), the spill stores were 16 / 12 / 12 bytes (head 128 /
    256 / padded 192) on Triton 3.6, 4 / 12 / 8 on 3.9 and 148 / 64 / 32 on 3.8, reloaded
    inside the loop there; with P crossing it in 16 bits as PV's operand, 0 / 8 / 0 on
    3.6, 0 / 8 / 8 on 3.9 and 16 / 0 / 0 on 3.8, the form 3.8 and later take. (A
    structural check: on an H100 the spills' removal measured within the runs' spread on
    3.8, and the early cast cost 3.6 3.5% on a mixed batch, NOTES.md, sessions 52-53.)"""
    rows = _gluon_rows("--ptxas", "--only", ",".join(UNSPILLED_GLUON_FORMS))
    assert set(rows) == set(UNSPILLED_GLUON_FORMS), rows
    limit = _gluon_spill_bytes()
    for name, columns in rows.items():
        _, stores, loads = (int(x) for x in columns[4].split("/"))
        assert stores <= limit and loads <= limit, (name, columns[4], limit)


@pytest.mark.interpreter  # (runs no kernel: marked so CI's other-Triton tiers run it)
@needs_ptxas
def test_gluon_dump_lists_the_consumers_loop_and_not_the_waits_retries(tmp_path):
    """``compile_gluon_offline.py --dump``: the plain head-128 form's PTX and SASS (with
    Hopper's warpgroup MMAs and TMA copies), and among its loops the consumers' key-tile
    loop (1,460 SASS instructions on Triton 3.6, 1,495 on 3.9), but not the branches back
    from the waits' retries placed after the program's end, the longest of which spans
    nearly all of it (7,340 of 7,542 instructions on 3.6; the longest loop: 3,856).
    ``loop_lengths`` leaves out a branch back over ``EXIT``."""
    import triton

    run = _gluon_offline("--only", "bf16 head 128", "--dump", str(tmp_path))
    base = tmp_path / f"triton-{triton.__version__}-bf16_head_128"
    ptx, sass = (Path(f"{base}{suffix}").read_text() for suffix in (".ptx", ".sass"))
    assert "wgmma.mma_async" in ptx
    assert "HGMMA" in sass and "UTMALDG" in sass
    lengths = _dumped_loops(run.stdout)
    program = sass.count(" ;\n")
    assert any(1000 < n < 2000 for n in lengths), lengths
    assert max(lengths) < 0.75 * program, (lengths, program)

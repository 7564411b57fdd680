"""Tiny Triton kernels that prove, by running, what this machine's Triton can do.

The question "can our kernels use tensor descriptors here?" is not answered by
``hasattr(tl, "make_tensor_descriptor")``: on an H200 with Triton 3.6 the API exists and
some descriptor attention kernels still fail inside Triton's software pipeliner. So the
probe compiles and runs two kernels shaped like the inner loop of paged attention and
compares them with torch:

``pointer`` kernel
    ``q`` tile loaded with pointer arithmetic, a pipelined loop (``tl.range(...,
    num_stages=2)``) over ``k`` tiles computing ``acc += (q @ k^T) @ k`` with ``tl.dot``,
    the result and a copy of ``q`` stored with pointers. Passing means "our Triton kernels
    compile and run here" (``Capabilities.triton_kernels``).
``descriptor`` kernel
    The same computation with every load and store going through
    ``tl.make_tensor_descriptor`` (TMA on sm90+). Passing means "descriptor loads work
    here, inside a pipelined loop feeding ``tl.dot``" (``Capabilities.tensor_descriptors``).

Layout: ``q`` is ``[M, D]`` fp16, ``k`` is ``[N, D]`` fp16, both contiguous; ``out`` is
``[M, D]`` fp32, ``q_copy`` ``[M, D]`` fp16. Grid: ``(M // BLOCK_M,)``, one program per
``BLOCK_M`` query rows. Constexprs: ``D`` (head size), ``BLOCK_M``, ``BLOCK_N`` (key tile).
Inputs are multiples of 1/4 in [-0.5, 0.5], so every product and sum is exact in fp16/fp32
and the comparison can be tight.

On a GPU the checks run in a child process (``python -m
portattn.capabilities.descriptor_check --device cuda:N``): a miscompiled kernel can fault
the CUDA context or crash the compiler, and the probe must never take the caller's process
down with it. Under ``TRITON_INTERPRET=1`` they run in-process on CPU tensors (the
interpreter exercises the language semantics, not the GPU compiler; the reasons say so).

The ``@triton.jit`` functions are defined inside :func:`_build_kernels`, never at import
time: Triton decides interpreter vs compiler when a kernel is defined.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from portattn.capabilities._text import one_line
from portattn.kernels.compile_options import compile_options

M, N, D = 64, 128, 32
BLOCK_M, BLOCK_N = 32, 32
CHILD_TIMEOUT_S = 300

KERNELS = ("pointer", "descriptor")


def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def pointer_kernel(q_ptr, k_ptr, out_ptr, q_copy_ptr, n_keys,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, D)
        q = tl.load(q_ptr + rows[:, None] * D + cols[None, :])
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for start in tl.range(0, n_keys, BLOCK_N, num_stages=2):
            keys = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + keys[:, None] * D + cols[None, :])
            s = tl.dot(q, tl.trans(k))
            acc += tl.dot(s.to(k.dtype), k)
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc)
        tl.store(q_copy_ptr + rows[:, None] * D + cols[None, :], q)

    @triton.jit
    def descriptor_kernel(q_ptr, k_ptr, out_ptr, q_copy_ptr, n_queries, n_keys,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[n_queries, D], strides=[D, 1],
                                           block_shape=[BLOCK_M, D])
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[n_keys, D], strides=[D, 1],
                                           block_shape=[BLOCK_N, D])
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[n_queries, D], strides=[D, 1],
                                             block_shape=[BLOCK_M, D])
        copy_desc = tl.make_tensor_descriptor(q_copy_ptr, shape=[n_queries, D],
                                              strides=[D, 1], block_shape=[BLOCK_M, D])
        row0 = tl.program_id(0) * BLOCK_M
        q = q_desc.load([row0, 0])
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for start in tl.range(0, n_keys, BLOCK_N, num_stages=2):
            k = k_desc.load([start, 0])
            s = tl.dot(q, tl.trans(k))
            acc += tl.dot(s.to(k.dtype), k)
        out_desc.store([row0, 0], acc)
        copy_desc.store([row0, 0], q)

    return pointer_kernel, descriptor_kernel


def _inputs(device: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    q = (torch.randint(-2, 3, (M, D), generator=gen) / 4).to(torch.float16).to(device)
    k = (torch.randint(-2, 3, (N, D), generator=gen) / 4).to(torch.float16).to(device)
    out = torch.full((M, D), float("nan"), dtype=torch.float32, device=device)
    q_copy = torch.zeros((M, D), dtype=torch.float16, device=device)
    return q, k, out, q_copy


def _compare(q, k, out, q_copy) -> None:
    import torch

    qf, kf = q.float().cpu(), k.float().cpu()
    want = (qf @ kf.T) @ kf
    got = out.cpu()
    if not torch.equal(q_copy.cpu(), q.cpu()):
        raise AssertionError("stored tile differs from the loaded tile")
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
        err = (got - want).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"result differs from torch (max abs error {err:g})")


def _run_one(kind: str, device: str) -> None:
    """Compile, launch and verify one kernel; raises on any failure."""
    import torch
    import triton
    import triton.language as tl

    if kind == "descriptor" and not hasattr(tl, "make_tensor_descriptor"):
        raise RuntimeError("triton.language has no make_tensor_descriptor")
    pointer_kernel, descriptor_kernel = _build_kernels()
    q, k, out, q_copy = _inputs(device)
    grid = (M // BLOCK_M,)

    def launch() -> None:
        if kind == "pointer":
            pointer_kernel[grid](q, k, out, q_copy, N, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                 **compile_options())
        else:
            # Descriptors built on the device need scratch memory from triton's allocator.
            # Set one in a copied context so the caller's allocator is left untouched.
            set_allocator = getattr(triton, "set_allocator", None)
            if set_allocator is not None:
                set_allocator(lambda size, alignment, stream:
                              torch.empty(size, dtype=torch.uint8, device=device))
            descriptor_kernel[grid](q, k, out, q_copy, M, N, D=D, BLOCK_M=BLOCK_M,
                                    BLOCK_N=BLOCK_N, **compile_options())
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    contextvars.copy_context().run(launch)
    _compare(q, k, out, q_copy)


def run_checks(device: str) -> dict[str, dict]:
    """Run both kernels on ``device`` in this process: ``{kind: {"ok", "reason"}}``."""
    results = {}
    for kind in KERNELS:
        try:
            with warnings.catch_warnings():  # numpy deprecations inside Triton's interpreter
                warnings.simplefilter("ignore", DeprecationWarning)
                _run_one(kind, device)
            results[kind] = {"ok": True, "reason": ""}
        except Exception as exc:  # every failure is an answer, not an error
            results[kind] = {"ok": False, "reason": one_line(exc)}
    return results


def child_env() -> dict[str, str]:
    """The environment of a check's child process: this same portattn importable, the
    compiler (not the interpreter) in use."""
    # The child must import this same portattn, also when it runs from a source tree.
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
    env.pop("TRITON_INTERPRET", None)
    return env


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9: how a check process's death is named in its reason."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


#: How a failed check's reason starts when the check process timed out or was killed by a
#: signal (a busy GPU, the OOM killer, a user's kill): a state of this moment, not an
#: answer about the kernels (:func:`is_transient`).
TIMED_OUT = "the check process did not finish in"
KILLED = "the check process died with signal"


def is_transient(reason: str) -> bool:
    """Whether a check's reason (or one that quotes it) says :data:`TIMED_OUT` or
    :data:`KILLED`: the probe keeps such a result in memory only, so the next process
    checks again rather than reading the failure from the disk cache."""
    return TIMED_OUT in reason or KILLED in reason


def run_checks_isolated(device: str, timeout: float = CHILD_TIMEOUT_S) -> dict[str, dict]:
    """:func:`run_checks` in a child process; a crash or hang becomes a failed check."""
    cmd = [sys.executable, "-m", "portattn.capabilities.descriptor_check", "--device", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=child_env())
    except subprocess.TimeoutExpired:
        why = f"{TIMED_OUT} {timeout:g} s"
        return {kind: {"ok": False, "reason": why} for kind in KERNELS}
    results: dict[str, dict] = {}
    for line in proc.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") in KERNELS:
            results[record["kind"]] = {"ok": bool(record.get("ok")),
                                       "reason": str(record.get("reason", ""))}
    if len(results) < len(KERNELS):
        died = failed_child_reason(proc.returncode, proc.stderr)
        for kind in KERNELS:
            results.setdefault(kind, {"ok": False, "reason": died})
    return results


def failed_child_reason(returncode: int, stderr: str) -> str:
    """Why a check process gave no answer: killed by a signal (:data:`KILLED`, named) or
    its exit status, with the last line of its stderr. Shared with the descriptor gate's
    check processes."""
    if returncode < 0:
        died = f"{KILLED} {signal_name(-returncode)}"
    else:
        died = f"the check process exited with status {returncode}"
    tail = " ".join(stderr.strip().splitlines()[-1:])[-200:]
    return died + (f": {tail}" if tail else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0", help="torch device, e.g. cuda:0 or cpu")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):  # Triton launches on the current device
        import torch

        torch.cuda.set_device(args.device)
    for kind in KERNELS:  # one JSON line per kernel, flushed, so a crash keeps earlier ones
        try:
            _run_one(kind, args.device)
            record = {"kind": kind, "ok": True, "reason": ""}
        except Exception as exc:
            record = {"kind": kind, "ok": False, "reason": one_line(exc)}
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

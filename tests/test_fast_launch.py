"""The cheap Triton relaunch path (:mod:`portattn.kernels.fast_launch`) on the CPU.

* The key logic against Triton's own binder: whenever our specialization key of two
  argument lists is equal, Triton specializes them identically; and every change Triton
  specializes on (pointer alignment, int == 1, int % 16, int width, dtype, bool vs int)
  changes our key.
* Sequences with a stand-in kernel that uses Triton's real binder and cache key but a
  fake compiled kernel recording its launcher calls: relaunch with new pointers, misses
  on a new alignment, absorb, fixed-value changes, foreign tensors, aliasing, workspace
  views, launch hooks, pre-run hooks, Triton disagreeing.
* The fallback under the interpreter: no compiled kernel, so the normal path every time.
"""

from __future__ import annotations

import itertools
import os
import threading
from contextlib import contextmanager

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, create_function_from_signature

from jit_standin import JITStandIn, require_native_binder
from portattn.kernels import fast_launch, launch_entries
from portattn.kernels.fast_launch import (
    Ambiguous,
    Captured,
    Launch,
    LaunchSequence,
    Unusable,
    capturable,
    capture,
    specialization_key,
)


def toy(x_ptr, y_ptr, n, stride, scale, flag, BLOCK: tl.constexpr):
    pass  # a signature only: nothing compiles it


NAMES = ("x_ptr", "y_ptr", "n", "stride", "scale", "flag", "BLOCK")
_toy_jit = JITFunction(toy)
_binder = create_function_from_signature(_toy_jit.signature, _toy_jit.params, BaseBackend)


def triton_specialization(args: dict) -> tuple:
    """What Triton's binder (native_specialize_impl) makes of these arguments."""
    _bound, specialization, _options = _binder(**args)
    return tuple(specialization)


def _buffers():
    base16 = torch.zeros(64, dtype=torch.float16)
    assert base16.data_ptr() % 16 == 0
    return {"aligned": base16, "misaligned": base16[1:], "aligned+16B": base16[8:],
            "fp32": torch.zeros(64, dtype=torch.float32)}


def test_equal_keys_mean_equal_triton_specialization():
    buffers = _buffers()
    choices = dict(x_ptr=list(buffers.values()), y_ptr=[buffers["aligned"]],
                   n=[1, 2, 16, 17, 32, -16, 2 ** 31, 2 ** 40],
                   stride=[1, 16, True], scale=[1.0, 0.5], flag=[True, False, 1],
                   BLOCK=[32, 64])
    calls = [dict(zip(choices, values)) for values in itertools.product(*choices.values())]
    ours = [specialization_key([c[n] for n in NAMES]) for c in calls]
    theirs = [triton_specialization(c) for c in calls]
    groups: dict = {}
    for key, spec in zip(ours, theirs):
        groups.setdefault(key, set()).add(spec)
    assert all(len(specs) == 1 for specs in groups.values())
    assert len(groups) > 100  # the grid really varies


@pytest.mark.parametrize("field,before,after", [
    ("x_ptr", "aligned", "misaligned"),
    ("x_ptr", "aligned", "fp32"),
    ("n", 2, 1),
    ("n", 16, 17),
    ("n", 5, 2 ** 31),
    ("flag", True, 1),
])
def test_every_triton_specialization_change_changes_our_key(field, before, after):
    buffers = _buffers()
    base = dict(x_ptr=buffers["aligned"], y_ptr=buffers["aligned"], n=2, stride=16,
                scale=1.0, flag=True, BLOCK=32)
    a, b = dict(base), dict(base)
    a[field] = buffers.get(before, before) if isinstance(before, str) else before
    b[field] = buffers.get(after, after) if isinstance(after, str) else after
    assert triton_specialization(a) != triton_specialization(b)
    assert specialization_key([a[n] for n in NAMES]) != specialization_key([b[n] for n in NAMES])


def test_a_16_byte_offset_keeps_the_specialization():
    buffers = _buffers()
    base = dict(x_ptr=buffers["aligned"], y_ptr=buffers["aligned"], n=2, stride=16,
                scale=1.0, flag=True, BLOCK=32)
    moved = dict(base, x_ptr=buffers["aligned+16B"])
    assert triton_specialization(base) == triton_specialization(moved)
    assert specialization_key([base[n] for n in NAMES]) == \
        specialization_key([moved[n] for n in NAMES])


def test_alignment_token():
    assert fast_launch.alignment_token([0, 16, 4096]) is True
    assert fast_launch.alignment_token([0, 18, 4096]) == (True, False, True)
    # odd and even addresses apart: the launcher reads an 8-bit V cache as int16 pairs
    # at an even address only, so a launch recorded at one must not replay at the other
    assert fast_launch.alignment_token([0, 17, 4096]) == (True, "odd", True)
    assert fast_launch.alignment_token([0, 17, 4096]) != \
        fast_launch.alignment_token([0, 18, 4096])
    # inputs bound at offsets that are not multiples of 16: keyed by their residue
    assert fast_launch.alignment_token([0, 24, 8], (False, True, False)) == (True, 8, False)
    assert fast_launch.alignment_token([32, 16], (True, True)) is True


# --------------------------------------------------------------------------- sequences


class FakeCompiled:
    """A compiled kernel whose launcher records its calls."""

    def __init__(self, kernel, key):
        self.kernel = kernel
        self.key = key
        self.function = object()
        self.packed_metadata = (4, 1, 0)

    def run(self, *call):
        self.kernel.launches.append((self, call))


class FakeKernel(JITStandIn):
    """Quacks like a JITFunction: Triton's real binder and cache key, fake compiles."""

    def __init__(self, fn=toy):
        super().__init__(fn)
        self.launches: list = []
        self.compiles = 0
        self.jit_calls = 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):  # JITFunction.run without compiling or a device
            self.jit_calls += 1
            bound, _, key, kernel_cache = self.bind(args, kwargs)
            if key not in kernel_cache:
                kernel_cache[key] = FakeCompiled(self, key)
                self.compiles += 1
            compiled = kernel_cache[key]
            compiled.run(*grid, "jit", *bound.values())
            return compiled

        return run


@pytest.fixture
def kernel(monkeypatch):
    require_native_binder()
    monkeypatch.setattr(fast_launch, "_device_functions", lambda: (lambda: 0, lambda d: 77))
    return FakeKernel()


def _record(kernel, inputs, **overrides):
    """A capture of one launch of ``kernel`` (every launch counted)."""
    x, y = inputs[:2]
    args = dict(n=100, stride=8, scale=0.5, flag=True, BLOCK=32)
    args.update(overrides)
    with capture() as captured:
        capturable(kernel)[(4, 2)](x, y, args["n"], args["stride"], args["scale"],
                                   args["flag"], BLOCK=args["BLOCK"], num_warps=4)
    captured.triton_launches = len(captured.launches)
    return captured


def test_capture_records_only_inside_the_block_and_thread(kernel):
    x, y = torch.zeros(8), torch.zeros(8)
    wrapped = capturable(kernel)
    assert capturable(wrapped) is wrapped and wrapped.arg_names == kernel.arg_names
    wrapped[(1,)](x, y, 3, 1, 1.0, False, BLOCK=16)  # outside: plain
    seen = []
    with capture() as captured:
        other = threading.Thread(target=lambda: wrapped[(1,)](x, y, 3, 1, 1.0, False,
                                                               BLOCK=16))
        other.start()
        other.join()
        compiled = wrapped[(2,)](x, y, 3, 1, 1.0, False, BLOCK=16)
        seen.append(compiled)
    assert len(captured.launches) == 1 and kernel.jit_calls == 3
    launch = captured.launches[0]
    assert launch.grid == (2,) and launch.compiled is seen[0] and launch.args[0] is x


def test_relaunch_with_new_pointers(kernel):
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    captured = _record(kernel, (x, y))
    sequence = LaunchSequence.build(captured, (x, y, None))
    kernel.launches.clear()
    x2, y2 = torch.ones(64, dtype=torch.float16), torch.ones(64)
    assert sequence.launch((x2, y2, None))
    assert kernel.jit_calls == 1 and len(kernel.launches) == 1
    compiled, call = kernel.launches[0]
    assert compiled is captured.launches[0].compiled
    assert call[:9] == (4, 2, 1, 77, compiled.function, compiled.packed_metadata, None, None,
                        None)
    assert call[9:] == (x2.data_ptr(), y2.data_ptr(), 100, 8, 0.5, True, 32)
    # the sequence keeps no tensor
    assert not any(isinstance(v, torch.Tensor) for site in sequence.sites
                   for v in site.template)


def test_new_alignment_misses_then_is_absorbed(kernel):
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    sequence = LaunchSequence.build(_record(kernel, (x, y)), (x, y))
    kernel.launches.clear()
    shifted = torch.zeros(65, dtype=torch.float16)[1:]  # 2 bytes past 16-byte alignment
    assert not sequence.launch((shifted, y)) and kernel.launches == []
    captured = _record(kernel, (shifted, y))
    assert kernel.compiles == 2  # Triton compiles the unaligned variant
    assert sequence.absorb(captured, (shifted, y))
    kernel.launches.clear()
    assert sequence.launch((shifted, y))
    assert kernel.launches[0][0] is captured.launches[0].compiled
    assert sequence.launch((x, y))  # the aligned kernel is still there
    assert kernel.launches[1][0] is not kernel.launches[0][0]


def test_an_odd_address_misses_what_an_even_one_recorded(kernel):
    """The launcher reads an 8-bit V cache as int16 pairs at an even address only: a
    sequence recorded with an input at an even unaligned address is not replayed at an
    odd one (a miss, then absorbed as its own), and the odd one's entry replays."""
    base = torch.zeros(80, dtype=torch.uint8)
    even, odd = base[2:66], base[3:67]
    assert even.data_ptr() % 16 == 2 and odd.data_ptr() % 2 == 1
    y = torch.zeros(64)
    sequence = LaunchSequence.build(_record(kernel, (even, y)), (even, y))
    kernel.launches.clear()
    assert sequence.launch((even, y)) and len(kernel.launches) == 1
    assert not sequence.launch((odd, y)) and len(kernel.launches) == 1
    assert sequence.absorb(_record(kernel, (odd, y)), (odd, y))
    kernel.launches.clear()
    assert sequence.launch((odd, y)) and len(kernel.launches) == 1


def test_absorb_refuses_a_different_structure(kernel):
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    sequence = LaunchSequence.build(_record(kernel, (x, y)), (x, y))
    assert not sequence.absorb(_record(kernel, (x, y), n=101), (x, y))
    assert not sequence.absorb(_record(kernel, (x, y), BLOCK=64), (x, y))
    assert not sequence.absorb(_record(kernel, (y, x)), (x, y))  # roles swapped
    assert sequence.absorb(_record(kernel, (x, y)), (x, y))


def test_unbindable_or_aliased_tensors(kernel):
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    with pytest.raises(Unusable, match="not one of the call's inputs"):
        LaunchSequence.build(_record(kernel, (x, y)), (x,))
    with pytest.raises(Ambiguous):
        LaunchSequence.build(_record(kernel, (x, x)), (x, x))
    base = torch.zeros(128)
    with pytest.raises(Ambiguous, match="shares its storage"):  # a view of two inputs
        LaunchSequence.build(_record(kernel, (x, base[8:])), (x, base[:4], base[4:]))
    # a view starting where one of them starts is that one
    sequence = LaunchSequence.build(_record(kernel, (x, base[4:10])), (x, base[:4], base[4:]))
    assert sequence.used == (0, 2) and sequence.sites[0].binds[1][2] == 0


def test_workspace_views_are_bound_by_offset(kernel):
    x = torch.zeros(64, dtype=torch.float16)
    ws = torch.zeros(256)
    sequence = LaunchSequence.build(_record(kernel, (x, ws[16:])), (x, ws))
    ws2 = torch.zeros(256)
    kernel.launches.clear()
    assert sequence.launch((x, ws2))
    assert kernel.launches[0][1][10] == ws2.data_ptr() + 16 * 4


def test_a_view_at_an_odd_offset_is_keyed_by_its_inputs_residue(kernel):
    """y is a workspace view 8 bytes in: its alignment is the workspace's address plus 8,
    so workspaces at residues 8 and 4 (both unaligned) give an aligned and an unaligned
    y, which Triton compiles apart: the second must not reuse the first's kernel."""
    x = torch.zeros(64, dtype=torch.float16)
    base = torch.zeros(512)
    ws = base[:256]
    sequence = LaunchSequence.build(_record(kernel, (x, ws[2:])), (x, ws))
    assert sequence.by_residue == (False, True)
    at8, at4 = base[2:258], base[1:257]
    assert at8.data_ptr() % 16 == 8 and at4.data_ptr() % 16 == 4
    kernel.launches.clear()
    assert not sequence.launch((x, at8)) and kernel.launches == []
    assert sequence.absorb(_record(kernel, (x, at8[2:])), (x, at8))
    assert not sequence.launch((x, at4))  # unaligned too, but y is not aligned here
    assert sequence.absorb(_record(kernel, (x, at4[2:])), (x, at4))
    kernel.launches.clear()
    assert sequence.launch((x, at8)) and sequence.launch((x, at4))
    assert sequence.launch((x, ws))
    (aligned_y, call), (unaligned_y, _), (recorded, _) = kernel.launches
    assert call[10] == at8.data_ptr() + 8 and call[10] % 16 == 0
    assert aligned_y is not unaligned_y and unaligned_y is recorded
    assert kernel.compiles == 2


def test_a_sequence_of_two_launches_is_one_lookup(kernel):
    """Both launches' kernels sit under one key; a miss for either launches nothing."""
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)

    def record(a, b):
        with capture() as captured:
            capturable(kernel)[(4, 2)](a, b, 100, 8, 0.5, True, BLOCK=32)
            capturable(kernel)[(1,)](b, a, 7, 1, 1.0, False, BLOCK=16)
        captured.triton_launches = len(captured.launches)
        return captured

    sequence = LaunchSequence.build(record(x, y), (x, y))
    assert len(sequence.table) == 1
    assert len(next(iter(sequence.table.values()))) == 2 * launch_entries.ENTRY_FIELDS
    kernel.launches.clear()
    shifted = torch.zeros(65, dtype=torch.float16)[1:]
    assert not sequence.launch((shifted, y)) and kernel.launches == []
    assert sequence.absorb(record(shifted, y), (shifted, y)) and len(sequence.table) == 2
    kernel.launches.clear()
    assert sequence.launch((shifted, y))
    (first, call0), (second, call1) = kernel.launches
    assert call0[:3] == (4, 2, 1) and call1[:3] == (1, 1, 1)
    assert call0[9:11] == (shifted.data_ptr(), y.data_ptr())
    assert call1[9:11] == (y.data_ptr(), shifted.data_ptr())


def test_the_caller_may_pass_the_current_device_and_stream(monkeypatch):
    require_native_binder()
    asked = []
    monkeypatch.setattr(fast_launch, "_device_functions", lambda: (
        lambda: asked.append("device") or 0, lambda d: asked.append(("stream", d)) or 77))
    kernel = FakeKernel()
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    sequence = LaunchSequence.build(_record(kernel, (x, y)), (x, y), device=0)
    kernel.launches.clear()
    asked.clear()
    assert sequence.launch((x, y), 0, 55)
    assert asked == [] and kernel.launches[-1][1][3] == 55
    assert sequence.launch((x, y), 0)
    assert asked == [("stream", 0)] and kernel.launches[-1][1][3] == 77
    assert not sequence.launch((x, y), 1, 55)  # nothing compiled for device 1 yet
    assert sequence.launch((x, y)) and asked[-2:] == ["device", ("stream", 0)]


def test_triton_state_is_remembered_until_something_it_reads_changes(monkeypatch):
    state = fast_launch.triton_state()
    assert state is not None and fast_launch.triton_state() is state
    monkeypatch.setattr(knobs.runtime, "debug", not state[0])
    assert fast_launch.triton_state() == (not state[0], *state[1:])
    monkeypatch.undo()
    assert fast_launch.triton_state() == state
    # the compilation knobs the JIT passes as options, set in process (as a profiler
    # sets the instrumentation mode), each where the installed Triton has it
    present = [name for name in fast_launch.JIT_COMPILATION_KNOBS
               if hasattr(knobs.compilation, name)]
    assert len(state) == 1 + len(present)
    for i, (name, value) in enumerate(zip(present, ("fpsan", True)), start=1):
        monkeypatch.setattr(knobs.compilation, name, value)
        assert fast_launch.triton_state() == (*state[:i], value, *state[i + 1:])
        monkeypatch.undo()
        assert fast_launch.triton_state() == state
    # a stages-inspection hook (Triton 3.7 on key kernels by its custom pipeline)
    monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", lambda: ("k", "h"),
                        raising=False)
    assert fast_launch.triton_state() is None
    monkeypatch.undo()
    assert fast_launch.triton_state() == state

    def hook(metadata):
        pass

    knobs.runtime.launch_exit_hook.add(hook)
    try:
        assert fast_launch.triton_state() is None
    finally:
        knobs.runtime.launch_exit_hook.remove(hook)
    assert fast_launch.triton_state() == state
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)  # a plain function
    assert fast_launch.triton_state() is None
    monkeypatch.undo()
    assert fast_launch.triton_state() == state


def test_a_reader_reads_only_the_inputs_the_launches_bind(kernel):
    """With a reader the relaunch takes the caller's arguments and evaluates only the
    sources of bound inputs (an unbound one may be costly, or absent)."""
    evaluated = []

    def scale_of(holder):
        evaluated.append(holder)
        return holder.scale

    class Holder:
        def __init__(self, n):
            self.y = torch.zeros(n)
            self.scale = torch.ones(1)

    reader = fast_launch.Reader("x, holder", ("x", "holder.y", "scale_of(holder)"),
                                {"scale_of": scale_of})
    x, holder = torch.zeros(64, dtype=torch.float16), Holder(64)
    inputs = reader.read(x, holder)
    assert inputs == (x, holder.y, holder.scale) and evaluated == [holder]
    sequence = LaunchSequence.build(_record(kernel, inputs), inputs, reader=reader)
    kernel.launches.clear()
    x2, holder2 = torch.ones(64, dtype=torch.float16), Holder(64)
    assert sequence.launch(x2, holder2)
    assert kernel.launches[0][1][9:11] == (x2.data_ptr(), holder2.y.data_ptr())
    assert evaluated == [holder]  # the scale is bound by no launch: never read
    holder2.y = None
    assert not sequence.launch(x2, holder2)  # a bound input is missing: the normal path
    # a source may name the relaunch's device and stream (None when read for a recording)
    seen = []

    def on_queue(holder, device, stream):
        seen.append((device, stream))
        return holder.scale

    queued = fast_launch.Reader("x, holder", ("x", "on_queue(holder, device, stream)"),
                                {"on_queue": on_queue})
    inputs = queued.read(x, holder)
    assert inputs == (x, holder.scale) and seen == [(None, None)]
    sequence = LaunchSequence.build(_record(kernel, inputs), inputs, reader=queued)
    assert sequence.launch(x2, Holder(64)) and seen[1:] == [(0, 77)]
    assert sequence.launch(x2, Holder(64), device=0, stream=5) and seen[2:] == [(0, 5)]
    for params, namespace in (("x, device", None), ("x", {"_helper": len}), ("x, 1y", None)):
        with pytest.raises(ValueError, match="not a free identifier"):
            fast_launch.Reader(params, ("x",), namespace)


def test_launch_hooks_and_pre_run_hooks_take_the_jit_path(kernel):
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    sequence = LaunchSequence.build(_record(kernel, (x, y)), (x, y))

    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert fast_launch.triton_state() is None
        assert not sequence.launch((x, y))
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert sequence.launch((x, y))
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    assert not sequence.launch((x, y))


def test_triton_disagreeing_makes_the_sequence_unusable(kernel):
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    captured = _record(kernel, (x, y))
    kernel_cache = kernel.device_caches[0][0]
    for key in kernel_cache:
        kernel_cache[key] = FakeCompiled(kernel, key)  # not what the launch returned
    with pytest.raises(Unusable, match="another kernel"):
        LaunchSequence.build(captured, (x, y))


#: a kernel module's globals, as Triton's ``used_global_vals`` points into them
_KERNEL_GLOBALS = {"PTX": tl.constexpr("mov.b32 $0, $1;"), "BLOCK": tl.constexpr(64),
                   "LIMIT": 64, "SHAPES": tl.constexpr([16, 32])}


def _reads(*names):
    """``used_global_vals`` of a kernel that read ``names`` of :data:`_KERNEL_GLOBALS` when
    it compiled (Triton keeps a deep copy of each value beside the module's dict)."""
    import copy

    return {(n, id(_KERNEL_GLOBALS)): (copy.deepcopy(_KERNEL_GLOBALS[n]), _KERNEL_GLOBALS)
            for n in names}


def test_only_unchanged_constexpr_globals_are_left_to_the_compiled_kernel(monkeypatch):
    """Triton checks a kernel's global variables on every launch (3.8 on: also those of
    every function it calls, e.g. byte_decode's PTX constants). A relaunch leaves
    unchecked only ``tl.constexpr`` constants of plain values still equal to what the
    kernel compiled with; a plain global, a constexpr of a mutable value, one rebound or
    removed since, or one whose value changed type is refused."""
    class Fn:
        used_global_vals: dict = {}

    fn = Fn()
    assert fast_launch.mutable_globals(fn) == []
    fn.used_global_vals = _reads("PTX", "BLOCK")
    assert fast_launch.mutable_globals(fn) == []
    fn.used_global_vals = _reads("PTX", "LIMIT", "SHAPES")
    assert fast_launch.mutable_globals(fn) == ["LIMIT", "SHAPES"]
    fn.used_global_vals = _reads("PTX", "BLOCK")
    monkeypatch.setitem(_KERNEL_GLOBALS, "PTX", tl.constexpr("mov.b32 $0, 0;"))
    monkeypatch.setitem(_KERNEL_GLOBALS, "BLOCK", tl.constexpr(32))  # another value
    assert fast_launch.mutable_globals(fn) == ["PTX", "BLOCK"]
    monkeypatch.setitem(_KERNEL_GLOBALS, "BLOCK", tl.constexpr(64.0))  # equal, not the same
    monkeypatch.delitem(_KERNEL_GLOBALS, "PTX")
    assert fast_launch.mutable_globals(fn) == ["PTX", "BLOCK"]


def test_a_kernel_reading_globals_is_relaunched_only_if_they_are_constants(kernel):
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    kernel.used_global_vals = _reads("PTX", "BLOCK")
    sequence = LaunchSequence.build(_record(kernel, (x, y)), (x, y))
    assert sequence.launch((torch.zeros(64, dtype=torch.float16), y))
    kernel.used_global_vals = _reads("PTX", "LIMIT")
    with pytest.raises(Unusable, match="global variables Triton checks per launch: LIMIT"):
        LaunchSequence.build(_record(kernel, (x, y)), (x, y))


@pytest.mark.interpreter  # (runs no kernel: marked so CI's other-Triton tiers run it)
def test_the_packages_kernels_read_no_global_a_relaunch_would_leave_unchecked():
    """Every kernel the launchers wrap, compiled by the installed Triton (its cache key
    fills ``used_global_vals``; in a child process without the interpreter, where the
    kernels are Triton's JIT functions): nothing but unchanged constants. On Triton 3.8
    the unified kernel reads byte_decode's seven PTX constants; before they were
    accepted, every unified launch took the JIT path there (100-150 us per call)."""
    import subprocess
    import sys

    script = (
        "from portattn.kernels import fast_launch, gluon_launch, launch, stage_launch\n"
        "for k in (launch.unified_attention_kernel, launch.merge_segments_kernel,\n"
        "          stage_launch.stage_kv_kernel, gluon_launch._kernel()):\n"
        "    k.fn.cache_key\n"
        "    print(k.fn.__name__, len(k.fn.used_global_vals),\n"
        "          ','.join(fast_launch.mutable_globals(k.fn)) or '-')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [r[0] for r in rows] == ["unified_attention_kernel", "merge_segments_kernel",
                                    "stage_kv_kernel", "gluon_prefill_kernel"]
    assert all(r[2] == "-" for r in rows), rows
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8):
        assert int(rows[0][1]) > 0, "3.8 on: the unified kernel reads byte_decode's PTX"


def test_uncounted_or_unwrapped_launches_are_refused(kernel):
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    captured = _record(kernel, (x, y))
    captured.triton_launches = None
    with pytest.raises(Unusable, match="cannot be counted"):
        LaunchSequence.build(captured, (x, y))
    captured.triton_launches = 2
    with pytest.raises(Unusable, match="2 launches but 1 were recorded"):
        LaunchSequence.build(captured, (x, y))


def test_a_capture_ending_in_another_thread_leaves_this_threads_count_whole(monkeypatch):
    """Triton's HookChain walks its list while it calls the hooks: a hook removed
    meanwhile (another thread's capture ending) makes it skip the next one. With one
    counting hook per capture, this thread's launch went uncounted and its sequence was
    refused for good ("Triton made 0 launches but 1 were recorded")."""
    chain = knobs.HookChain()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # hooks count (no launch runs here)
    me = threading.get_ident()
    with _capture_open_in_another_thread() as end_other:
        def profiler(_metadata):  # a hook after the other thread's counter: it ends
            if threading.get_ident() == me:  # meanwhile
                end_other()

        chain.add(profiler)
        try:
            with capture() as captured:
                chain(None)  # one launch of this thread: Triton calls its enter hooks
        finally:
            chain.remove(profiler)
    assert captured.triton_launches == 1
    assert chain.calls == []  # the counting hook left with the last capture


@contextmanager
def _capture_open_in_another_thread():
    """A capture held open by another thread for the duration of the block; the block
    gets ``end()``, which closes that capture and returns once it has ended."""
    opened, close, closed = threading.Event(), threading.Event(), threading.Event()

    def other_thread():
        with capture():
            opened.set()
            close.wait(10)
        closed.set()

    def end():
        close.set()
        assert closed.wait(10)

    other = threading.Thread(target=other_thread)
    other.start()
    try:
        assert opened.wait(10)
        yield end
    finally:
        close.set()
        other.join(10)


def test_another_threads_open_capture_does_not_turn_relaunches_off(monkeypatch):
    """While one thread records (our counter in the enter chain), the others' Triton state
    is still known: the counter is not a user's hook. It was taken for one, so another
    thread's recording built meanwhile failed, and was refused for good when it re-checked
    after the capture had closed. A real hook still turns relaunches off."""
    chain = knobs.HookChain()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fast_launch._state_memo = None
    before = fast_launch.triton_state()
    assert before is not None
    with _capture_open_in_another_thread():
        assert chain.calls  # the counter is in the chain
        assert fast_launch.triton_state() == before
        fast_launch._state_memo = None  # computed afresh: the same answer
        assert fast_launch.triton_state() == before

        def profiler(_metadata):
            pass

        chain.add(profiler)
        try:
            assert fast_launch.triton_state() is None
        finally:
            chain.remove(profiler)
    assert chain.calls == [] and fast_launch.triton_state() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_during_a_capture_starts_without_the_counter(monkeypatch):
    """A fork while another thread records: the child has no such thread, so the counter
    must leave the copied chain there (else every relaunch of the child is off for good)
    and the next capture of the child must count from scratch."""
    chain = knobs.HookChain()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with _capture_open_in_another_thread():
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running pytest's teardown
            try:
                empty_after_fork = chain.calls == []
                with capture() as captured:
                    chain(None)
                ok = empty_after_fork and captured.triton_launches == 1 and chain.calls == []
                os.write(write, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(write)
        answer = os.read(read, 1)
        os.close(read)
        os.waitpid(pid, 0)
    assert answer == b"1"


def test_interpreted_kernels_are_refused(kernel):
    x, y = torch.zeros(8), torch.zeros(8)

    class Interpreted:  # what TRITON_INTERPRET=1 makes of @triton.jit: no compiled kernel
        pre_run_hooks: list = []

    launch = Launch(Interpreted(), (1,), (x, y, 1, 1, 1.0, True), {"BLOCK": 16}, None)
    with pytest.raises(Unusable, match="not a compiled JIT kernel"):
        LaunchSequence.build(Captured([launch], 1), (x, y))


@pytest.mark.interpreter
def test_capture_under_the_interpreter_has_nothing_to_replay():
    from portattn.kernels import launch

    assert type(launch.unified_attention_kernel.fn).__name__ == "InterpretedFunction"
    with capture() as captured:
        pass
    assert captured.triton_launches is None  # no launch hooks run in the interpreter


def test_driver_launch_calls_the_c_entry_only_without_scratch(monkeypatch):
    """The relauncher calls Triton's C entry point directly only for CUDA launchers of
    kernels without global / profiling scratch (the launcher allocates those); any other
    launcher is called as itself, with the same arguments minus the fixed ones."""
    from portattn.kernels.launch_entries import driver_launch

    calls = []

    class CudaLauncher:  # the name is what driver_launch checks, as Triton's class
        def __init__(self, scratch):
            self.global_scratch_size = scratch
            self.profile_scratch_size = 0
            self.launch_cooperative_grid = False
            self.launch_pdl = True

        def launch(self, *args):
            calls.append(("c", args))

        def __call__(self, *args):
            calls.append(("run", args))

    from triton.backends.nvidia import driver as nvidia_driver

    # the driver of the launch entry the relaunch knows (Triton 3.6's), on any release
    monkeypatch.setattr(nvidia_driver, "_BASE_ARGS_FORMAT", launch_entries.C_LAUNCH_FORMAT,
                        raising=False)
    plain = CudaLauncher(0)
    launch, cooperative, pdl = driver_launch(plain)
    assert launch == plain.launch and (cooperative, pdl) == (False, True)
    with_scratch = CudaLauncher(64)
    launch, cooperative, pdl = driver_launch(with_scratch)
    launch(1, 2, 3, "stream", "fn", cooperative, pdl, None, None, "meta", None, None, None, 7)
    assert calls == [("run", (1, 2, 3, "stream", "fn", "meta", None, None, None, 7))]
    launch, *_ = driver_launch(lambda *a: calls.append(("other", a)))
    launch(1, 1, 1, "s", "f", False, False, None, None, "m", None, None, None)
    assert calls[-1] == ("other", (1, 1, 1, "s", "f", "m", None, None, None))


@pytest.mark.parametrize("layout", ["kernel", "shared"])
def test_a_relaunch_with_scratch_sets_the_allocator_in_any_thread(layout, monkeypatch):
    """A kernel with global scratch (device-side descriptors) is relaunched through
    Triton's launcher object, which allocates it with the allocator of the calling
    context (a ContextVar). The recording call's normal path set one in that thread's
    context only; a relaunch from another thread (a fresh context) must find one too,
    not Triton's "no allocator was set"."""
    from triton.runtime import _allocation

    from portattn.kernels import launch as launch_mod

    entries = []

    class CudaLauncher:  # as Triton's: a kernel with scratch is allocated for in __call__
        global_scratch_size, global_scratch_align = 64, 128
        profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False

        def launch(self, *args):  # pragma: no cover - the adapter must not call it
            raise AssertionError("the C entry of a kernel with scratch")

        def __call__(self, gx, gy, gz, stream, function, *args):
            scratch = _allocation._allocator.get()(self.global_scratch_size,
                                                   self.global_scratch_align, stream)
            entries.append(scratch)

    run = CudaLauncher()
    monkeypatch.setattr(launch_mod, "_scratch", lambda size, align, stream: torch.empty(
        size, dtype=torch.uint8))  # the CPU's stand-in for the device allocation
    if layout == "kernel":
        entry = launch_entries.driver_launch(run)[0]
        args = (4, 1, 1, 0, 0, False, False, None, None, None, None, None, None)
    else:
        entry = launch_entries.shared_launch(run)[0]
        args = (4, 1, 1, 0, 0, False, False, None, None, None, None, None, None, None,
                None, ())
    assert entry is not run.launch  # the adapter, which lets the launcher allocate
    outcome = {}

    def relaunch():
        before = type(_allocation._allocator.get()).__name__
        try:
            entry(*args)
            outcome["result"] = (before, "launched")
        except Exception as exc:  # pragma: no cover - the failure this test catches
            outcome["result"] = (before, f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=relaunch)  # a fresh context: no allocator set
    thread.start()
    thread.join()
    assert outcome["result"] == ("NullAllocator", "launched")
    assert len(entries) == 1 and entries[0].numel() == 64


def test_a_cuda_launcher_without_the_c_entry_is_called_as_the_jit_calls_it(kernel,
                                                                           monkeypatch):
    """Where the relaunch cannot call a C entry itself (no 3.6 per-kernel entry, and a
    launcher that is not Triton's own 3.7 or 3.9 one: here a stand-in class), it calls the
    launcher object, in the JIT's order, never its entry; a launcher whose ``__call__``
    takes other leading arguments keeps the JIT path."""
    from triton.backends.nvidia import driver as nvidia_driver

    from portattn.kernels.launch_entries import c_launch_known, driver_launch

    calls: list = []

    class CudaLauncher:  # Triton 3.7's launcher object, as driver_launch recognises it
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False

        def launch(self, *args):
            calls.append(("c", args))

        def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata,
                     launch_metadata, launch_enter_hook, launch_exit_hook, *args):
            calls.append(("run", (gridX, gridY, gridZ, stream, function, kernel_metadata,
                                  launch_metadata, launch_enter_hook, launch_exit_hook,
                                  *args)))

    launcher = CudaLauncher()
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    # Triton 3.6's driver module (the pinned release's), then one of 3.7 on
    monkeypatch.setattr(nvidia_driver, "_BASE_ARGS_FORMAT", launch_entries.C_LAUNCH_FORMAT,
                        raising=False)
    assert c_launch_known()
    assert driver_launch(launcher)[0] == launcher.launch
    monkeypatch.delattr(nvidia_driver, "_BASE_ARGS_FORMAT")
    assert not c_launch_known()
    launch, *_ = driver_launch(launcher)
    launch(1, 2, 3, "s", "f", False, False, None, None, "meta", None, None, None, 7)
    assert calls == [("run", (1, 2, 3, "s", "f", "meta", None, None, None, 7))]

    calls.clear()
    recorded = _record(DescriptorKernel(toy, launcher), (x, y))
    sequence = LaunchSequence.build(recorded, (x, y))
    x2 = torch.zeros(64, dtype=torch.float16)
    assert sequence.launch((x2, y))
    assert [kind for kind, _ in calls] == ["run"]
    args = calls[0][1]
    assert args[9:] == (x2.data_ptr(), y.data_ptr(), 100, 8, 0.5, True, 32)

    def called_another_way():
        class CudaLauncher(launcher.__class__):  # a release calling its launcher so
            def __call__(self, grid, stream, function, *args):
                calls.append(("other", args))
        return CudaLauncher()

    other = called_another_way()
    assert not launch_entries.launcher_call_known(other)

    class Shifted:  # a parameter more after function: the relaunch's would shift
        def __call__(self, gridX, gridY, gridZ, stream, function, cluster_dims,
                     kernel_metadata, launch_metadata, launch_enter_hook,
                     launch_exit_hook, *args):
            pass

    class Keyword:  # the 3.6 form with a keyword after *args
        def __call__(self, gridX, gridY, gridZ, stream, function, *args, scratch=None):
            pass

    assert launch_entries.launcher_call_known(launcher)
    assert not launch_entries.launcher_call_known(Shifted())
    assert not launch_entries.launcher_call_known(Keyword())
    with pytest.raises(Unusable, match="called with other arguments"):
        LaunchSequence.build(_record(DescriptorKernel(toy, other), (x, y)), (x, y))


def test_fixed_values_are_passed_as_prebuilt_runs_in_parameter_order():
    from portattn.kernels.fast_launch import _call_arguments

    namespace: dict = {}
    args = _call_arguments(["a", None, "b", 3, None, 4.0], {1: "p1", 4: "p4"}, "c_", namespace)
    assert args == ["*c_0", "p1", "*c_2", "p4", "*c_5"]
    assert namespace == {"c_0": ("a",), "c_2": ("b", 3), "c_5": (4.0,)}
    assert _call_arguments([None], {0: "p0"}, "c_", {}) == ["p0"]


def toy_desc(desc, y_ptr, n, BLOCK: tl.constexpr):
    pass  # a signature only: a host tensor descriptor first


def test_host_descriptors_are_rebuilt_around_the_new_base(monkeypatch):
    """A host ``TensorDescriptor`` over a workspace view: its base is bound like a tensor
    (by offset), its layout is fixed; a relaunch passes a descriptor of the same layout
    around the new workspace's address, and a different block shape (another compiled
    kernel for Triton) or a descriptor of a foreign tensor is refused."""
    require_native_binder()
    from triton.tools.tensor_descriptor import TensorDescriptor

    monkeypatch.setattr(fast_launch, "_device_functions", lambda: (lambda: 0, lambda d: 77))
    kernel = FakeKernel(toy_desc)
    ws, y = torch.zeros(4096, dtype=torch.bfloat16), torch.zeros(64)

    def record(desc):
        with capture() as captured:
            capturable(kernel)[(4, 2)](desc, y, 100, BLOCK=32)
        captured.triton_launches = len(captured.launches)
        return captured

    def rows(base, box):
        return TensorDescriptor(base, [28, 8, 16], [128, 16, 1], [box, 1, 16])

    sequence = LaunchSequence.build(record(rows(ws[512:], 8)), (ws, y))
    assert sequence.sites[0].descriptors[0][1:] == ((28, 8, 16), (128, 16, 1), (8, 1, 16),
                                                    "zero", False)
    ws2 = torch.zeros(4096, dtype=torch.bfloat16)
    kernel.launches.clear()
    assert sequence.launch((ws2, y))
    _compiled, call = kernel.launches[0]
    desc = call[9]
    assert isinstance(desc, launch_entries.HostDescriptor)
    assert desc.base.data_ptr() == ws2.data_ptr() + 512 * 2
    assert (desc.shape, desc.strides, desc.padding) == ((28, 8, 16), (128, 16, 1), "zero")
    assert call[10:] == (y.data_ptr(), 100, 32)
    assert sequence.absorb(record(rows(ws[512:], 8)), (ws, y))
    assert not sequence.absorb(record(rows(ws[512:], 4)), (ws, y))  # another box
    assert not sequence.absorb(record(rows(ws[1024:], 8)), (ws, y))  # another offset
    with pytest.raises(Unusable, match="not one of the call's inputs"):
        LaunchSequence.build(record(rows(torch.zeros(4096, dtype=torch.bfloat16), 8)),
                             (ws, y))


def _require_known_c_launch() -> None:
    """Skip where Triton's CUDA launch entry is not 3.6's (3.7 on): these tests drive
    Triton 3.6's descriptor wrapper around that entry (3.7 on: the ``_shared_entry``
    tests)."""
    if not launch_entries.c_launch_known():
        pytest.skip(f"Triton {triton.__version__}'s CUDA launch entry is not the one the "
                    "relaunch calls")


@pytest.mark.interpreter
def test_the_known_launch_entry_is_that_of_triton_3_5_and_3_6():
    """The installed Triton's driver is read as it is (CI runs this on 3.5.1, 3.6 and the
    newest release): 3.5 and 3.6 have the per-kernel C entry the relaunch calls, 3.7 to
    3.9 the shared one whose argument format their driver's C source declares."""
    from packaging.version import Version

    release = Version(triton.__version__).release[:2]
    assert launch_entries.c_launch_known() == (release in {(3, 5), (3, 6)})
    if release > (3, 9):
        pytest.skip(f"Triton {triton.__version__} is not a release whose shared launch "
                    "entry was read (3.7.1, 3.8.0, 3.9.0)")
    assert launch_entries.shared_launch_known() == (release >= (3, 7))
    assert launch_entries.argument_layout() == ("shared" if release >= (3, 7) else "kernel")


def test_the_shared_entry_is_recognised_by_its_parse_format_in_the_driver_source(tmp_path):
    """The shared entry is known only where the function registered as ``launch`` parses
    exactly :data:`SHARED_LAUNCH_FORMAT` (a driver source of another release, or with
    the format elsewhere, is not)."""
    fmt = launch_entries.SHARED_LAUNCH_FORMAT

    def source(name, body_fmt, registered="launchKernel"):
        path = tmp_path / name
        path.write_text(
            "static PyObject *getDeviceProperties(PyObject *self, PyObject *args) {}\n"
            f"static PyObject *launchKernel(PyObject *self, PyObject *args) {{\n"
            f'  if (!PyArg_ParseTuple(args, "{body_fmt}", &gridX)) return NULL;\n}}\n'
            "static PyMethodDef ModuleMethods[] = {\n"
            f'    {{"launch", {registered}, METH_VARARGS, "launches cuda kernel"}},\n'
            "};\n")
        return str(path)

    assert launch_entries._parses(source("a.c", fmt), fmt)
    assert not launch_entries._parses(source("b.c", fmt + "O"), fmt)  # another release's
    assert not launch_entries._parses(source("c.c", fmt, "getDeviceProperties"), fmt)
    assert not launch_entries._parses(str(tmp_path / "missing.c"), fmt)


@pytest.mark.interpreter
def test_the_installed_cuda_launcher_is_called_in_the_jits_order():
    """Triton's own CUDA launcher class, read as installed (CI: 3.5.1, 3.6 and the newest
    release): its ``__call__`` takes what the relaunch passes where it calls the launcher
    object instead of a C entry (kernels with scratch, releases it does not know)."""
    from triton.backends.nvidia import driver as nvidia_driver

    launcher = object.__new__(nvidia_driver.CudaLauncher)  # no GPU here to build one
    assert launch_entries.launcher_call_known(launcher)
    assert not launch_entries.launcher_call_known(lambda *args: None)


@pytest.mark.interpreter
def test_jit_run_options_are_what_the_installed_jit_passes():
    """:func:`fast_launch.jit_run_options` against Triton's own ``JITFunction.run``: the
    kwargs a pre-run hook of a real ``JITFunction`` receives (the run is stopped there,
    before anything compiles), with and without an explicit ``debug``."""
    import triton.runtime.jit as triton_jit

    class Stop(Exception):
        pass

    class Driver:  # no GPU here: the device and stream run() asks for before the hooks
        class active:
            get_current_device = staticmethod(lambda: 0)
            get_current_stream = staticmethod(lambda device: 0)

    seen: list = []

    def hook(*args, **kwargs):
        seen.append(kwargs)
        raise Stop

    jit = JITFunction(toy)
    jit.add_pre_run_hook(hook)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_jit, "driver", Driver)
        for extra in ({}, {"debug": True}):
            with pytest.raises(Stop):
                jit[(1,)](torch.zeros(8), torch.zeros(8), 3, 1, 1.0, False, BLOCK=16,
                          **extra)
    expected = [fast_launch.jit_run_options({"BLOCK": 16}, False),
                fast_launch.jit_run_options({"BLOCK": 16, "debug": True}, False)]
    assert seen == expected


class DescriptorKernel(FakeKernel):
    """A stand-in kernel whose compiled kernels' launcher is Triton's CUDA launcher shape
    with its C entry behind Triton's own ``wrap_handle_tensordesc`` (``launcher``)."""

    def __init__(self, fn, launcher):
        super().__init__(fn)
        self.launcher = launcher

    def __getitem__(self, grid):
        run = super().__getitem__(grid)

        def with_launcher(*args, **kwargs):
            compiled = run(*args, **kwargs)
            compiled.run = self.launcher
            return compiled
        return with_launcher


def behind_descriptor_wrapper(fn, signature: dict, metas):
    """``(kernel, wrapper, c_calls)``: a stand-in kernel of ``fn`` launched through Triton's
    descriptor wrapper (``wrapper``) around a C entry recording its calls (``c_calls``)."""
    from triton.backends.nvidia import driver as nvidia_driver

    c_calls: list = []
    wrapper = nvidia_driver.wrap_handle_tensordesc(lambda *args: c_calls.append(args),
                                                   signature, metas)

    class CudaLauncher:  # Triton's launcher object, as driver_launch recognises it
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False
        launch = staticmethod(wrapper)

    return DescriptorKernel(fn, CudaLauncher()), wrapper, c_calls


def _rows(base):
    """A 3-D host descriptor over ``base``: the descriptor-relaunch tests' layout."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(base, [28, 8, 16], [128, 16, 1], [8, 1, 16])


def _descriptor_sequence(kernel):
    """``(sequence, capture, workspace, y)``: one launch of ``kernel`` (``toy_desc``'s
    signature) over a descriptor into a workspace view, recorded and built."""
    ws, y = torch.zeros(4096, dtype=torch.bfloat16), torch.zeros(64)
    with capture() as captured:
        capturable(kernel)[(4, 2)](_rows(ws[512:]), y, 100, BLOCK=32)
    captured.triton_launches = len(captured.launches)
    return LaunchSequence.build(captured, (ws, y)), captured, ws, y


@pytest.mark.parametrize("with_meta", [False, True])
def test_descriptor_wrappers_are_bypassed_with_tensor_maps_kept_per_address(with_meta,
                                                                            monkeypatch):
    """For Triton's CUDA launcher of a kernel with host descriptors (its C entry wrapped by
    ``wrap_handle_tensordesc``), a relaunch calls the C entry with the arguments Triton's
    wrapper would pass, made by Triton's ``make_tensordesc_arg`` once per base address
    (with and without the compiler's descriptor metadata)."""
    require_native_binder()
    _require_known_c_launch()
    from triton.backends.nvidia import driver as nvidia_driver

    encodes: list = []
    triton_make = nvidia_driver.make_tensordesc_arg

    def fake_make(arg, meta):  # stands in for cuTensorMapEncodeTiled (needs a GPU)
        if meta is None:
            return triton_make(arg, None)
        encodes.append(arg.base.data_ptr())
        return [("map", arg.base.data_ptr(), meta["swizzle"]), *arg.shape, *arg.strides]

    monkeypatch.setattr(nvidia_driver, "make_tensordesc_arg", fake_make)
    monkeypatch.setattr(fast_launch, "_device_functions", lambda: (lambda: 0, lambda d: 77))
    signature = {0: "tensordesc<bf16[8,1,16]>", 1: "*fp32", 2: "i32", 3: "constexpr"}
    kernel, wrapper, c_calls = behind_descriptor_wrapper(
        toy_desc, signature, [{"swizzle": 128}] if with_meta else None)
    sequence, captured, ws, y = _descriptor_sequence(kernel)
    encodes.clear()
    for buffer in (ws, ws, torch.zeros(4096, dtype=torch.bfloat16)):
        assert sequence.launch((buffer, y))
        wrapper(4, 2, 1, 77, None, False, False, None, None, (4, 1, 0), None, None, None,
                _rows(buffer[512:]), y.data_ptr(), 100, 32)
        ours, triton_s = c_calls[-2], c_calls[-1]
        assert ours[:4] == (4, 2, 1, 77) and len(ours) == len(triton_s)
        if with_meta:
            assert ours[13:] == triton_s[13:]
        else:  # the base is an object with data_ptr() in both
            assert ours[13].data_ptr() == triton_s[13].data_ptr() == buffer.data_ptr() + 1024
            assert ours[14:] == triton_s[14:]
    if with_meta:  # Triton's wrapper: 3 encodes (one per launch); ours: one per address
        assert encodes.count(ws.data_ptr() + 1024) == 2 + 1
        assert len(encodes) == 3 + 2


def _shared_entry_launcher(nvidia_driver, launch, **fields):
    """Triton's own ``CudaLauncher`` (3.7 on) with ``launch`` as its entry: no GPU here to
    build one, so its fields are set as its ``__init__`` sets them."""
    launcher = object.__new__(nvidia_driver.CudaLauncher)
    launcher.__dict__.update(
        num_ctas=1, global_scratch_size=0, global_scratch_align=1, profile_scratch_size=0,
        profile_scratch_align=1, launch_cooperative_grid=False, launch_pdl=False,
        gsan_enabled=False, arg_annotations=("annotations",), kernel_signature=b"sig",
        launch=launch)
    launcher.__dict__.update(fields)
    return launcher


def _require_shared_entry() -> None:
    if launch_entries.argument_layout() != "shared":
        pytest.skip(f"Triton {triton.__version__} has no shared C launch entry the relaunch "
                    "knows (3.6: test_descriptor_wrappers_are_bypassed_...)")


def _no_gpu_driver(monkeypatch) -> None:
    """What ``CudaLauncher.__call__`` asks of the active driver, without a GPU."""
    import types

    from triton.runtime import driver as triton_driver

    monkeypatch.setattr(triton_driver, "_active", types.SimpleNamespace(
        utils=types.SimpleNamespace(is_stream_capturing=lambda stream: False)))
    monkeypatch.setattr(fast_launch, "_device_functions", lambda: (lambda: 0, lambda d: 77))


@pytest.mark.interpreter
@pytest.mark.parametrize("scratch", [0, 64])
def test_the_shared_entry_gets_what_tritons_launcher_passes_it(scratch, kernel, monkeypatch):
    """Triton 3.7 to 3.9 (CI: the newest release): a relaunch calls Triton's shared C entry
    itself, with what Triton's own ``CudaLauncher.__call__`` passes it for the JIT's call
    of the same kernel at the new pointers (grid, stream, metadata, hooks, scratch, the
    kernel's annotations and signature bytes, the arguments as one tuple). A kernel with
    scratch to allocate goes through ``__call__`` (the C entry gets what it allocated)."""
    require_native_binder()
    _require_shared_entry()
    from triton.backends.nvidia import driver as nvidia_driver
    from triton.runtime import _allocation

    _no_gpu_driver(monkeypatch)
    c_calls: list = []

    class Scratch:
        def get(self):
            return lambda size, align, stream: ("scratch", size, align, stream)

    monkeypatch.setattr(_allocation, "_allocator", Scratch())
    launcher = _shared_entry_launcher(nvidia_driver, lambda *args: c_calls.append(args),
                                      global_scratch_size=scratch)
    x, y = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    recorded = _record(DescriptorKernel(toy, launcher), (x, y))
    sequence = LaunchSequence.build(recorded, (x, y))
    # the C entry itself; only scratch needs the launcher's frame (which allocates it)
    assert (next(iter(sequence.table.values()))[0] is launcher.launch) == (not scratch)
    compiled = recorded.launches[0].compiled
    x2 = torch.zeros(64, dtype=torch.float16)
    assert sequence.launch((x2, y))
    launcher(4, 2, 1, 77, compiled.function, compiled.packed_metadata, None, None, None,
             x2, y, 100, 8, 0.5, True, 32)
    ours, jit_s = c_calls[-2], c_calls[-1]
    assert len(ours) == 16 and ours[:-1] == jit_s[:-1]
    assert ours[13:15] == (("annotations",), b"sig")
    assert ours[11] == (("scratch", 4 * 2 * scratch, 1, 77) if scratch else None)
    jit_args = list(jit_s[-1])
    jit_args[:2] = [x2.data_ptr(), y.data_ptr()]  # the JIT passed the tensors
    assert list(ours[-1]) == jit_args


@pytest.mark.parametrize("field,value", [(None, None), ("global_scratch_size", 64),
                                         ("profile_scratch_size", 64),
                                         ("gsan_enabled", True)])
def test_only_a_launcher_with_nothing_to_allocate_is_bypassed(field, value, monkeypatch):
    """Triton's own launcher class (as installed) with global or profiling scratch, or
    GSan (Triton's sanitizer, 3.8 on), to set up per launch is called as itself in either
    layout; without, its entry is called (3.6's only where the driver has that entry)."""
    from triton.backends.nvidia import driver as nvidia_driver

    entry = lambda *args: None  # noqa: E731
    launcher = _shared_entry_launcher(nvidia_driver, entry,
                                      **({field: value} if field else {}))
    plain = field is None
    assert (launch_entries.shared_launch(launcher)[0] is entry) == plain
    monkeypatch.setattr(nvidia_driver, "_BASE_ARGS_FORMAT", launch_entries.C_LAUNCH_FORMAT,
                        raising=False)
    assert (launch_entries.driver_launch(launcher)[0] is entry) == plain
    monkeypatch.setattr(nvidia_driver, "_BASE_ARGS_FORMAT", "iiiKKppOOOOOOO")
    assert launch_entries.driver_launch(launcher)[0] is not entry


@pytest.mark.interpreter
def test_a_launcher_call_doing_more_keeps_the_launcher_object(monkeypatch):
    """The shared entry is used only where ``CudaLauncher.__call__`` is one of the known
    bodies (3.7.1's, 3.8.0's, 3.9.0's names): a release whose call does one more thing before the
    entry (here: one more name) gets the launcher object, the ``"kernel"`` layout."""
    _require_shared_entry()
    from triton.backends.nvidia import driver as nvidia_driver

    known = nvidia_driver.CudaLauncher

    class CudaLauncher(known):
        def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata,
                     launch_metadata, launch_enter_hook, launch_exit_hook, *args):
            self.set_up_something_per_launch()
            return known.__call__(self, gridX, gridY, gridZ, stream, function,
                                  kernel_metadata, launch_metadata, launch_enter_hook,
                                  launch_exit_hook, *args)

    monkeypatch.setattr(nvidia_driver, "CudaLauncher", CudaLauncher)
    assert not launch_entries.shared_launch_known()
    assert launch_entries.argument_layout() == "kernel"
    monkeypatch.setattr(nvidia_driver, "CudaLauncher", known)
    assert launch_entries.argument_layout() == "shared"


def test_the_3_7_descriptor_wrapper_is_recognised_by_its_shape():
    """Triton 3.7's ``wrap_handle_tensordesc`` (a closure over the shared entry, the
    descriptors' indices and metadata, in the NVIDIA driver's module, which has no
    3.6 argument count; ``make_tensordesc_arg(arg, metadata)``) is unwrapped on any
    installed release; the same function in another module, over other names, or with
    a three-argument ``make_tensordesc_arg`` (3.8's and 3.9's) is not."""
    def wrapper_like(module=launch_entries.TRITON_CUDA_DRIVER, closure="tensordesc_meta",
                     make="def make_tensordesc_arg(arg, metadata):\n    return [arg]\n"):
        namespace = {"__name__": module}
        exec(make + f"""
def wrap_handle_tensordesc(launcher, tensordesc_indices, {closure}):
    def inner(*args):
        return launcher(*args[:-1], [make_tensordesc_arg(a, {closure}) for a in args[-1]],
                        tensordesc_indices)
    return inner
""", namespace)
        return namespace["wrap_handle_tensordesc"], namespace["make_tensordesc_arg"]

    def c_entry(*args):
        return args

    build, make = wrapper_like()
    unwrapped = launch_entries._unwrap_descriptor_launcher(build(c_entry, {0, 2}, ["m0", "m2"]),
                                                           [0, 2])
    assert unwrapped == (c_entry, ["m0", "m2"], make)
    assert launch_entries._unwrap_descriptor_launcher(build(c_entry, {0, 2}, ["m0", "m2"]),
                                                      [0, 1]) is None  # other positions
    for other in (dict(module="triton.backends.driver"), dict(closure="meta"),
                  dict(make="def make_tensordesc_arg(arg, metadata, _):\n    return [arg]\n")):
        build, _ = wrapper_like(**other)
        assert launch_entries._unwrap_descriptor_launcher(build(c_entry, {0}, ["m"]),
                                                          [0]) is None, other



def _nvidia_make(body: str, module: str = launch_entries.TRITON_CUDA_DRIVER):
    """A ``make_tensordesc_arg`` defined by ``body`` in a module named ``module``."""
    namespace = {"__name__": module}
    exec(body, namespace)
    return namespace["make_tensordesc_arg"]


IGNORES_BASE = "def make_tensordesc_arg(arg, metadata, _):\n    return [arg, metadata]\n"


@pytest.mark.parametrize("body,module,ignores", [
    (IGNORES_BASE, launch_entries.TRITON_CUDA_DRIVER, True),
    (IGNORES_BASE, "triton.backends.amd.driver", False),  # another backend's
    ("def make_tensordesc_arg(arg, metadata, base):\n    return [arg, base]\n", None, False),
    ("def make_tensordesc_arg(arg, metadata, base):\n    f = lambda: base\n"
     "    return [f()]\n", None, False),  # read in a closure
    ("def make_tensordesc_arg(arg, metadata, base):\n    del base\n    return [arg]\n",
     None, False),
    ("def make_tensordesc_arg(arg, metadata):\n    return [arg]\n", None, False),
    ("def make_tensordesc_arg(arg, metadata, _, *rest):\n    return [rest]\n", None, False),
])
def test_only_a_make_tensordesc_arg_ignoring_base_args_is_called_once_per_address(
        body, module, ignores):
    """Triton 3.8 / 3.9 pass ``make_tensordesc_arg`` the launch's base arguments too; an
    expansion is kept per address only where NVIDIA's function (its driver module, three
    parameters) never reads them: not read, read directly or in a closure, deleted, two
    or more parameters, another module."""
    make = _nvidia_make(body, module or launch_entries.TRITON_CUDA_DRIVER)
    assert launch_entries._ignores_base_args(make) == ignores


def test_the_3_8_descriptor_wrapper_is_recognised_by_its_shape():
    """Triton 3.8 / 3.9's ``wrap_handle_tensordesc_impl`` (in ``triton.backends.driver``: a
    closure over the shared entry, the kernel's signature, the descriptors' paths and
    metadata, and ``make_tensordesc_arg``) is unwrapped on any installed release where its
    descriptors are the flat signature's and its ``make_tensordesc_arg`` ignores
    ``base_args``: metadata per descriptor in parameter order, None for each when the
    list is empty; not elsewhere (another module, other closure names, other positions,
    a tuple parameter, a metadata list longer than the descriptors, or a ``make`` that
    reads ``base_args``)."""
    source = """
def wrap_handle_tensordesc_impl(launcher, signature, tensordesc_meta, make_tensordesc_arg):
    signature = tuple(signature.values())
    relevant_paths = {i: {} for i, t in enumerate(signature)
                      if isinstance(t, str) and t.startswith("tensordesc")}

    def inner(*args):
        return launcher(*args[:-1], (signature, relevant_paths, tensordesc_meta,
                                     make_tensordesc_arg))
    return inner
"""

    def wrapper(signature, metas, module="triton.backends.driver", make=IGNORES_BASE):
        namespace = {"__name__": module}
        exec(source, namespace)
        return namespace["wrap_handle_tensordesc_impl"](c_entry, signature, metas,
                                                        _nvidia_make(make))

    def c_entry(*args):
        return args

    flat = {"a": "constexpr", "d0": "tensordesc<bf16[8,16]>", "x": "*fp32",
            "d1": "tensordesc<bf16[8,16]>"}
    found = launch_entries._unwrap_shared_wrapper(wrapper(flat, ["m1", "m3"]), [1, 3])
    assert found is not None and found[0] is c_entry and found[1] == ["m1", "m3"]
    assert found[2]("arg", "m1") == ["arg", "m1"]  # make without the base arguments
    assert launch_entries._unwrap_shared_wrapper(wrapper(flat, []), [1, 3])[1] == [None, None]
    refused = [
        (wrapper(flat, ["m1", "m3"], module="triton.backends.nvidia.driver"), [1, 3]),
        (wrapper(flat, ["m1", "m3"]), [1]),  # other positions
        (wrapper(flat, ["m1", "m3", "m4"]), [1, 3]),
        (wrapper({"d0": "tensordesc<bf16[8,16]>", "t": ("i32", "i32")}, []), [0]),
        (wrapper(flat, [], make="def make_tensordesc_arg(arg, metadata, base):\n"
                               "    return [arg, base]\n"), [1, 3]),
    ]
    for launch, positions in refused:
        assert launch_entries._unwrap_shared_wrapper(launch, positions) is None
    renamed = wrapper(flat, [])
    renamed.__code__ = renamed.__code__.replace(
        co_freevars=tuple(n.replace("relevant_paths", "paths")
                          for n in renamed.__code__.co_freevars))
    assert launch_entries._unwrap_shared_wrapper(renamed, [1, 3]) is None

@pytest.mark.interpreter
@pytest.mark.parametrize("reads_base", [False, True])
@pytest.mark.parametrize("with_meta", [False, True])
def test_descriptors_reach_the_shared_c_entry_as_through_the_jit(with_meta, reads_base,
                                                                 monkeypatch):
    """Triton 3.7 on (CI: the newest release): a relaunch of a kernel with a host
    descriptor hands the shared C entry what it receives when the JIT's call passes a
    real ``TensorDescriptor`` at the new base (with and without the compiler's
    descriptor metadata; only the driver's tensor-map encoding and the C entry are
    stand-ins). The relaunch calls the entry with the maps made once per address
    (Triton's wrapper bypassed, as on 3.6): 3.7's wrapper, and 3.8's / 3.9's (the C++
    argument walk) where ``make_tensordesc_arg`` ignores its third argument, as NVIDIA's
    does; one that reads it keeps Triton's wrapper, called with a
    :class:`HostDescriptor`, which encodes per launch."""
    require_native_binder()
    _require_shared_entry()
    from triton.backends.nvidia import driver as nvidia_driver

    c_calls: list = []
    encodes: list = []
    triton_make = nvidia_driver.make_tensordesc_arg
    release = tuple(int(p) for p in triton.__version__.split(".")[:2])

    def encode(arg, meta):  # stands in for cuTensorMapEncodeTiled (a GPU's)
        encodes.append(arg.base.data_ptr())
        return [("map", arg.base.data_ptr(), meta["swizzle"], tuple(arg.shape),
                 tuple(arg.strides), arg.padding, arg.round_f32_to_tf32),
                *arg.shape, *arg.strides]

    def make_3_7(arg, meta):  # 3.7's make_tensordesc_arg(arg, metadata)
        return triton_make(arg, None) if meta is None else encode(arg, meta)

    def make(arg, meta, _):  # 3.8 on: (arg, metadata, base_args), the last unread
        return triton_make(arg, None, None) if meta is None else encode(arg, meta)

    def make_reading_base(arg, meta, base_args):  # another backend's could read it
        assert len(base_args) > 4
        return make(arg, meta, None)

    fake_make = make_3_7 if release == (3, 7) else \
        make_reading_base if reads_base else make
    fake_make.__module__ = nvidia_driver.__name__
    monkeypatch.setattr(nvidia_driver, "make_tensordesc_arg", fake_make)
    _no_gpu_driver(monkeypatch)
    signature = {0: "tensordesc<bf16[8,1,16]>", 1: "*fp32", 2: "i32", 3: "constexpr"}
    c_entry = lambda *args: c_calls.append(args)  # noqa: E731
    wrapper = nvidia_driver.wrap_handle_tensordesc(
        c_entry, signature, [{"swizzle": 128} if with_meta else None])
    launcher = _shared_entry_launcher(nvidia_driver, wrapper)
    kernel = DescriptorKernel(toy_desc, launcher)
    sequence, captured, ws, y = _descriptor_sequence(kernel)
    entry = next(iter(sequence.table.values()))
    bypassed = entry[0] is c_entry
    assert bypassed == (release == (3, 7) or not reads_base)
    assert bypassed or entry[0] is wrapper  # never the launcher object's frame
    compiled = captured.launches[0].compiled
    encodes.clear()
    other = torch.zeros(4096, dtype=torch.bfloat16)
    for buffer in (ws, ws, other):
        assert sequence.launch((buffer, y))
        launcher(4, 2, 1, 77, compiled.function, compiled.packed_metadata, None, None, None,
                 _rows(buffer[512:]), y, 100, 32)
        ours, jit_s = c_calls[-2], c_calls[-1]
        assert len(ours) == len(jit_s) and ours[:4] == (4, 2, 1, 77)
        assert ours[:-1] == jit_s[:-1]  # grid, stream, metadata, hooks, scratch
        ours_args, jit_args = list(ours[-1]), list(jit_s[-1])
        if with_meta:
            assert ours_args[0][1] == buffer.data_ptr() + 1024
        else:  # the base: an object with data_ptr() in both
            assert ours_args[0].data_ptr() == jit_args[0].data_ptr() == \
                buffer.data_ptr() + 1024
            ours_args[0] = jit_args[0] = None
        jit_args[len(jit_args) - 3] = y.data_ptr()  # the JIT passed y as a tensor
        assert ours_args == jit_args
    if with_meta:  # the JIT's launches encode 3 times; ours once per address if bypassed
        ours_encodes = 2 if bypassed else 3
        assert len(encodes) == 3 + ours_encodes


def test_tensor_maps_of_every_layer_stay_encoded():
    """One address per layer (each layer passes its own cache): up to ``ENCODED_LIMIT``
    addresses are encoded once each however often they cycle; past it the oldest are
    dropped, and the newest ``ENCODED_LIMIT`` still hit."""
    made: list = []

    def fake_make(arg, meta):  # stands in for Triton's make_tensordesc_arg
        made.append(arg.base.data_ptr())
        return [("map", arg.base.data_ptr(), meta), *arg.shape, *arg.strides]

    layout = (torch.bfloat16, (28, 8, 16), (128, 16, 1), (8, 1, 16), "zero", False)
    expand = launch_entries._encoder(fake_make, layout, "meta")
    layers = [4096 * (i + 1) for i in range(96)]
    for _ in range(3):
        for ptr in layers:
            assert expand(ptr)[0] == ("map", ptr, "meta")
    assert sorted(made) == layers  # 96 layers, three rounds: one encode each
    limit = launch_entries.ENCODED_LIMIT
    many = [10**9 + 4096 * i for i in range(limit + 10)]
    for ptr in many:
        assert expand(ptr)[0] == ("map", ptr, "meta")
    made.clear()
    for ptr in many[-limit:]:
        expand(ptr)
    assert made == []  # the newest limit addresses: all kept
    expand(layers[0])
    assert made == [layers[0]]  # the oldest: dropped, encoded again


def toy_three_desc(A: tl.constexpr, a_desc, x_ptr, n, B: tl.constexpr, b_desc, c_desc,
                   BLOCK: tl.constexpr):
    pass  # a signature only: descriptors at positions 1, 5, 6 with constexprs between


#: ``toy_three_desc``'s signature as Triton's launcher sees it
THREE_DESC_SIGNATURE = {0: "constexpr", 1: "tensordesc<bf16[8,1,16]>", 2: "*fp32", 3: "i32",
                        4: "constexpr", 5: "tensordesc<bf16[8,1,16]>",
                        6: "tensordesc<bf16[8,16]>", 7: "constexpr"}


def _three_desc_metas(meta_kind: str):
    """The compiler's descriptor metadata for ``toy_three_desc``'s three descriptors:
    ``"compiled"`` / ``"fp4_padded"`` (the second fp4-padded); ``"none"`` None (3.6's
    wrapper), ``"empty"`` [] (3.8 on, a GPU without TMA), ``"nones"`` one None each."""
    def meta(swizzle, block, fp4=False):
        return {"swizzle": swizzle, "elem_size": 2, "elem_type": 9, "block_size": block,
                "fp4_padded": fp4}

    special = {"none": None, "empty": [], "nones": [None] * 3}
    if meta_kind in special:
        return special[meta_kind]
    return [meta(128, [8, 1, 16]), meta(64, [8, 1, 16], meta_kind == "fp4_padded"),
            meta(32, [8, 16])]


def _three_descriptors(ws, other):
    """Three host descriptors (3-D and 2-D, zero and NaN padding) over views of two
    tensors, for ``toy_three_desc``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (TensorDescriptor(ws[512:], [28, 8, 16], [128, 16, 1], [8, 1, 16]),
            TensorDescriptor(ws[2048:], [28, 8, 16], [128, 16, 1], [8, 1, 16],
                             padding="nan"),
            TensorDescriptor(other[256:], [64, 16], [16, 1], [8, 16]))


def _three_desc_sequence(kernel):
    """``(sequence, ws, other, y)``: one launch of ``kernel`` (``toy_three_desc``) over
    :func:`_three_descriptors`, recorded and built."""
    ws, other = torch.zeros(8192, dtype=torch.bfloat16), torch.zeros(4096, dtype=torch.bfloat16)
    y = torch.zeros(64)
    a, b, c = _three_descriptors(ws, other)
    with capture() as captured:
        capturable(kernel)[(4, 2)](3, a, y, 100, 5, b, c, BLOCK=32)
    captured.triton_launches = 1
    return LaunchSequence.build(captured, (ws, y, other)), ws, other, y


def _addresses(values):
    """Launch arguments with each base given as an object with ``data_ptr()`` (a descriptor
    without metadata) replaced by its address."""
    return [v.data_ptr() if hasattr(v, "data_ptr") else v for v in values]


@pytest.mark.parametrize("meta_kind", ["none", "compiled", "fp4_padded"])
def test_several_descriptors_expand_as_tritons_wrapper_does(meta_kind, monkeypatch):
    """Three host descriptors between constexpr and plain parameters (2-D and 3-D, zero and
    NaN padding, with or without the compiler's descriptor metadata, fp4 padding): the
    relaunch passes the C entry what Triton's own wrapper and ``make_tensordesc_arg``
    pass it (only the driver's tensor-map encoding is faked), for new base addresses of
    each descriptor's tensor."""
    require_native_binder()
    _require_known_c_launch()
    import triton

    class TensorMap:  # what fill_tma_descriptor's object stands for: its arguments
        def __init__(self, *args):
            self.args = tuple(tuple(a) if isinstance(a, list) else a for a in args)

        def __eq__(self, other):
            return isinstance(other, TensorMap) and other.args == self.args

    class Driver:
        class utils:
            @staticmethod
            def fill_tma_descriptor(*args):
                return TensorMap(*args)

    monkeypatch.setattr(type(triton.runtime.driver), "active", property(lambda _: Driver))
    monkeypatch.setattr(fast_launch, "_device_functions", lambda: (lambda: 0, lambda d: 77))

    kernel, wrapper, c_calls = behind_descriptor_wrapper(
        toy_three_desc, THREE_DESC_SIGNATURE, _three_desc_metas(meta_kind))
    sequence, ws, other, y = _three_desc_sequence(kernel)

    fresh = torch.zeros(8192, dtype=torch.bfloat16), torch.zeros(4096, dtype=torch.bfloat16)
    for w, o in ((ws, other), (fresh[0], other), (ws, fresh[1])):
        assert sequence.launch((w, y, o))
        a, b, c = _three_descriptors(w, o)
        wrapper(4, 2, 1, 77, None, False, False, None, None, (4, 1, 0), None, None, None,
                3, a, y.data_ptr(), 100, 5, b, c, 32)
        ours, triton_s = c_calls[-2], c_calls[-1]
        assert ours[:4] == triton_s[:4] and ours[5:10] == triton_s[5:10]
        assert _addresses(ours[13:]) == _addresses(triton_s[13:])


@pytest.mark.interpreter  # (runs no kernel: marked so CI's newest-Triton tier runs it)
@pytest.mark.parametrize("meta_kind", ["empty", "nones", "compiled", "fp4_padded"])
def test_several_descriptors_reach_the_shared_entry_as_through_tritons_wrapper(meta_kind,
                                                                              monkeypatch):
    """Triton 3.8 / 3.9: the same three descriptors through Triton's own
    ``wrap_handle_tensordesc`` (its C++ walk of the arguments) and NVIDIA's
    ``make_tensordesc_arg`` (only the tensor-map encoding faked), metadata empty (a GPU
    without TMA), all None, the compiler's, fp4-padded: the bypassed relaunch hands the
    shared C entry the arguments the wrapper makes, for new base addresses."""
    require_native_binder()
    _require_shared_entry()
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8):
        pytest.skip(f"Triton {triton.__version__} builds the 3.7 wrapper (see the test above)")
    import types

    from triton.backends.nvidia import driver as nvidia_driver
    from triton.runtime import driver as triton_driver

    def tensor_map(*args):  # what cuTensorMapEncodeTiled's object stands for: its inputs
        return ("map",) + tuple(tuple(a) if isinstance(a, list) else a for a in args)

    monkeypatch.setattr(triton_driver, "_active", types.SimpleNamespace(
        utils=types.SimpleNamespace(is_stream_capturing=lambda stream: False,
                                    fill_tma_descriptor_tiled=tensor_map)))
    monkeypatch.setattr(fast_launch, "_device_functions", lambda: (lambda: 0, lambda d: 77))

    c_calls: list = []
    wrapper = nvidia_driver.wrap_handle_tensordesc(lambda *args: c_calls.append(args),
                                                   THREE_DESC_SIGNATURE,
                                                   _three_desc_metas(meta_kind))
    kernel = DescriptorKernel(toy_three_desc, _shared_entry_launcher(nvidia_driver, wrapper))
    sequence, ws, other, y = _three_desc_sequence(kernel)
    assert next(iter(sequence.table.values()))[0] is not wrapper  # bypassed

    fresh = torch.zeros(8192, dtype=torch.bfloat16), torch.zeros(4096, dtype=torch.bfloat16)
    for w, o in ((ws, other), (fresh[0], other), (ws, fresh[1])):
        assert sequence.launch((w, y, o))
        a, b, c = _three_descriptors(w, o)
        wrapper(4, 2, 1, 77, None, False, False, None, None, None, None, None, None,
                ("annotations",), b"sig", (3, a, y.data_ptr(), 100, 5, b, c, 32))
        ours, triton_s = c_calls[-2], c_calls[-1]
        assert ours[:4] == triton_s[:4] and _addresses(ours[-1]) == _addresses(triton_s[-1])

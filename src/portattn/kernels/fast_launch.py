"""Relaunch compiled Triton kernels without the JIT's per-call argument processing.

Why: ``kernel[grid](**kwargs)`` costs 15-30 us of host time in Triton 3.6 (binding ~50
arguments, specializing each one, building a cache key string, looking it up, building
launch metadata, calling empty hook chains). An attention call of a 96-layer model pays
that on every layer of every eager step.

How, for ANY ``@triton.jit`` kernel and whatever arguments a launcher passes:

1. **Capture.** Kernels wrapped by :func:`capturable` (``launch.py`` wraps its kernels at
   import) behave exactly as before, except that inside ``with capture() as captured:``
   each launch made by this thread is also recorded: the kernel, grid, arguments and the
   ``CompiledKernel`` Triton returned. A Triton launch hook counts the real launches of
   the thread meanwhile, so a launch through a kernel that is not wrapped is noticed.
2. **Build** (:meth:`LaunchSequence.build`). Each recorded argument is either *bound*
   (a tensor that IS one of the caller's ``inputs``, or a view into exactly one input's
   storage, e.g. a slice of the caller's workspace: per call its data pointer is
   recomputed) or *fixed* (a plain value: int, float, bool, str, None, a tuple of those;
   kept as recorded), or a host *tensor descriptor* (Triton's ``TensorDescriptor``)
   whose base is bound as a tensor is and whose shape, strides, block shape and padding
   are fixed: per call its launch arguments are made for the new base pointer (on
   Triton 3.6 to 3.9 the tensor map Triton's launcher would encode, kept per address:
   see :func:`launch_entries.descriptor_expanders`; elsewhere Triton's wrapper encodes
   it per launch, as for its JIT). Anything else (a tensor
   the launcher allocated itself) makes the sequence unusable, and the caller keeps the
   normal path. No tensor is stored.
3. **Relaunch** (:meth:`LaunchSequence.launch`): per call, the data pointers of the bound
   inputs, the current device and stream (asked, unless the caller passes what it already
   knows), and ONE dict lookup for the whole sequence; then each compiled kernel's
   launcher is called directly, pointers passed as ints. Like Triton, this launches on
   the CURRENT device: callers make the tensors' device current first
   (:meth:`portattn.planning.PlanBody.launch`, only when another one is current), so
   kernels and streams are looked up for q's GPU, never for another one.

Correctness: a compiled kernel is only reused for a call Triton would specialize the same
way. Triton's specialization of an argument is a function of (type, value) for plain
values, (dtype, ``data_ptr % 16 == 0``) for tensors on backends with native tensor
specialization (the only ones served here), plus the launch options (``num_warps``...),
``debug`` and the compilation knobs the JIT passes as options (:func:`triton_state`), per
device. The CALLER guarantees that the fixed
values are the same on every call of a sequence (it keys sequences by everything its
launcher reads: shapes, strides, dtypes, option values), and that its launcher derives no
argument from device values or from pointer values beyond what Triton sees (launch.py
does neither); this module keys the sequence's kernels by (device, Triton state, the
16-byte alignment of every bound input: each bound pointer is an input's address plus a
fixed offset, so that fixes the alignment of every pointer of every launch; for an input
bound at an offset that is not a multiple of 16, its address modulo 16), and a capture
under a new key whose fixed values differ from the recorded ones disables the sequence
(:meth:`absorb`). When a sequence is built, Triton's own binder is run on the recorded
call and must agree (same cached kernel, pointers specialized by alignment alone), else
the sequence is unusable. Whenever a key is unknown, :meth:`launch` returns False and
the caller runs its normal path under :func:`capture`, then :meth:`absorb` stores what
Triton compiled (after checking the launches have the same structure). Global variables
a kernel reads (Triton checks them on every launch, and raises if one changed; from 3.8
on it also counts those of every function a kernel calls, e.g. ``byte_decode``'s PTX):
only ``tl.constexpr`` constants of plain values are accepted, checked equal to what the
kernel compiled with when the sequence is built, not per call. A module rebinding one
afterwards is not noticed by relaunches of keys already stored (a new key takes the JIT,
which raises); ours never rebind them. Launch hooks
(profilers), pre-run hooks, kernels with any other global-variable dependency, the interpreter
(``TRITON_INTERPRET=1``, no compiled kernel), non-native backends (AMD: buffer-op
specialization; Triton 3.5's binder in Python) and CUDA launchers called in an order other
than the JIT's (:func:`launch_entries.launcher_call_known`) always take the normal path.

Which entry a relaunch calls, per Triton release, is :mod:`portattn.kernels.launch_entries`'
business: Triton 3.6's per-kernel C entry, the shared C entry of 3.7 to 3.9, or else the launcher
object as the JIT calls it.
"""

from __future__ import annotations

import inspect
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any, Callable, Sequence

import torch

from portattn import settings
from portattn.kernels.launch_entries import (
    argument_layout,
    c_launch_known,
    call_line,
    launch_entry,
    launcher_call_known,
)

_local = threading.local()
_PLAIN = (int, float, bool, str, type(None))
_MISSING = object()
#: Per launch sequence: max compiled-kernel entries (device x Triton state x alignment)
#: before its table is cleared (it refills from Triton's own cache, through capture).
TABLE_LIMIT = 64


@dataclass
class Launch:
    """One recorded launch: ``fn[grid](*args, **kwargs)`` returned ``compiled``."""

    fn: Any
    grid: Any
    args: tuple
    kwargs: dict
    compiled: Any


class Capturable:
    """A ``@triton.jit`` kernel that records its launches while :func:`capture` is active
    in the calling thread (otherwise ``k[grid]`` is exactly ``fn[grid]``)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        launch = self.fn[grid]
        records = getattr(_local, "records", None)
        if records is None:
            return launch
        fn = self.fn

        def recorded(*args, **kwargs):
            compiled = launch(*args, **kwargs)
            records.append(Launch(fn, grid, args, kwargs, compiled))
            return compiled

        return recorded

    def __getattr__(self, name):
        if name == "fn":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __repr__(self) -> str:
        return f"capturable({self.fn!r})"


def capturable(fn) -> Capturable:
    return fn if isinstance(fn, Capturable) else Capturable(fn)


@dataclass
class Captured:
    """What :func:`capture` saw: the recorded launches, and how many launches Triton made
    from this thread meanwhile (None when that cannot be counted: no hook support, or the
    interpreter)."""

    launches: list
    triton_launches: int | None = None

    @property
    def complete(self) -> bool:
        return self.triton_launches == len(self.launches)


@contextmanager
def capture():
    """Record the launches of :class:`Capturable` kernels made by this thread."""
    previous = getattr(_local, "records", None)
    result = Captured([])
    _local.records = result.launches
    counter = _count_launches()
    try:
        yield result
    finally:
        _local.records = previous
        if counter is not None:
            counter.stop()
            result.triton_launches = counter.count


class _OpenCount:
    """The Triton launches of the calling thread since :func:`_count_launches`."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def stop(self) -> None:
        _local.counts = tuple(c for c in getattr(_local, "counts", ()) if c is not self)
        _release_counter()


class _LaunchCounter:
    """The one launch-enter hook: adds each launch to the counts open in the launching
    thread."""

    def __call__(self, _metadata) -> None:
        for open_count in getattr(_local, "counts", ()):
            open_count.count += 1


_COUNTER = _LaunchCounter()
#: A chain's ``calls`` holding only our counter: no hook of anyone else runs (see
#: :func:`_hook_active`).
_ONLY_COUNTER = [_COUNTER]
_counter_lock = threading.Lock()
_counter_users = 0
_counter_chains: list = []  # the hook chains _COUNTER was added to
_fork_handler_registered = False


def _forget_counter_in_child() -> None:
    """After ``fork``: the child has none of the parent's other threads, so none of their
    open captures; take the counter out of the copied chains and start afresh (a lock
    held by another thread at the fork would otherwise stay held)."""
    global _counter_lock, _counter_users
    for chain in _counter_chains:
        try:
            chain.remove(_COUNTER)
        except Exception:  # pragma: no cover - the chain changed meanwhile
            pass
    _counter_chains.clear()
    _counter_users = 0
    _counter_lock = threading.Lock()
    _local.counts = ()


def _count_launches() -> _OpenCount | None:
    """Count this thread's Triton launches until ``stop()`` (3.5+ hook chains); None
    where they cannot be counted.

    One hook serves the captures of every thread and stays in the chain while any of
    them is open: Triton's ``HookChain`` walks its list while it calls the hooks, so a
    hook removed meanwhile (another thread's capture ending) would make it skip the next
    one, and a count that comes out short refuses its sequence for good."""
    global _counter_users
    try:
        from triton import knobs

        chain = knobs.runtime.launch_enter_hook
    except Exception:  # pragma: no cover - older Triton
        return None
    if not hasattr(chain, "add") or settings.TRITON_INTERPRET.value():
        return None
    global _fork_handler_registered
    if not _fork_handler_registered and hasattr(os, "register_at_fork"):
        _fork_handler_registered = True
        os.register_at_fork(after_in_child=_forget_counter_in_child)
    with _counter_lock:
        if not any(known is chain for known in _counter_chains):
            chain.add(_COUNTER)
            _counter_chains.append(chain)
        _counter_users += 1
    count = _OpenCount()
    _local.counts = getattr(_local, "counts", ()) + (count,)
    return count


def _release_counter() -> None:
    """One capture fewer; the last one takes the hook out of the chains."""
    global _counter_users
    with _counter_lock:
        _counter_users -= 1
        if _counter_users == 0:
            for chain in _counter_chains:
                chain.remove(_COUNTER)
            _counter_chains.clear()


# --------------------------------------------------------------------------- per call state


_knobs = None  # triton.knobs, imported on first use (:func:`_triton_knobs`)
#: The last state computed with both hook chains empty, and what it was computed from:
#: (runtime knobs, compilation knobs, reader of the compilation modes, launch-enter chain,
#: launch-exit chain, ``debug``, the modes, state). See :func:`triton_state`.
_state_memo: tuple | None = None


def triton_state():
    """The Triton settings that change which kernel a launch uses (``debug``, and the
    compilation knobs the JIT passes as options, :data:`JIT_COMPILATION_KNOBS`: the
    instrumentation mode, the fp-sanitizer casts of Triton 3.9), read from Triton's knobs
    as its JIT reads them; or None when launches must go through the JIT (a launch hook
    is installed: profilers need its metadata; a stages-inspection hook is set: Triton
    3.7 on key kernels by its custom pipeline).

    Called on every relaunch, so it answers from a memo while nothing it reads has
    changed: the same hook chains, still empty (their ``calls`` lists are tested on every
    call, so a hook added later is seen at once), no stages hook, the same ``debug``
    object and equal compilation modes (read on every call: a profiler sets the
    instrumentation mode in process, not in the environment)."""
    memo = _state_memo
    if memo is not None:
        runtime, compilation, modes_of, enter, exit_, debug, modes, state = memo
        if runtime.launch_enter_hook is enter and runtime.launch_exit_hook is exit_ and \
                (not enter.calls or enter.calls == _ONLY_COUNTER) and not exit_.calls and \
                runtime.debug is debug and modes_of(compilation) == modes and \
                getattr(runtime, "add_stages_inspection_hook", None) is None:
            return state
    return _compute_triton_state()


def _hook_active(hook) -> bool:
    """Whether someone else's launch hook runs: a HookChain with calls other than our own
    launch counter, or any other non-None hook. The counter only counts the launches of
    threads with a capture open, which go through the JIT anyway: were it to count as a
    hook, one thread's capture would send every other thread's launches through the JIT
    and make their recordings fail (and be refused for good once it closed)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", True)
    return bool(calls) and calls != _ONLY_COUNTER


def _compute_triton_state():
    """:func:`triton_state` read in full; remembered when both hooks are empty chains."""
    global _state_memo
    knobs = _triton_knobs()
    runtime = knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    if _hook_active(enter) or _hook_active(exit_) or \
            getattr(runtime, "add_stages_inspection_hook", None) is not None:
        return None
    compilation = knobs.compilation
    present = compilation_knob_names(compilation)
    # the knobs' values as one C call gives them (a value for one name, a tuple for more)
    modes_of: Callable = attrgetter(*present) if present else (lambda _knobs: ())
    debug = runtime.debug
    modes = modes_of(compilation)
    state = (debug, *(modes if len(present) > 1 else (modes,) if present else ()))
    if isinstance(getattr(enter, "calls", None), list) and \
            isinstance(getattr(exit_, "calls", None), list):
        _state_memo = (runtime, compilation, modes_of, enter, exit_, debug, modes, state)
    return state


def _triton_knobs():
    """``triton.knobs``, imported once (the state is read where the memo cannot hold)."""
    global _knobs
    if _knobs is None:
        from triton import knobs

        _knobs = knobs
    return _knobs


def _device_functions():
    """(current CUDA device, current stream handle of a device): the test seam."""
    from portattn import devices

    return devices._get_device, devices.current_stream_handle


# --------------------------------------------------------------------------- building


def alignment_token(pointers: Sequence[int], by_residue: Sequence[bool] = ()):
    """The key of a sequence's compiled kernels for its bound inputs' addresses: True when
    all are 16-byte aligned, else per input True (16-byte aligned), False (even) or
    ``"odd"``, or its address modulo 16 where ``by_residue`` says so (an input bound at an
    offset that is not a multiple of 16: then its residue, not its alignment, fixes the
    alignment Triton sees of the pointer). Every bound pointer is an input's address plus
    a fixed offset, so the token fixes the 16-byte alignment of every pointer of every
    launch, and the parity the launcher's own choices read (an 8-bit V cache is read as
    int16 pairs at an even address only: ``launch._as_pairs``)."""
    acc = 0
    for p in pointers:
        acc |= p
    if not acc & 15:
        return True
    residue = tuple(by_residue) + (False,) * (len(pointers) - len(by_residue))
    return tuple(p & 15 if r else (not p & 15) or ("odd" if p & 1 else False)
                 for p, r in zip(pointers, residue))


def specialization_key(values: Sequence) -> tuple:
    """A summary of kernel arguments at least as fine as Triton's specialization: tensors
    by dtype and 16-byte alignment, everything else by type and value (tuples element by
    element). Equal keys => Triton picks the same compiled kernel (tested against Triton's
    own binder); the sequences below compare fixed values and pointer alignments this
    way."""
    return tuple(_spec(v) for v in values)


def _spec(value):
    if isinstance(value, torch.Tensor):
        return (value.dtype, not value.data_ptr() & 15)
    if isinstance(value, tuple):
        return (type(value), tuple(_spec(v) for v in value))
    return (type(value), value)


def is_plain(value) -> bool:
    """A value Triton specializes by (type, value) alone: safe to keep as recorded."""
    if isinstance(value, tuple):
        return all(is_plain(v) for v in value)
    return type(value) in _PLAIN or _is_constexpr(value)


def _is_constexpr(value) -> bool:
    try:
        from triton.language import constexpr, dtype
    except Exception:  # pragma: no cover
        return False
    return isinstance(value, (constexpr, dtype))


def mutable_globals(fn) -> list[str]:
    """The global variables read by JIT kernel ``fn`` and the functions it calls (Triton's
    ``used_global_vals``, filled when its cache key is made) that a relaunch cannot leave
    unchecked: all but ``tl.constexpr`` constants whose value is plain (:func:`is_plain`:
    a number, string, bool, None, dtype or tuple of those, so it cannot change in place)
    and is, now, equal to and of the same type as the value the kernel compiled with.
    Why those may go unchecked per call: Triton never recompiles for a changed global
    (its hash is made once), it raises; a constant that holds its value never raises."""
    found = []
    for (name, _), (value, scope) in (getattr(fn, "used_global_vals", None) or {}).items():
        current = scope.get(name) if isinstance(scope, dict) else None
        compiled_with = getattr(value, "value", _MISSING) if _is_constexpr(value) else _MISSING
        now = getattr(current, "value", _MISSING) if _is_constexpr(current) else _MISSING
        if compiled_with is _MISSING or not is_plain(compiled_with) or \
                type(now) is not type(compiled_with) or now != compiled_with:
            found.append(name)
    return found


def bind_value(value, inputs: Sequence):
    """Where a recorded tensor argument comes from: ``(input index, byte offset)``, or None.

    An input itself; else a view sharing the storage of exactly one input (a workspace
    the launcher slices, a reshaped scale tensor), at the same byte offset from it on
    every call of the structure (views are made from shapes and strides, which the
    caller's key fixes). :class:`Ambiguous` when the tensor is several inputs, or shares
    storage with several and starts at none of them (they alias in this call only)."""
    found = [i for i, x in enumerate(inputs) if value is x]
    if len(found) > 1:
        raise Ambiguous(f"one tensor is inputs {found} of this call")
    if found:
        return found[0], 0
    storage = value.untyped_storage().data_ptr()
    sharing = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and
               x.untyped_storage().data_ptr() == storage]
    if len(sharing) > 1:
        sharing = [i for i in sharing if inputs[i].data_ptr() == value.data_ptr()]
        if len(sharing) != 1:
            raise Ambiguous(f"a tensor shares its storage with inputs {sharing}")
    if sharing:
        return sharing[0], value.data_ptr() - inputs[sharing[0]].data_ptr()
    return None


class Site:
    """One kernel launch of a sequence: template arguments in the kernel's parameter
    order (None where a bound pointer goes), bindings and grid (its compiled kernels are
    in the sequence's table)."""

    __slots__ = ("fn", "grid", "names", "template", "binds", "options", "descriptors")

    def __init__(self, fn, grid, names, template, binds, options, descriptors=None):
        self.fn = fn
        self.grid = grid
        self.names = names
        self.template = template
        self.binds = binds              # ((position, input index, byte offset), ...)
        self.options = options
        #: position -> the fixed part of a host descriptor bound there (its base is bound)
        self.descriptors: dict[int, tuple] = descriptors or {}


def _call_arguments(template: Sequence, bound: dict, prefix: str, namespace: dict) -> list:
    """The generated call's argument expressions in parameter order: a bound pointer's
    variable name, and each run of consecutive fixed values as one prebuilt tuple
    unpacked (``*c0_16``: one global lookup instead of one per value)."""
    args: list[str] = []
    run: list = []
    for pos, value in enumerate(list(template) + [None]):
        if pos in bound or pos == len(template):
            if run:
                name = f"{prefix}{pos - len(run)}"
                namespace[name] = tuple(run)
                args.append(f"*{name}")
                run = []
            if pos in bound:
                args.append(bound[pos])
        else:
            run.append(value)
    return args


def _bind_call(fn, launch: Launch):
    """(parameter names, values in parameter order, launch options) of a recorded call."""
    signature = fn.signature if hasattr(fn, "signature") else inspect.signature(fn.fn)
    names = tuple(signature.parameters)
    kwargs = {k: v for k, v in launch.kwargs.items() if k in signature.parameters}
    options = {k: v for k, v in launch.kwargs.items() if k not in signature.parameters}
    bound = signature.bind(*launch.args, **kwargs)
    bound.apply_defaults()
    return names, [bound.arguments[n] for n in names], options


def _grid(grid) -> tuple[int, int, int] | None:
    if callable(grid) or not isinstance(grid, tuple) or not 1 <= len(grid) <= 3 or \
            not all(type(g) is int for g in grid):
        return None
    return tuple(grid) + (1,) * (3 - len(grid))


class Unusable(Exception):
    """A recorded launch sequence cannot be replayed; the message says why."""


class Ambiguous(Unusable):
    """This recording cannot be attributed (inputs alias each other); another may."""


def is_descriptor(value) -> bool:
    """A host tensor descriptor (Triton's ``TensorDescriptor``; checked by shape, so this
    module imports nothing from Triton's tools)."""
    return type(value).__name__ == "TensorDescriptor" and \
        all(hasattr(value, a) for a in ("base", "shape", "strides", "block_shape", "padding"))


def descriptor_layout(value) -> tuple:
    """What Triton specializes and encodes of a host descriptor besides its base pointer:
    the base's dtype, shape, strides, block shape, padding and (Triton 3.7 on) whether
    fp32 is rounded to tf32 (False where Triton has no such field)."""
    return (value.base.dtype, tuple(int(x) for x in value.shape),
            tuple(int(x) for x in value.strides), tuple(int(x) for x in value.block_shape),
            value.padding, bool(getattr(value, "round_f32_to_tf32", False)))


def pointer_of(value) -> int:
    """The device address a bound argument passes: a tensor's, a descriptor's base's."""
    return (value.base if is_descriptor(value) else value).data_ptr()


def build_site(launch: Launch, inputs: Sequence) -> Site:
    fn = launch.fn
    for attr in ("device_caches", "params"):
        if not hasattr(fn, attr):
            raise Unusable(f"{fn!r} is not a compiled JIT kernel (interpreter?)")
    changing = mutable_globals(fn)
    if changing:
        raise Unusable(f"{fn!r} depends on global variables Triton checks per launch: "
                       f"{', '.join(changing)}")
    if launch.compiled is None or not hasattr(launch.compiled, "packed_metadata"):
        raise Unusable(f"{fn!r} returned no compiled kernel")
    grid = _grid(launch.grid)
    if grid is None:
        raise Unusable(f"grid {launch.grid!r} of {fn!r} is not a tuple of ints")
    names, values, options = _bind_call(fn, launch)
    template: list[Any] = []
    binds: list[tuple[int, ...]] = []
    descriptors: dict[int, tuple] = {}
    for pos, (name, value) in enumerate(zip(names, values)):
        if isinstance(value, torch.Tensor) or is_descriptor(value):
            base = value.base if is_descriptor(value) else value
            if not isinstance(base, torch.Tensor):
                raise Unusable(f"argument {name} of {fn!r} is a descriptor of no tensor")
            where = bind_value(base, inputs)
            if where is None:
                raise Unusable(f"argument {name} of {fn!r} is a tensor that is not one of the "
                               "call's inputs")
            binds.append((pos, *where))
            template.append(None)
            if base is not value:
                descriptors[pos] = descriptor_layout(value)
        elif is_plain(value):
            template.append(value)
        else:
            raise Unusable(f"argument {name} of {fn!r} has type {type(value).__name__}")
    if not all(is_plain(v) for v in options.values()):
        raise Unusable(f"launch options of {fn!r} are not plain values")
    return Site(fn, grid, names, template, tuple(binds), options, descriptors)


#: ``triton.knobs.compilation`` fields ``JITFunction.run`` passes as options to its binder
#: (in its order), where the installed release has them
JIT_COMPILATION_KNOBS = ("instrumentation_mode", "fpsan_homomorphic_casts")


def jit_run_options(kwargs: dict, debug: bool) -> dict:
    """``kwargs`` with the options ``JITFunction.run`` adds before it binds a call, as
    the installed Triton adds them: ``debug`` (the kernel's, or Triton's knob), then each
    compilation knob of :data:`JIT_COMPILATION_KNOBS` that Triton has (the
    instrumentation mode from 3.6 on, fp-sanitizer casts in 3.9)."""
    knobs = _triton_knobs()
    kwargs["debug"] = kwargs.get("debug", debug) or knobs.runtime.debug
    compilation = knobs.compilation
    for name in compilation_knob_names(compilation):
        kwargs[name] = getattr(compilation, name)
    return kwargs


def compilation_knob_names(compilation) -> tuple[str, ...]:
    """The :data:`JIT_COMPILATION_KNOBS` the installed Triton's ``knobs.compilation``
    has, in order."""
    return tuple(name for name in JIT_COMPILATION_KNOBS if hasattr(compilation, name))


def check_with_triton(site: Site, launch: Launch, device: int) -> None:
    """Run Triton's binder on the recorded call: its cache must hold the kernel it returned
    and every bound pointer must be specialized by 16-byte alignment alone."""
    import triton
    from triton.runtime.jit import compute_cache_key

    fn = launch.fn
    try:
        kernel_cache, key_cache, _target, backend, binder = fn.device_caches[device]
    except Exception as exc:
        raise Unusable(f"Triton's kernel cache of {fn!r} has an unknown layout: {exc}") \
            from exc
    release = getattr(triton, "__version__", "?")
    if not getattr(backend, "supports_native_tensor_specialization", False):
        raise Unusable(f"the {getattr(backend, '__name__', type(backend).__name__)} backend "
                       f"of Triton {release} specializes tensors in Python (the fast "
                       "relaunch needs Triton's native binder, as Triton 3.6 has on NVIDIA)")
    run = getattr(launch.compiled, "run", None)
    if type(run).__name__ == "CudaLauncher" and not c_launch_known() and \
            not launcher_call_known(run):
        raise Unusable(f"Triton {release}'s CUDA launcher is called with other arguments "
                       "than the JIT's of Triton 3.5-3.9 (gridX, gridY, gridZ, stream, "
                       "function, metadata, hooks, the kernel's)")
    kwargs = jit_run_options(dict(launch.kwargs), fn.debug)
    _bound, specialization, options = binder(*launch.args, **kwargs)
    if kernel_cache.get(compute_cache_key(key_cache, specialization, options)) \
            is not launch.compiled:
        raise Unusable(f"Triton's cache holds another kernel for this call of {fn!r}")
    _names, values, _ = _bind_call(fn, launch)
    for pos, _i, _off in site.binds:
        got = specialization[pos][1]  # None: not specialized (host descriptors)
        want = "" if pointer_of(values[pos]) & 15 else "D"
        if got is not None and got != want:
            raise Unusable(f"Triton specializes pointer {site.names[pos]} as {got!r}, not by "
                           "16-byte alignment alone")


class Reader:
    """Where a caller's inputs come from, so a relaunch reads only the ones it binds.

    By default the generated :meth:`LaunchSequence.launch` takes the ``inputs`` sequence.
    With a reader it takes the caller's own arguments instead (``params``, a parameter
    list such as ``"q, cache, out"``) and reads input ``i`` as the Python expression
    ``sources[i]`` over them (names from ``namespace`` may be used), evaluated only for
    the inputs its launches bind: no sequence is built per call. :meth:`read` evaluates
    them all, and is what the caller must pass as ``inputs`` to :meth:`LaunchSequence.build`
    and :meth:`LaunchSequence.absorb`, so both views agree by construction.

    A source may also name ``device`` and ``stream``: in a relaunch, the current CUDA
    device's index and its current stream's handle (as the launch uses them); in
    :meth:`read`, None. An expression must give the same input either way."""

    def __init__(self, params: str, sources: Sequence[str], namespace: dict | None = None):
        names = [name.strip() for name in params.split(",")] + list(namespace or {})
        for name in names:
            if not name.isidentifier() or name.startswith("_") or \
                    name in ("device", "stream", "launch"):
                raise ValueError(f"a reader's name {name!r} is not a free identifier (the "
                                 "generated launch's own start with '_')")
        self.params = params
        self.sources = tuple(sources)
        self.namespace = dict(namespace or {})
        read = f"lambda {params}, device=None, stream=None: " \
            f"({''.join(f'{source}, ' for source in self.sources)})"
        self.read: Callable[..., tuple] = eval(compile(read, "<portattn.fast_launch.Reader>",
                                                       "eval"), dict(self.namespace))


class LaunchSequence:
    """The launches of one call structure, replayable with new input pointers.

    ``inputs`` (given to :meth:`build`, :meth:`launch`, :meth:`absorb`) is a sequence of
    the call's tensors (None where absent) in an order fixed by the caller, including
    buffers the caller owns and the launcher slices (a workspace).

    ``launch(inputs, device=None, stream=None) -> bool`` is generated per sequence
    (:func:`_generate_launch`); with a :class:`Reader`, ``launch(<its params>,
    device=None, stream=None)``. ``device``: the current CUDA device, when the caller has
    just checked it; ``stream``: that device's current stream handle, when the caller
    already has it (None: each is asked). ``table`` maps (device, Triton state,
    :func:`alignment_token` of the bound inputs' addresses) to the compiled kernels of
    every launch, flattened (:func:`launch_entry` per site, in order)."""

    def __init__(self, sites: list[Site], used: tuple[int, ...], reader: Reader | None = None):
        self.sites = sites
        self.used = used
        self.reader = reader
        self._select: Callable[[Sequence], tuple]
        if len(used) > 1:
            self._select = itemgetter(*used)
        elif used:
            index = used[0]
            self._select = lambda xs: (xs[index],)
        else:
            self._select = lambda xs: ()
        #: per selected input: keyed by its address modulo 16, not only its alignment
        self.by_residue = tuple(
            any(off % 16 for site in sites for _, j, off in site.binds if j == k)
            for k in range(len(used)))
        self.table: dict = {}
        self.lock = threading.Lock()
        self._device, self._stream = _device_functions()
        #: how its kernels' launch entries take arguments (``launch_entries``): the
        #: generated code and every entry stored for it use this one
        self.arg_layout = argument_layout()
        self.source, self.launch = _generate_launch(sites, used, self.by_residue,
                                                    self._device, self._stream, self.table,
                                                    reader, self.arg_layout)

    @classmethod
    def build(cls, captured: Captured, inputs: Sequence, device: int | None = None,
              reader: Reader | None = None) -> "LaunchSequence":
        """From a capture of a normal call; raises :class:`Unusable` with the reason.
        With a ``reader``, ``inputs`` is what its :meth:`Reader.read` returned."""
        if not captured.launches:
            raise Unusable("no launch was recorded")
        if captured.triton_launches is None:
            raise Unusable("Triton's launches cannot be counted here (the interpreter, or a "
                           "Triton without launch hook chains)")
        if not captured.complete:
            raise Unusable(f"Triton made {captured.triton_launches} launches but "
                           f"{len(captured.launches)} were recorded (a kernel not wrapped "
                           "by capturable?)")
        sites = [build_site(launch, inputs) for launch in captured.launches]
        used = tuple(sorted({i for site in sites for _, i, _ in site.binds}))
        position = {i: j for j, i in enumerate(used)}
        for site in sites:  # input indices -> positions in the selected pointers
            site.binds = tuple((pos, position[i], off) for pos, i, off in site.binds)
        sequence = cls(sites, used, reader)
        device = sequence._device() if device is None else device
        for site, launch in zip(sites, captured.launches):
            check_with_triton(site, launch, device)
        if not sequence.absorb(captured, inputs, device):
            raise Unusable("the recorded launches do not match themselves")  # pragma: no cover
        return sequence

    def absorb(self, captured: Captured, inputs: Sequence, device: int | None = None) -> bool:
        """Store the kernels of a capture of the same call structure (other alignments,
        device or Triton state); False when its launches differ in structure."""
        state = triton_state()
        if state is None or not captured.complete or \
                len(captured.launches) != len(self.sites):
            return False
        device = self._device() if device is None else device
        selected = self._select(inputs)
        for site, launch in zip(self.sites, captured.launches):
            if not _replays(site, launch, selected):
                return False
        token = alignment_token([x.data_ptr() for x in selected], self.by_residue)
        self.store((device, state, token), [launch.compiled for launch in captured.launches])
        return True

    def store(self, key, compiled: Sequence) -> None:
        """The compiled kernels of every site (in order) under ``key``."""
        entry = tuple(value for site, kernel in zip(self.sites, compiled)
                      for value in launch_entry(kernel, site.descriptors, self.arg_layout))
        with self.lock:
            if len(self.table) >= TABLE_LIMIT:
                self.table.clear()
            self.table[key] = entry


def _replays(site: Site, launch: Launch, selected: Sequence) -> bool:
    """Whether a recorded launch is ``site`` with these selected inputs: the same kernel,
    grid and options, the same fixed values (as Triton specializes them), each bound
    pointer at its input's address plus the site's offset (descriptors of the same
    layout)."""
    if launch.fn is not site.fn or _grid(launch.grid) != site.grid or \
            launch.compiled is None:
        return False
    _names, values, options = _bind_call(site.fn, launch)
    if options != site.options:
        return False
    bound = {pos: (j, off) for pos, j, off in site.binds}
    for pos, value in enumerate(values):
        if pos in bound:
            j, off = bound[pos]
            layout = site.descriptors.get(pos)
            if layout is not None:
                if not is_descriptor(value) or descriptor_layout(value) != layout:
                    return False
            elif not isinstance(value, torch.Tensor):
                return False
            if pointer_of(value) != selected[j].data_ptr() + off:
                return False
        elif isinstance(value, torch.Tensor) or is_descriptor(value) or \
                _spec(value) != _spec(site.template[pos]):
            return False
    return True


def _generate_launch(sites: list[Site], used: tuple[int, ...], by_residue: tuple[bool, ...],
                     get_device, get_stream, table: dict, reader: Reader | None = None,
                     arg_layout: str = "kernel"):
    """``launch(inputs, device=None, stream=None) -> bool`` for these sites (with a
    ``reader``: its parameters instead of ``inputs``), as straight-line code (what Triton
    does for its binder): launch every kernel with the inputs' pointers, or return False
    with nothing launched when the kernels are not known yet for them (device, Triton
    state, :func:`alignment_token` of the bound inputs), a hook must see the launches, or
    the inputs lack a pointer. Fixed arguments are names bound to the recorded values;
    each kernel is called in ``arg_layout`` (:func:`launch_entries.call_line`).
    Every other name of the generated code starts with ``_`` (a reader's names cannot)."""
    namespace = dict(reader.namespace) if reader is not None else {}
    namespace.update({"_triton_state": triton_state, "_get_device": get_device,
                      "_get_stream": get_stream, "_table": table})
    kernels = list({id(site.fn): site.fn for site in sites}.values())
    for k, fn in enumerate(kernels):
        namespace[f"_fn{k}"] = fn
    params = "inputs" if reader is None else reader.params
    sources = [f"inputs[{i}]" if reader is None else f"({reader.sources[i]})" for i in used]
    pointers = [f"_x{j}" for j in range(len(used))]
    lines = [f"def launch({params}, device=None, stream=None):",
             "    _state = _triton_state()",
             "    if _state is None:",
             "        return False",
             f"    if {' or '.join(f'_fn{k}.pre_run_hooks' for k in range(len(kernels)))}:",
             "        return False",
             "    if device is None:",
             "        device = _get_device()",
             "    if stream is None:",  # before the reads: a reader's source may use it
             "        stream = _get_stream(device)"]
    if used:
        lines.append("    try:")
        lines += [f"        {p} = {source}.data_ptr()" for p, source in zip(pointers, sources)]
        lines += ["    except AttributeError:",
                  "        return False",
                  f"    _token = True if not ({' | '.join(pointers)}) & 15 else "
                  "(" + "".join(f"{p} & 15, " if r else
                                f"(not {p} & 15) or ('odd' if {p} & 1 else False), "
                                for p, r in zip(pointers, by_residue)) + ")"]
    else:
        lines.append("    _token = True")
    lines += ["    _entry = _table.get((device, _state, _token))",
              "    if _entry is None:",
              "        return False",
              "    " + ", ".join(f"_l{s}, _f{s}, _m{s}, _c{s}, _d{s}, _e{s}, _a{s}, _s{s}"
                               for s in range(len(sites))) + " = _entry"]
    for s, site in enumerate(sites):
        bound = {}
        descriptor_rank = {pos: k for k, pos in enumerate(sorted(site.descriptors))}
        for pos, j, off in site.binds:
            bound[pos] = f"_x{j} + {off}" if off else f"_x{j}"
            if pos in descriptor_rank:  # its expansion around the new base
                bound[pos] = f"*_e{s}[{descriptor_rank[pos]}]({bound[pos]})"
        args = _call_arguments(site.template, bound, f"_k{s}_", namespace)
        lines.append("    " + call_line(s, site.grid, args, arg_layout))
    lines.append("    return True")
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<portattn.fast_launch>", "exec"), namespace)
    return source, namespace["launch"]

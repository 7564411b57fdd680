"""What a relaunch calls of a compiled Triton kernel's CUDA launcher, per Triton release.

:mod:`portattn.kernels.fast_launch` records launches and replays them with new pointers;
this module knows the launcher objects it replays through, which change between Triton
releases (each form is recognised exactly, never assumed):

* **Triton 3.6** (:func:`c_launch_known`): every compiled kernel has its own C entry,
  ``launcher.launch(gx, gy, gz, stream, function, cooperative, pdl, global_scratch,
  profile_scratch, packed_metadata, launch_metadata, enter_hook, exit_hook,
  *kernel_args)`` (the driver's ``_BASE_ARGS_FORMAT``). Called directly, the launcher's
  Python frame is skipped. Host tensor descriptors: the C entry sits behind Triton's
  ``wrap_handle_tensordesc``, which encodes a tensor map on every launch; the relaunch
  calls the entry with maps encoded once per base address (:func:`descriptor_expanders`).
* **Triton 3.7 to 3.9** (:func:`shared_launch_known`; 3.7.1's, 3.8.0's and 3.9.0's
  launchers were read): one C entry shared by every kernel, ``utils.launch(gx, gy,
  gz, stream, function, cooperative, pdl, packed_metadata, launch_metadata, enter_hook,
  exit_hook, global_scratch, profile_scratch, arg_annotations, kernel_signature,
  kernel_args)``, whose argument format the installed driver's C source declares
  (:data:`SHARED_LAUNCH_FORMAT`) and whose launcher's ``__call__`` does nothing else
  first (:data:`KNOWN_SHARED_LAUNCHER_CALLS`). The relaunch calls it the way the
  launcher object would, with that kernel's annotations and signature bytes; the
  descriptor wrappers of 3.7 (a Python closure) and of 3.8 / 3.9 (a C++ walk of the
  arguments; for kernels without tuple parameters, with NVIDIA's ``make_tensordesc_arg``,
  which ignores its ``base_args``) are bypassed as 3.6's is.
* **Anything else** (scratch to allocate, GSan, an unknown driver): the launcher object
  itself, called as the JIT calls it (:func:`launcher_call_known` checks its parameter
  list first), through an adapter of the same argument layout.

So the relaunch has one of two argument layouts per installed Triton (:func:`argument_layout`):
``"kernel"`` (3.6's per-kernel entry, and the adapter where neither entry is known) and
``"shared"`` (3.7's to 3.9's). The generated launch code of a sequence and the entries stored
for its kernels are both made for the layout of the process's Triton.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import threading
from typing import Any, Callable

#: The arguments the per-kernel C launch entry of Triton 3.5 / 3.6's CUDA launcher parses
#: before the kernel's own (its driver module's ``_BASE_ARGS_FORMAT``): grid x, y, z,
#: stream, function, cooperative, pdl, global and profile scratch, kernel and launch
#: metadata, enter and exit hooks.
C_LAUNCH_FORMAT = "iiiKKppOOOOOO"
#: What the C entry shared by every kernel parses in Triton 3.7.1, 3.8.0 and 3.9.0 (the
#: ``PyArg_ParseTuple`` format of ``launch`` in the NVIDIA driver's ``driver.c``): grid
#: x, y, z, stream, function, cooperative, pdl, (num_warps, num_ctas, shared memory),
#: launch metadata, enter and exit hooks, global and profile scratch, argument
#: annotations, signature bytes, the kernel's arguments as one sequence.
SHARED_LAUNCH_FORMAT = "iiiKKpp(iii)OOOOOOy*O"
#: The positional parameters of a CUDA launcher's ``__call__`` before its ``*args``, in
#: the releases whose JIT calls it ``run(gx, gy, gz, stream, function, packed_metadata,
#: launch_metadata, enter_hook, exit_hook, *kernel_args)``: Triton 3.5 / 3.6 (the rest in
#: ``*args``), 3.7 to 3.9 (named).
LAUNCHER_CALL_FORMS = (
    ("gridX", "gridY", "gridZ", "stream", "function"),
    ("gridX", "gridY", "gridZ", "stream", "function", "kernel_metadata", "launch_metadata",
     "launch_enter_hook", "launch_exit_hook"),
)
#: The names Triton 3.9.0's ``CudaLauncher.__call__`` uses (its code's ``co_names``):
#: scratch allocation, a default profile scratch and GSan (its state pointer, a refusal
#: under graph capture, launch bookkeeping), all gated off per kernel by
#: :func:`_plain_cuda_launcher`, then the entry.
_LAUNCHER_CALL_3_9 = frozenset({
    "GSAN_PER_DEVICE_STATE_STRIDE", "RuntimeError", "_allocation", "_allocator",
    "_profile_allocator", "_stream_sync", "active", "arg_annotations", "driver",
    "experimental", "get_current_device", "get_device_rank", "get_global_state_pointer",
    "get_launch_state", "global_scratch_align", "global_scratch_size", "gsan",
    "gsan_enabled", "has_profile_allocator", "is_stream_capturing", "kernel_signature",
    "launch", "launch_cooperative_grid", "launch_pdl", "profile_scratch_align",
    "profile_scratch_size", "runtime", "triton", "triton.experimental.gsan._allocator",
    "triton.experimental.gsan._stream_sync", "utils"})
#: The names the ``CudaLauncher.__call__`` of the releases whose call the shared-entry
#: relaunch reproduces uses: 3.7.1 (scratch allocation, then the entry), 3.9.0
#: (:data:`_LAUNCHER_CALL_3_9`) and 3.8.0 (3.9.0's call without its GSan capture refusal
#: and launch bookkeeping, with a GSan stream sync after the entry, gated off with GSan).
#: A launcher whose call uses other names may do something the relaunch would skip: it
#: keeps the launcher object.
KNOWN_SHARED_LAUNCHER_CALLS = (
    frozenset({"_allocation", "_allocator", "_profile_allocator", "arg_annotations",
               "global_scratch_align", "global_scratch_size", "kernel_signature", "launch",
               "launch_cooperative_grid", "launch_pdl", "profile_scratch_align",
               "profile_scratch_size"}),
    _LAUNCHER_CALL_3_9,
    _LAUNCHER_CALL_3_9 - {"RuntimeError", "get_launch_state", "is_stream_capturing", "utils"}
    | {"synchronize_launch_stream"},
)
#: The module of Triton's CUDA launcher class (``CudaLauncher``)
TRITON_CUDA_DRIVER = "triton.backends.nvidia.driver"
#: Values per site in a sequence's table entry (:func:`launch_entry`)
ENTRY_FIELDS = 8
#: Per host descriptor of a compiled kernel: encoded tensor maps kept (by base address),
#: the oldest dropped first. A model's layers each pass their own cache, so a cache's
#: descriptor sees one address per layer: at 16 (sessions 13-23) 32 or 96 layers missed on
#: every call and encoded their maps again (NOTES.md session 24). An entry is ~0.3 KB.
ENCODED_LIMIT = 1024
#: The arguments Triton 3.6's CUDA launch entry takes before the kernel's own
_BASE_ARGS = 13


# --------------------------------------------------------------------------- releases
def c_launch_known() -> bool:
    """Whether the installed Triton's CUDA launchers have the per-kernel C entry of Triton
    3.6 (:data:`C_LAUNCH_FORMAT`). Asked when a sequence is built or stores kernels,
    never per call."""
    try:
        from triton.backends.nvidia import driver
    except Exception:
        return False
    return getattr(driver, "_BASE_ARGS_FORMAT", None) == C_LAUNCH_FORMAT


def shared_launch_known() -> bool:
    """Whether the installed Triton's CUDA launchers call the shared C entry as Triton
    3.7.1, 3.8.0 and 3.9.0 do: no per-kernel entry, the driver's C source (shipped with Triton,
    which compiles it on first use) parses exactly :data:`SHARED_LAUNCH_FORMAT`, and
    ``CudaLauncher.__call__`` uses one of the name sets of
    :data:`KNOWN_SHARED_LAUNCHER_CALLS` (so it does nothing else before calling the
    entry). The source is read once per driver file."""
    try:
        from triton.backends.nvidia import driver
    except Exception:
        return False
    if getattr(driver, "_BASE_ARGS_FORMAT", None) is not None:
        return False
    launcher_class = getattr(driver, "CudaLauncher", None)
    call = vars(launcher_class).get("__call__") if isinstance(launcher_class, type) else None
    names = getattr(getattr(call, "__code__", None), "co_names", None)
    if names is None or frozenset(names) not in KNOWN_SHARED_LAUNCHER_CALLS:
        return False
    path = getattr(driver, "__file__", None)
    if not path:
        return False
    source = os.path.join(os.path.dirname(os.path.realpath(path)), "driver.c")
    return _parses(source, SHARED_LAUNCH_FORMAT)


@functools.lru_cache(maxsize=8)
def _parses(source_path: str, fmt: str) -> bool:
    """Whether, in the C source at ``source_path``, the function the module registers as
    ``launch`` parses its arguments with ``fmt`` (and no other function does)."""
    try:
        with open(source_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    registered = re.search(r'\{\s*"launch"\s*,\s*(\w+)\s*,', text)
    if registered is None:
        return False
    start = text.find(f"static PyObject *{registered.group(1)}(")
    call = f'PyArg_ParseTuple(args, "{fmt}"'
    if start < 0 or text.count(call) != 1:
        return False
    end = text.find("static PyObject *", start + 1)
    return start < text.find(call) < (end if end >= 0 else len(text))


def argument_layout() -> str:
    """The relaunch's argument layout on the installed Triton: ``"shared"`` where the
    shared C entry is known (3.7 to 3.9), else ``"kernel"`` (3.6's per-kernel entry, or
    the launcher object through an adapter)."""
    return "shared" if shared_launch_known() else "kernel"


def launcher_call_known(run) -> bool:
    """Whether a compiled kernel's launcher ``run`` takes what the relaunch passes when it
    does not use a C entry: its class's ``__call__`` has exactly the positional
    parameters of one of :data:`LAUNCHER_CALL_FORMS`, then ``*args`` and nothing else
    (any other parameter could shift the arguments)."""
    try:
        params = list(inspect.signature(type(run).__call__).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    if not params or params[-1].kind is not inspect.Parameter.VAR_POSITIONAL:
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    leading = params[:-1]
    return all(p.kind in positional and p.default is inspect.Parameter.empty
               for p in leading) and tuple(p.name for p in leading) in LAUNCHER_CALL_FORMS


# --------------------------------------------------------------------------- entries
def launch_entry(compiled, descriptors: dict, arg_layout: str) -> tuple:
    """What a relaunch needs of a compiled kernel, in argument layout ``arg_layout``
    (its sequence's :func:`argument_layout`): ``(launch, function, packed_metadata,
    cooperative, pdl, expanders, annotations, signature)``; ``descriptors``: the host
    descriptors of its site (position -> layout), see :func:`descriptor_expanders`.
    ``annotations`` and ``signature`` are None in the ``"kernel"`` layout."""
    run = compiled.run
    if arg_layout == "shared":
        launch, cooperative, pdl, annotations, signature = shared_launch(run)
    else:
        (launch, cooperative, pdl), annotations, signature = driver_launch(run), None, None
    launch, expanders = descriptor_expanders(launch, descriptors)
    return (launch, compiled.function, compiled.packed_metadata, cooperative, pdl,
            expanders, annotations, signature)


def _plain_cuda_launcher(run) -> bool:
    """Triton's CUDA launcher of a kernel with no global or profiling scratch to allocate
    per launch (nor GSan state, the sanitizer of Triton 3.8 on)."""
    return type(run).__name__ == "CudaLauncher" and \
        getattr(run, "global_scratch_size", 1) == 0 and \
        getattr(run, "profile_scratch_size", 1) == 0 and \
        not getattr(run, "gsan_enabled", False) and \
        getattr(run, "launch_cooperative_grid", None) is not None and \
        getattr(run, "launch_pdl", None) is not None


def driver_launch(run) -> tuple[Callable, Any, Any]:
    """``(launch, cooperative, pdl)`` for a compiled kernel's launcher ``run``, in the
    ``"kernel"`` layout: ``launch`` takes ``(gx, gy, gz, stream, function, cooperative,
    pdl, global_scratch, profile_scratch, packed_metadata, launch_metadata, enter_hook,
    exit_hook, *args)``. For Triton 3.6's CUDA launcher of a kernel without scratch, that
    is its C entry itself (the launcher's frame skipped: two scratch checks and the
    argument tuple built and unpacked twice per launch); otherwise an adapter calling
    ``run`` as the JIT does, which allocates any scratch."""
    c_launch = getattr(run, "launch", None)
    if _plain_cuda_launcher(run) and callable(c_launch) and c_launch_known():
        return c_launch, run.launch_cooperative_grid, run.launch_pdl

    scratch = _scratch_allocator_setter(run)

    def through_run(gx, gy, gz, stream, function, cooperative, pdl, global_scratch,
                    profile_scratch, *rest):
        scratch()
        return run(gx, gy, gz, stream, function, *rest)
    return through_run, False, False


def _scratch_allocator_setter(run) -> Callable[[], None]:
    """What an adapter calls before ``run`` allocates: for a kernel with global scratch
    (device-side descriptors), :func:`~portattn.kernels.launch.ensure_scratch_allocator`,
    since Triton reads its allocator from the calling context (a ContextVar) and a relaunch
    may come from a thread or task other than the one whose normal path set it; for
    others nothing."""
    if not getattr(run, "global_scratch_size", 0):
        return _nothing
    from portattn.kernels.launch import ensure_scratch_allocator

    return ensure_scratch_allocator


def _nothing() -> None:
    pass


def shared_launch(run) -> tuple[Callable, Any, Any, Any, Any]:
    """``(launch, cooperative, pdl, annotations, signature)`` for a compiled kernel's
    launcher ``run``, in the ``"shared"`` layout: ``launch`` takes ``(gx, gy, gz, stream,
    function, cooperative, pdl, packed_metadata, launch_metadata, enter_hook, exit_hook,
    global_scratch, profile_scratch, annotations, signature, kernel_args)``. For Triton
    3.7's to 3.9's own CUDA launcher of a kernel without scratch or GSan, that is ``run.launch``
    itself, which its ``__call__`` calls with exactly these arguments after allocating
    scratch (the shared C entry, or Triton's descriptor wrapper around it); otherwise an
    adapter calling ``run`` as the JIT does."""
    c_launch = getattr(run, "launch", None)
    annotations = getattr(run, "arg_annotations", None)
    signature = getattr(run, "kernel_signature", None)
    if _plain_cuda_launcher(run) and type(run).__module__ == TRITON_CUDA_DRIVER and \
            callable(c_launch) and annotations is not None and \
            isinstance(signature, (bytes, bytearray)):
        return c_launch, run.launch_cooperative_grid, run.launch_pdl, annotations, signature

    scratch = _scratch_allocator_setter(run)

    def through_run(gx, gy, gz, stream, function, cooperative, pdl, packed_metadata,
                    launch_metadata, enter_hook, exit_hook, global_scratch, profile_scratch,
                    annotations, signature, kernel_args):
        scratch()
        return run(gx, gy, gz, stream, function, packed_metadata, launch_metadata,
                   enter_hook, exit_hook, *kernel_args)
    return through_run, False, False, None, None


# --------------------------------------------------------------------------- descriptors
class _Pointer:
    """A bare device address with ``data_ptr()``: the base of a rebuilt descriptor."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


class HostDescriptor:
    """A recorded host descriptor around a new base pointer: what Triton's launcher reads
    of a ``TensorDescriptor`` (``base.data_ptr()``, ``shape``, ``strides``, ``padding``,
    and from Triton 3.7 on ``round_f32_to_tf32``)."""

    __slots__ = ("base", "shape", "strides", "block_shape", "padding", "round_f32_to_tf32")

    def __init__(self, ptr: int, layout: tuple):
        self.base = _Pointer(ptr)
        (_dtype, self.shape, self.strides, self.block_shape, self.padding,
         self.round_f32_to_tf32) = layout


def descriptor_expanders(launch, descriptors: dict) -> tuple[Callable, tuple]:
    """``(launch, expanders)``: per host descriptor of a site (in parameter order), a
    function of its new base address returning the launch arguments it stands for.

    Triton's CUDA launcher of a kernel with host descriptors calls its C entry through a
    wrapper (``wrap_handle_tensordesc``; from 3.8 on ``wrap_handle_tensordesc_impl``
    walking the arguments in C++) that encodes each descriptor (``cuTensorMapEncodeTiled``)
    per launch. Where ``launch`` is that wrapper as Triton 3.6 to 3.9 build it, the C
    entry is called instead, and each descriptor's
    expansion is made by Triton's own ``make_tensordesc_arg`` once per base address and
    kept (a tensor map is a pure function of the address and the fixed layout, and the
    launch copies it into the kernel's parameters, so one object serves every launch).
    Otherwise ``launch`` is kept and each descriptor is passed as a
    :class:`HostDescriptor`."""
    items = sorted(descriptors.items())
    if not items:
        return launch, ()
    positions = [pos for pos, _ in items]
    unwrapped = _unwrap_descriptor_launcher(launch, positions) or \
        _unwrap_shared_wrapper(launch, positions)
    if unwrapped is None:
        return launch, tuple(_as_descriptor(layout) for _, layout in items)
    c_launch, metas, make = unwrapped
    return c_launch, tuple(_encoder(make, layout, meta)
                           for (_, layout), meta in zip(items, metas))


def _unwrap_descriptor_launcher(launch, positions: list[int]):
    """``(C entry, per-descriptor metadata, make_tensordesc_arg)`` of Triton's descriptor
    wrapper ``launch`` (descriptors at ``positions`` of the kernel's parameters), or None
    when ``launch`` is not that wrapper as Triton 3.6 (its module's 13 leading arguments,
    then the kernel's) or 3.7 (no such constant: the shared entry's arguments, the
    kernel's last as one sequence; ``make_tensordesc_arg(arg, metadata)``) build it,
    recognised by name, module and closure."""
    cells = _closure_cells(launch, "wrap_handle_tensordesc.<locals>.inner", TRITON_CUDA_DRIVER)
    if cells is None:
        return None
    try:
        c_launch = cells["launcher"]
        indices, metas = cells["tensordesc_indices"], cells["tensordesc_meta"]
        make = launch.__globals__["make_tensordesc_arg"]
    except (KeyError, ValueError, AttributeError):
        return None
    if set(cells) != {"launcher", "tensordesc_indices", "tensordesc_meta"} or \
            not callable(c_launch) or not callable(make) or \
            sorted(indices) != positions or len(metas) != len(positions):
        return None
    base_args = launch.__globals__.get("_BASE_ARGS_FORMAT_LEN")
    if base_args is None:  # 3.7: the shared entry, make_tensordesc_arg(arg, metadata)
        if _positional_count(make) != 2:
            return None
    elif base_args != _BASE_ARGS:
        return None
    return c_launch, list(metas), make


def _closure_cells(fn, qualname: str, module: str) -> dict | None:
    """The values ``fn`` closes over, by name, where ``fn`` is the function ``qualname`` of
    module ``module`` (a Triton launcher wrapper, recognised by name and module); else
    None."""
    if getattr(fn, "__qualname__", None) != qualname or \
            getattr(fn, "__globals__", {}).get("__name__") != module:
        return None
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or closure is None:
        return None
    try:
        return {name: cell.cell_contents for name, cell in zip(code.co_freevars, closure)}
    except ValueError:  # an empty cell
        return None


def _unwrap_shared_wrapper(launch, positions: list[int]):
    """``(C entry, per-descriptor metadata, make)`` of the descriptor wrapper Triton 3.8 and
    3.9 build (``triton.backends.driver.wrap_handle_tensordesc_impl``: a closure over the
    shared entry, the kernel's signature, the descriptors' paths and metadata, and the
    backend's ``make_tensordesc_arg(arg, metadata, base_args)``), or None when ``launch``
    is not that wrapper over a flat signature whose descriptors are exactly at
    ``positions``, with NVIDIA's ``make_tensordesc_arg``, which ignores ``base_args`` (so
    an expansion depends on the base address alone and can be kept per address).

    What the wrapper does per launch (Triton's ``make_tensordesc_args``): descriptor ``k``
    in parameter order is replaced in place by ``make_tensordesc_arg(arg, meta[k],
    base_args)``, ``meta[k]`` None where the metadata list is empty."""
    cells = _closure_cells(launch, "wrap_handle_tensordesc_impl.<locals>.inner",
                           "triton.backends.driver")
    if cells is None or set(cells) != {"launcher", "make_tensordesc_arg", "relevant_paths",
                                       "signature", "tensordesc_meta"}:
        return None
    c_launch, make, signature = cells["launcher"], cells["make_tensordesc_arg"], cells["signature"]
    paths, metas = cells["relevant_paths"], cells["tensordesc_meta"]
    if not (callable(c_launch) and isinstance(signature, tuple) and
            all(isinstance(t, str) for t in signature) and type(metas) is list):
        return None
    found = [i for i, t in enumerate(signature) if t.startswith("tensordesc")]
    if found != positions or paths != {i: {} for i in found} or \
            len(metas) not in (0, len(found)) or not _ignores_base_args(make):
        return None

    def make_without_base(arg, meta):
        return make(arg, meta, None)
    return c_launch, (metas or [None] * len(found)), make_without_base


def _ignores_base_args(make) -> bool:
    """Whether ``make`` is NVIDIA's ``make_tensordesc_arg(arg, metadata, _)`` and never
    reads its third parameter."""
    import dis

    code = getattr(make, "__code__", None)
    if code is None or getattr(make, "__module__", None) != TRITON_CUDA_DRIVER or \
            code.co_argcount != 3 or code.co_flags & (inspect.CO_VARARGS |
                                                      inspect.CO_VARKEYWORDS):
        return False
    third = code.co_varnames[2]
    # (3.13's paired instructions, e.g. LOAD_FAST_LOAD_FAST, name a tuple of locals)
    return third not in code.co_cellvars and not any(
        third in (ins.argval if isinstance(ins.argval, tuple) else (ins.argval,))
        for ins in dis.get_instructions(code)
        if ins.opname.startswith(("LOAD_FAST", "DELETE_FAST", "STORE_FAST")))


def _positional_count(fn) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                          inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params)


def _as_descriptor(layout: tuple) -> Callable[[int], tuple]:
    def expand(ptr: int) -> tuple:
        return (HostDescriptor(ptr, layout),)
    return expand


def _encoder(make, layout: tuple, meta) -> Callable[[int], tuple]:
    """A base address -> ``make(descriptor at that address, meta)``, kept per address
    (up to :data:`ENCODED_LIMIT`, oldest first out: a dict keeps insertion order)."""
    encoded: dict[int, tuple] = {}
    lock = threading.Lock()  # misses only: a hit is one dict lookup

    def expand(ptr: int) -> tuple:
        found = encoded.get(ptr)
        if found is None:
            found = tuple(make(HostDescriptor(ptr, layout), meta))
            with lock:
                if ptr not in encoded and len(encoded) >= ENCODED_LIMIT:
                    del encoded[next(iter(encoded))]
                encoded[ptr] = found
        return found
    return expand


# --------------------------------------------------------------------------- the call
def call_line(s: int, grid: tuple, args: list[str], arg_layout: str) -> str:
    """The generated launch code's call of site ``s`` (its entry unpacked as ``_l{s}``,
    ``_f{s}``, ``_m{s}``, ``_c{s}``, ``_d{s}``, ``_a{s}``, ``_s{s}``) with the kernel's
    argument expressions ``args``, in layout ``arg_layout``; no hooks, no scratch."""
    g0, g1, g2 = grid
    head = f"_l{s}({g0}, {g1}, {g2}, stream, _f{s}, _c{s}, _d{s}, "
    if arg_layout == "shared":
        kernel_args = f"({', '.join(args)},)" if args else "()"
        return head + f"_m{s}, None, None, None, None, None, _a{s}, _s{s}, {kernel_args})"
    return head + f"None, None, _m{s}, None, None, None, {', '.join(args)})"

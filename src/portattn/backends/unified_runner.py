"""The per-layer runner of ``triton_unified`` plans: launch.py's launches, replayed.

A plan's first call of each call structure (its ``slot``: shapes, strides, dtypes and
scalar values of every argument) runs :func:`portattn.kernels.launch.launch_unified`
normally under :func:`portattn.kernels.fast_launch.capture`; the recorded launches become
a :class:`~portattn.kernels.fast_launch.LaunchSequence`, and later calls of that structure
only gather the data pointers of the layer's tensors and call the compiled kernels'
launchers. launch.py stays the one place that knows the kernels' arguments: whatever it
passes is recorded, so new arguments need no change here. When a sequence cannot be
replayed (the interpreter, a launch hook, a tensor launch.py made itself), calls take the
normal path and the reason is logged once.

A runner belongs to one plan body, and a body to one device (the body cache is keyed by
it), so its workspaces, recorded launches and device scalars are that GPU's; the body
makes that GPU current around the call (:meth:`portattn.planning.PlanBody.launch`), so
the runner tells the relaunch which device is current (and, when it has looked it up
for the workspace, its stream) instead of having it asked again. A replay reads only the
tensors its recorded launches bind, straight from the call's arguments
(:data:`READERS`): no tuple of every input is built per call.

Workspaces are per (CUDA stream, calling thread): a call's launches (staging then
attention; split-KV attention then the merge kernel where the kernel cannot merge) are
queued by one thread back to back, and kernels
on one stream run in order, so the calls of one thread on one stream may share a
workspace (the layers of a model do); two threads queueing onto the same stream (the
default one, say) may interleave their launches, so they never share one. The split-KV
workspace belongs to the runner. A staged prefill's workspace is sized per call
(hundreds of MB for long prefills): up to :data:`STAGING_KEEP_BYTES` it comes from a
buffer per (GPU, stream, thread) shared by every runner (grown to the largest such call,
at most :data:`MAX_WORKSPACES` of them, kept until :func:`portattn.planning.clear`;
taking a fresh one from torch's caching allocator cost 5.3 us of host time per call on
the H200's host, a quarter of a 1024-token prefill's); larger ones are taken from the
caching allocator per call, so no plan holds hundreds of MB while idle. While a CUDA
graph is being captured the normal path allocates a fresh one from the graph's pool, so
a captured graph never points into a buffer the runner may drop (its split-KV merge
tickets come from ``kernels.graph_tickets``, which is never freed). Every workspace starts
with the split-KV merge tickets (``launch.new_workspace``: zeroed when made, left zero
by every launch), so any runner may share any workspace.
"""

from __future__ import annotations

import logging
import threading

import torch

from portattn.backends.base import Runner
from portattn.devices import stream_key
from portattn.kernels import fast_launch, heuristics
from portattn.kernels.scalars import device_scalars

_find_scalar = device_scalars.find
_find_on_queue = device_scalars.find_on_queue

log = logging.getLogger("portattn")

#: Recordings whose inputs alias (one tensor in two roles) before giving up on a structure.
MAX_AMBIGUOUS = 8
_UNUSABLE = object()
#: Workspaces kept per :class:`Workspaces` (a runner's split-KV ones; the shared staging
#: buffers); past that the oldest is dropped (kernels queued on it keep it safe: torch's
#: caching allocator reuses its memory on that stream only, after them)
MAX_WORKSPACES = 8
_INTERPRETER_LOCK = threading.Lock()
#: A staged prefill's workspace up to this size comes from a shared buffer
STAGING_KEEP_BYTES = 64 << 20


class Workspaces(dict):
    """float32 workspaces by key (a (stream, thread) pair, see the module doc), each
    grown to the largest size asked for, at most :data:`MAX_WORKSPACES` of them."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def take(self, key, elements: int, device) -> torch.Tensor:
        """The workspace of ``key``, with room for ``elements`` values of data before its
        merge tickets (made or grown here, by ``launch.new_workspace``)."""
        from portattn.kernels.launch import has_room, new_workspace

        buffer = self.get(key)
        if buffer is None or not has_room(buffer, elements):
            with self._lock:
                buffer = self.get(key)
                if buffer is None or not has_room(buffer, elements):
                    if buffer is None and len(self) >= MAX_WORKSPACES:
                        self.pop(next(iter(self)))
                    buffer = new_workspace(elements, device)
                    self[key] = buffer
        return buffer

    def clear(self) -> None:
        """Drop every workspace (under the lock: :meth:`take` evicts the oldest after
        counting them, which a clear in between would turn into StopIteration)."""
        with self._lock:
            super().clear()


_staging = Workspaces()  # (device, stream, thread) -> a shared staging buffer


def staging_buffer(device: torch.device, stream, elements: int) -> torch.Tensor:
    """A float32 workspace of at least ``elements`` for a staged prefill on ``stream``
    (the current one of ``device``) by the calling thread: that (stream, thread)'s shared
    buffer, grown when too small, or a fresh one above :data:`STAGING_KEEP_BYTES`. One
    thread's calls on one stream run in the order they were queued, so they may share
    it (see the module doc); a replaced buffer is only reused by torch's caching
    allocator after the kernels queued on it."""
    if 4 * elements > STAGING_KEEP_BYTES:
        from portattn.kernels.launch import new_workspace

        return new_workspace(elements, device)
    return _staging.take((device, stream, threading.get_ident()), elements, device)


def clear_staging_buffers() -> None:
    """Drop the shared staging buffers (``portattn.planning.clear``)."""
    _staging.clear()


class Slot:
    """Per call structure: the launch sequence, or why there is none."""

    __slots__ = ("sequence", "reason", "ambiguous")

    def __init__(self):
        self.sequence = None
        self.reason: str | None = None
        self.ambiguous = 0


def _scale_input(scale, q, role: str, device=None, stream=None):
    """The tensor launch.py passes for a scale of a call with query ``q``: the tensor
    itself, or for a float the cached device scalar of its role on q's device and current
    stream (the same object every call on that stream, so replays bind it; never the
    object of another role, so equal K and V scales do not alias).

    Read on every relaunch of a quantized call (four scales). A relaunch passes the
    current CUDA device's index and stream handle it already holds (``device``,
    ``stream``), so a float found in the memo costs one dict lookup on four plain
    values, ahead of the tensor test (``isinstance`` against ``torch.Tensor`` costs more
    than the lookup). A miss (a recording, which passes neither; a stream not met yet)
    asks for q's device and its stream."""
    if type(scale) is float:
        found = _find_on_queue((role, scale, device, stream))
        if found is not None:
            return found
        device = q.device
        found = _find_scalar((role, scale, device, stream_key(device)))
        if found is not None:
            return found
    if scale is None or isinstance(scale, torch.Tensor):
        return scale
    return device_scalars.get(scale, q.device, role)


def _float_scales_kept(q, cache, layer) -> bool:
    """Whether every scale of the call that :func:`_scale_input` turns into a device
    tensor is the same tensor at each read (see ``device_scalars.kept``)."""
    quant, device = cache.quant, q.device
    return device_scalars.kept(quant.k_scale, device, "k") and \
        device_scalars.kept(quant.v_scale, device, "v") and \
        device_scalars.kept(layer[2], device, "q") and \
        device_scalars.kept(layer[3], device, "out")


#: Every tensor launch.py may pass to a kernel, in a fixed order (None when absent), as
#: expressions over a runner call's arguments. A replay reads only those its recorded
#: launches bind; a recording reads them all (:func:`inputs_of`).
_PARAMS = "q, cache, metadata, out, layer, ws"
_PLAIN = ("q", "cache.key_cache", "cache.value_cache", "out", "metadata.cu_seqlens_q",
          "metadata.seq_lens", "metadata.block_table", "layer[0]", "layer[1]", "ws")
_SCALES = ("cache.k_scale_cache", "cache.v_scale_cache",
           "scale_input(cache.quant.k_scale, q, 'k', device, stream)",
           "scale_input(cache.quant.v_scale, q, 'v', device, stream)",
           "scale_input(layer[2], q, 'q', device, stream)",
           "scale_input(layer[3], q, 'out', device, stream)")
#: quantized -> the inputs as a relaunch reads them (the scale tensors only when quantized)
READERS = {False: fast_launch.Reader(_PARAMS, _PLAIN),
           True: fast_launch.Reader(_PARAMS, _PLAIN + _SCALES, {"scale_input": _scale_input})}


def inputs_of(q, cache, metadata, out, layer, workspace, quantized: bool = True) -> tuple:
    """Every tensor launch.py may pass to a kernel, in a fixed order (None when absent).
    Without quantization (``quantized=False``) the scale tensors are left out (they are
    None then)."""
    return READERS[quantized].read(q, cache, metadata, out, layer, workspace)


class UnifiedRunner(Runner):
    def __init__(self, backend, plan, options, problem, device: torch.device):
        super().__init__(backend, plan, options)
        from portattn.kernels import launch

        self._launch = launch.launch_unified
        params = plan.params
        self._sizing = (problem.num_seqs, problem.num_q_heads, problem.num_kv_heads,
                        problem.head_size_qk, problem.head_size_v,
                        heuristics.scales_per_token_head(problem.kv_quant), problem.q_dtype,
                        params)
        self._workspace_size_for = launch.plan_workspace_size
        self.workspace_size = launch.plan_workspace_size(*self._sizing)
        # staged prefills size their workspace per call, by the call's tokens
        # (launch.staging_slots): staging_buffer, so an idle plan holds none of its own;
        # a plan whose long sequences take the Gluon prefill over the cache stages nothing
        # (its split partials, if any, are the runner's own workspace)
        self.workspace_per_call = bool(params.get("stage")) and not launch.reads_cache(params)
        self._staging_sizes: dict[int, int] = {}  # call's tokens -> workspace elements
        self.device = device
        # the CUDA index of the GPU PlanBody.launch makes current around every call (None
        # off CUDA: the relaunch asks for the current device)
        self._index = device.index if device.type == "cuda" else None
        # fp8 q / output or a quantized cache: the scale tensors may be kernel arguments
        self.quantized = options.out_dtype not in (torch.float16, torch.bfloat16,
                                                   torch.float32) or \
            problem.quantized_kv or problem.q_dtype not in (torch.float16, torch.bfloat16,
                                                             torch.float32)
        # The interpreter has no compiled kernels to replay.
        self.replay = device.type != "cpu"
        self._slots: dict = {}
        self._workspaces = Workspaces()  # split-KV, by (stream, thread)
        self._lock = threading.Lock()
        self._logged: set = set()
        from portattn.devices import current_stream_handle, stream_capturing

        self._stream = current_stream_handle
        self._capturing = stream_capturing

    def slot(self, key) -> Slot:
        found = self._slots.get(key)
        if found is None:
            with self._lock:
                if len(self._slots) >= 256:
                    self._slots.clear()
                found = self._slots.setdefault(key, Slot())
        return found

    def _workspace(self, num_tokens: int = 0):
        """This stream's workspace (for a call of ``num_tokens`` queries); None while a
        CUDA graph is captured."""
        if self._capturing():
            return None
        return self._workspace_on(self._stream(self._index), num_tokens)

    def _workspace_on(self, stream, num_tokens: int):
        """The workspace of ``stream`` (the current one, no graph being captured) for the
        calling thread: the runner's for that (stream, thread), or for a staged prefill of
        ``num_tokens`` queries :func:`staging_buffer`'s."""
        if self.workspace_per_call:
            size = self._staging_sizes.get(num_tokens)
            if size is None:
                if len(self._staging_sizes) >= 256:
                    self._staging_sizes.clear()
                size = self._staging_sizes[num_tokens] = \
                    self._workspace_size_for(*self._sizing, num_tokens)
            return staging_buffer(self.device, stream, size)
        return self._workspaces.take((stream, threading.get_ident()), self.workspace_size,
                                     self.device)

    def __call__(self, q, cache, metadata, out, layer: tuple, slot: Slot) -> None:
        if not self.replay:  # the interpreter: not thread-safe (it patches triton.language)
            with _INTERPRETER_LOCK:
                self._launch(q, cache, metadata, self.options_for(layer), out,
                             self.plan.params)
            return
        if slot is None:
            self._launch(q, cache, metadata, self.options_for(layer), out, self.plan.params)
            return
        ws = stream = None
        if self.workspace_size or self.workspace_per_call:
            if self._capturing():  # a CUDA graph: the normal path, a workspace from its pool
                self._launch(q, cache, metadata, self.options_for(layer), out,
                             self.plan.params)
                return
            stream = self._stream(self._index)
            ws = self._workspace_on(stream, q.shape[0])
        sequence = slot.sequence
        if sequence is _UNUSABLE:  # the normal path, without a capture's launch hook
            self._launch(q, cache, metadata, self.options_for(layer), out, self.plan.params,
                         workspace=ws)
            return
        # the device and stream this runner's GPU has current (PlanBody.launch made it so)
        if sequence is not None and \
                sequence.launch(q, cache, metadata, out, layer, ws, self._index, stream):
            return
        self._record(q, cache, metadata, out, layer, ws, slot)

    def _record(self, q, cache, metadata, out, layer, ws, slot: Slot) -> None:
        """The normal path, recorded; builds the slot's sequence or adds kernels to it."""
        from portattn.kernels import launch

        reader = READERS[self.quantized]
        inputs = reader.read(q, cache, metadata, out, layer, ws)
        if self.quantized and not _float_scales_kept(q, cache, layer):
            # a float scale is a new device tensor at every read (its memo refused it):
            # nothing a relaunch could bind; record from a call whose scales it keeps
            self._launch(q, cache, metadata, self.options_for(layer), out, self.plan.params,
                         workspace=ws)
            return
        failed_before = len(launch.DESCRIPTOR_FAILED)
        with fast_launch.capture() as captured:
            self._launch(q, cache, metadata, self.options_for(layer), out, self.plan.params,
                         workspace=ws)
        sequence = slot.sequence
        if sequence is _UNUSABLE:
            return
        if len(launch.DESCRIPTOR_FAILED) != failed_before:
            # a descriptor launch failed and the call was rerun with pointer loads: the
            # capture holds the discarded launches too; record from the next call
            return
        try:
            if sequence is None:
                slot.sequence = fast_launch.LaunchSequence.build(captured, inputs,
                                                                 reader=reader)
            elif not sequence.absorb(captured, inputs):
                if fast_launch.triton_state() is None:
                    return  # a launch hook is installed: try again later
                raise fast_launch.Unusable("a later call launched different kernels")
        except fast_launch.Ambiguous as exc:
            slot.ambiguous += 1  # inputs aliased in this call: build from a later one
            if slot.ambiguous < MAX_AMBIGUOUS:
                return
            self._unusable(slot, f"{exc} (in {slot.ambiguous} calls)")
        except fast_launch.Unusable as exc:
            if fast_launch.triton_state() is None:
                return  # a launch hook is installed: try again later
            self._unusable(slot, str(exc))
        except Exception as exc:
            # the call itself ran (on the normal path); what failed is reading Triton's
            # internals to record it (a release that renamed what the recorder reads):
            # this structure keeps the normal path, with the reason, never a crash
            from portattn.capabilities._text import one_line

            self._unusable(slot, f"recording the launches failed: {one_line(exc)}")

    def _unusable(self, slot: Slot, reason: str) -> None:
        slot.sequence = _UNUSABLE
        slot.reason = reason
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("portattn: triton_unified launches go through Triton's JIT for this "
                        "call structure (slower host path): %s", reason)

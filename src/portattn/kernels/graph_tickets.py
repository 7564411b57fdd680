"""Merge tickets for split-KV launches captured in CUDA graphs, with no memset per replay.

A split launch that merges in the kernel counts on int32 tickets that are zero before
it runs (it leaves them zero). Launched eagerly it takes them from a workspace made
zeroed once. Captured in a CUDA graph without a workspace, it would allocate one from
the graph's memory pool, which holds whatever was there, so the graph would replay a
memset before every launch: 0.6-1.6 us of a 17-75 us small-batch decode on an H200
(benchmarks/NOTES.md, session 11).

Instead a captured launch takes tickets of its own from a per-device slab zeroed once,
before any capture (:func:`prepare`, called by eager launches): each captured launch
gets a slice no other launch uses, so two graphs replayed side by side never share a
ticket, and replays of one graph are ordered by CUDA. The slab is never freed (a graph
may replay for the life of the process); when it is used up, or was never made, the
launch falls back to the memset (:func:`take` returns None). Making the slab waits for
its zeroing once (a capture begun on another stream, or by another thread, must not see
it before). Known limit: under ``torch.compile(mode="reduce-overhead")``, a first split
call inside Inductor's warm-up would allocate the slab from Inductor's graph pool, which
Inductor may later hand out again (the runner's workspaces share that exposure); make
one eager split call first there.

Pure torch, no Triton: the launcher (:mod:`portattn.kernels.launch`) decides when.
"""

from __future__ import annotations

import threading

import torch

#: int32 tickets per device (1 MiB): a 64-pair decode slice each for 4096 captured launches
SLAB_TICKETS = 1 << 18
#: slices start on 128-byte boundaries
SLICE_ALIGN = 32

_lock = threading.Lock()
#: device -> [slab, next free ticket]; never shrunk (captured graphs point into it)
_slabs: dict[torch.device, list] = {}


def prepare(device: torch.device) -> None:
    """Make ``device``'s zeroed slab if it has none. Call outside any graph capture (a
    capture could not allocate or zero it outside its own pool)."""
    if device in _slabs:
        return
    with _lock:
        if device not in _slabs:
            slab = torch.zeros(SLAB_TICKETS, dtype=torch.int32, device=device)
            if device.type == "cuda":  # zero before any graph can read it, whatever
                torch.cuda.current_stream(device).synchronize()  # stream captures on
            _slabs[device] = [slab, 0]


def take(device: torch.device, count: int) -> torch.Tensor | None:
    """``count`` zeroed tickets for one captured launch, used by no other launch; None
    when ``device`` has no slab (:func:`prepare` never ran outside a capture) or too few
    tickets are left in it."""
    entry = _slabs.get(device)
    if entry is None:
        return None
    with _lock:
        slab, start = entry
        if start + count > slab.numel():
            return None
        entry[1] = start + -(-count // SLICE_ALIGN) * SLICE_ALIGN
    return slab[start:start + count]


def used(device: torch.device) -> int:
    """Tickets handed out on ``device`` so far (diagnostics and tests)."""
    entry = _slabs.get(device)
    return 0 if entry is None else entry[1]

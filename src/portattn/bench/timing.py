"""How the bench times a call: :func:`timer` (``do_bench``, or a CPU smoke timer),
:class:`GraphTimer` (kernel-only, in a CUDA graph, L2 flushed), :func:`host_us` (host
time per call) and the hardware ceilings (copy bandwidth, bf16 matmul).
"""

from __future__ import annotations

import statistics
import time

import torch


def timer(device: str, rep_ms: int):
    if device == "cuda":
        import triton.testing

        heat = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

        def run(fn):
            for _ in range(40):  # ~10 ms of matmuls: clocks up before timing
                heat @ heat
            return float(triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms,
                                                 return_mode="median"))
        return run

    def run_cpu(fn):  # the interpreter: a smoke test of the harness, not a measurement
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run_cpu


#: How :class:`GraphTimer` evicts the L2 before each call: ``zero`` writes a 256 MB buffer
#: (do_bench's way: the timed call then also pays the write-back of the dirty lines it
#: evicts, about 5-8 us on an H100: NOTES.md session 34), ``read`` sums it (L2 left clean).
L2_FLUSHES = ("zero", "read")


def evict_l2(buffer: torch.Tensor, sink: torch.Tensor, flush: str) -> None:
    """Evict the L2 through ``buffer`` (int32, far larger than the L2): ``zero`` writes
    it; ``read`` sums it into the int32 0-d ``sink`` (wrapping: only the reads matter),
    accumulating in int32 so the buffer is read once with no converted copy (an int64 sum
    of it would first write and reread it as int64: 1.28 GB of traffic for a 256 MB
    buffer)."""
    if flush == "zero":
        buffer.zero_()
    elif flush == "read":
        torch.sum(buffer, dim=0, dtype=torch.int32, out=sink)
    else:
        raise ValueError(f"flush: expected one of {L2_FLUSHES}, got {flush!r}")


def graph_replay_ms(body, reps: int, replays: int) -> float:
    """Median time (ms) of ``replays`` replays of one CUDA graph of ``reps`` calls of
    ``body``, captured after a warm call on the capture stream (libraries that need
    one there)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            body()
    times = []
    for _ in range(replays):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


class GraphTimer:
    """Kernel-only time with the L2 flushed before every call: ``reps`` x (flush, fn)
    captured in one CUDA graph, minus a graph of ``reps`` flushes alone, each timed after
    heating at every call (a flush baseline timed once per process, with the clocks
    wherever they were, likely shifted one process's times by 7-13 us: NOTES.md session
    34). No host overhead (what a CUDA-graph decode loop sees); also checks that ``fn`` is
    capturable. ``flush``: one of :data:`L2_FLUSHES` (:func:`evict_l2`)."""

    def __init__(self, reps: int = 20, replays: int = 5, flush: str = "zero"):
        if flush not in L2_FLUSHES:
            raise ValueError(f"flush: expected one of {L2_FLUSHES}, got {flush!r}")
        self.reps, self.replays, self.flush = reps, replays, flush
        self.cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
        self._sink = torch.empty((), dtype=torch.int32, device="cuda")
        self.heat_a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def _evict(self) -> None:
        evict_l2(self.cache, self._sink, self.flush)

    def _graph_ms(self, fn) -> float:
        """Median replay time of ``reps`` x (flush, ``fn``); ``fn`` None: flushes alone."""
        def body():
            self._evict()
            if fn is not None:
                fn()
        return graph_replay_ms(body, self.reps, self.replays)

    def heat(self) -> None:
        """Keep the clocks up: ~10 ms of matmuls before each measurement."""
        for _ in range(40):
            self.heat_a @ self.heat_a

    def __call__(self, fn) -> float:
        fn()
        torch.cuda.synchronize()
        self.heat()
        flushes = self._graph_ms(None)
        self.heat()
        return max(0.0, self._graph_ms(fn) - flushes) / self.reps


def host_us(fn, calls: int = 200) -> float:
    """Host time of one call (launches are asynchronous; nothing waits for the GPU)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _copy_tbs(device: str, bench) -> float:
    """Device-to-device copy bandwidth, bytes read + written (its buffers die on return)."""
    n = 1 << 29  # 1 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * n * 2 / (ms * 1e-3) / 1e12


def measure_ceilings(device: str, bench) -> dict:
    if device != "cuda":
        return {"copy_tbs": None, "matmul_tflops": None}
    copy_tbs = _copy_tbs(device, bench)
    m = 8192
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: x @ y)
    return {"copy_tbs": copy_tbs, "matmul_tflops": 2 * m ** 3 / (ms * 1e-3) / 1e12}

"""Host time per attention call: eager ``attention`` and planned ``plan.run``, with 1, 32
and 96 layers (a distinct cache per layer), decode and prefill; plus one Triton launch
through the JIT against the cheap relauncher. Prints one JSON object (a short table goes
to stderr).

    PYTHONPATH=src python3 benchmarks/dispatch_overhead.py [--out FILE] [--quick]

``--quick`` (1 and 2 layers, few calls) only checks that every path runs and relaunches
(the CPU test suite runs it); its times mean nothing.

On a GPU each timed loop starts behind a spin kernel (``torch.cuda._sleep``) that keeps
the GPU busy for longer than the loop takes, and stays below the launch-queue depth, so
the loop's wall time per call is host time alone, whatever the kernels' own time (the
staged prefill's kernels take longer than its host time; before session 10 the loop
timed whichever was slower). Every cell (case x layer count x implementation, and each
case's two launch cells) gets ``REPEATS`` samples, taken round-robin over all cells of all
cases (:func:`time_cells`), and reports their median and minimum (so every case's
layer copies are alive at once: about 2 GB on the GPU, the staged prefill's most).
Implementations per case and layer count:

* ``attention`` / ``attention_out``: ``portattn.attention`` allocating ``out`` / into
  a given ``out`` (the memo of checked call structures, then the plan's runner);
* ``plan_run`` / ``plan_run_out``: ``plan.run`` of a plan made once for the batch;
* ``jit_path``: the backend's ``run`` (launch.py through Triton's JIT every call: what
  every call paid before plans, plus 3-11 us of dispatch); without a GPU the stand-in
  JIT below only binds, specializes and looks up (no launch metadata, hooks, driver),
  so there it understates Triton's cost;

and per case: ``triton_jit_us`` (``kernel[grid](**kwargs)`` with the arguments ready) vs
``cheap_launch_us`` (the recorded sequence relaunched with the same inputs), and
``attention_per_jit_launch``: one layer's ``attention`` over ``triton_jit_us``, the host
time in units of that host's own speed, to compare hosts (session 39's H100 hosts took
1.6-2.3x session 38's time for the same code and the same Triton).

Without a GPU it measures the Python outside the kernel launch instead: the same calls
with launch.py's kernels replaced by stand-ins (Triton's real binder and cache key; a
launcher that does nothing), so the runner, the memo and the generated relauncher run as
on a GPU. Interpreter timings would say nothing; these say what the host adds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

if __name__ == "__main__" and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import portattn  # noqa: E402
from portattn import KVQuant, PagedKVCache, planning  # noqa: E402
from portattn.bench.cases import BENCH_FP8_SCALE  # noqa: E402
from portattn.testing import make_paged_batch  # noqa: E402

LAYERS = (1, 32, 96)
#: case -> (query lens, seq lens); 32 query heads / 8 kv heads / head 128, block 16
CASES = {
    "decode": ([1], [32]),
    "decode_split": ([1], [2048]),   # split-KV: one launch (merged in the kernel), a workspace
    # split-KV over an fp8 per-tensor cache with float scales (device scalars): QUANTIZED
    "decode_fp8": ([1], [2048]),
    "prefill": ([32], [32]),
    # >= 512 queries: where the plan stages, the staging launch and then host-built
    # descriptors; on sm90 with a 16-bit cache the Gluon prefill reads the paged cache
    # with TMA instead (prefill-2d-gluon), one launch
    "prefill_staged": ([1024], [1024]),
}
#: case -> the cache's quantization (the others: a bf16 / fp16 cache)
QUANTIZED = {"decode_fp8": KVQuant.fp8_per_tensor(BENCH_FP8_SCALE, BENCH_FP8_SCALE)}
TARGET_US, GOAL_US = 20.0, 10.0
CALLS_PER_SAMPLE = 192  # below the launch-queue depth even at two launches per call


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


_CYCLES_PER_US: list = []


def _spin_cycles(seconds: float) -> int:
    """GPU clock cycles ``torch.cuda._sleep`` spins for ``seconds`` (measured once)."""
    if not _CYCLES_PER_US:
        cycles = 10_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)  # warm
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        _CYCLES_PER_US.append(cycles / (start.elapsed_time(end) * 1e3))
    return int(seconds * 1e6 * _CYCLES_PER_US[0])


REPEATS = 15


def _spin_for(step) -> int:
    """Run ``step`` once to warm it, then once more to size the spin kernel each of its
    samples starts behind (GPU cycles: twice the step's time plus 2 ms; 0 on a CPU)."""
    step()
    _sync()
    if not torch.cuda.is_available():
        return 0
    t0 = time.perf_counter()
    step()
    spin = _spin_cycles(2 * (time.perf_counter() - t0) + 2e-3)
    _sync()
    return spin


def _sample_us(step, calls: int, spin: int) -> float:
    """One sample: the host time of ``step()`` per call, queued behind the spin kernel."""
    _sync()
    if spin:
        torch.cuda._sleep(spin)
    t0 = time.perf_counter()
    step()
    t1 = time.perf_counter()
    _sync()
    return (t1 - t0) / calls * 1e6


def time_cells(cells: dict, repeats: int | None = None) -> dict:
    """``{name: (step, calls)}`` -> ``{name: (median, minimum)}`` host us per call over
    ``repeats`` samples each, taken round-robin: every round samples each cell once,
    starting one cell further each round. A slow spell of the host (on the GPU machines
    they last from milliseconds to seconds: Triton's own launch then costs up to 3x its
    usual time) then lands on every cell alike instead of on the cells whose samples it
    coincided with: sampled one cell after another (sessions 10-27), neighbouring cells
    of the same work differed by up to 8 us of median, and whole cases by more."""
    repeats = REPEATS if repeats is None else repeats
    spins = {name: _spin_for(step) for name, (step, _calls) in cells.items()}
    samples: dict = {name: [] for name in cells}
    names = list(cells)
    for r in range(repeats):
        first = r % len(names)
        for name in names[first:] + names[:first]:
            step, calls = cells[name]
            samples[name].append(_sample_us(step, calls, spins[name]))
    return {name: (round(statistics.median(values), 2), round(min(values), 2))
            for name, values in samples.items()}


def per_call_us(step, calls: int, repeats: int | None = None) -> float:
    """The median host us per call of ``step()`` (``calls`` calls), one cell alone."""
    return time_cells({"step": (step, calls)}, repeats)["step"][0]


def _layers(batch, count: int):
    """``count`` caches with the batch's structure (distinct tensors) and a q each."""
    caches = [PagedKVCache(batch.cache.key_cache.clone(), batch.cache.value_cache.clone(),
                           batch.cache.quant)
              for _ in range(count)]
    qs = [batch.q.clone() for _ in range(count)]
    return qs, caches


def _loop(call, layers, steps: int):
    """One sample's work: ``steps`` passes of ``call`` over every layer."""
    def step():
        for _ in range(steps):
            for q, cache, out in layers:
                call(q, cache, out)
    return step


def prepare_case(case: str, device: str, dtype: torch.dtype) -> tuple:
    """``(result, cells, plan)`` of a case: its plan's variant, its timed cells keyed
    ``(layer count, implementation)`` and ``("launch", "triton_jit" | "cheap")``, and the
    plan."""
    from portattn.kernels.launch import launch_unified

    query_lens, seq_lens = CASES[case]
    quant = QUANTIZED.get(case)
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=32, num_kv_heads=8,
                             head_size=128, dtype=dtype, device=device, poison=False,
                             quant=quant)
    metadata = batch.metadata
    plan = portattn.plan(metadata, num_q_heads=32, dtype=dtype, cache=batch.cache,
                         backend="triton_unified", validate=False)
    runner = plan._body.runner
    params, options = plan.decision.plan.params, runner.options
    calls_of = {
        "attention": lambda q, c, o: portattn.attention(
            q, c, metadata, backend="triton_unified", validate=False),
        "attention_out": lambda q, c, o: portattn.attention(
            q, c, metadata, out=o, backend="triton_unified", validate=False),
        "plan_run": lambda q, c, o: plan.run(q, c),
        "plan_run_out": lambda q, c, o: plan.run(q, c, o),
        "jit_path": lambda q, c, o: launch_unified(q, c, metadata, options, o, params),
    }
    cells = {}
    for count in LAYERS:
        qs, caches = _layers(batch, count)
        layers = list(zip(qs, caches, [torch.empty_like(q) for q in qs]))
        steps = max(1, CALLS_PER_SAMPLE // count)
        for name, call in calls_of.items():
            cells[count, name] = (_loop(call, layers, steps), steps * count)
    result: dict = {"variant": plan.variant}
    launch_cells, unusable = _launch_cells(plan, batch)
    cells.update({("launch", name): cell for name, cell in launch_cells.items()})
    if unusable:
        result["cheap_launch_unusable"] = unusable
    return result, cells, plan


def fill_case(result: dict, timed: dict, plan) -> dict:
    """A case's result with its cells' ``(median, minimum)`` from :func:`time_cells`, and
    whether the plan's calls were relaunched (asked once they have run)."""
    slots = list(plan._accepted.values())
    result["replayed"] = bool(slots) and all(getattr(s, "sequence", None) is not None and
                                             getattr(s, "reason", None) is None
                                             for s in slots)
    result["fallback_reasons"] = sorted({s.reason for s in slots if getattr(s, "reason", None)})
    result["layers"], result["layers_min"] = {}, {}
    for (count, name), (median, minimum) in timed.items():
        if count != "launch":
            result["layers"].setdefault(count, {})[name] = median
            result["layers_min"].setdefault(count, {})[name] = minimum
    launch = {key[1]: value for key, value in timed.items() if key[0] == "launch"}
    result["triton_jit_us"] = launch["triton_jit"][0]
    result["cheap_launch_us"] = launch["cheap"][0] if "cheap" in launch else None
    # the host's speed taken out (module doc): one layer's eager call over one JIT launch
    one_layer = result["layers"][min(result["layers"])]["attention"]
    result["attention_per_jit_launch"] = round(one_layer / result["triton_jit_us"], 3)
    result["launch_min_us"] = {name: minimum for name, (_median, minimum) in launch.items()}
    return result


def _launch_cells(plan, batch) -> tuple[dict, str | None]:
    """One unified-kernel launch: Triton's JIT call and the recorded sequence's relaunch
    as cells (100 launches a sample), and why there is no relaunch, if there is none."""
    from portattn.backends.unified_runner import inputs_of
    from portattn.kernels import fast_launch, launch

    runner = plan._body.runner
    out = torch.empty_like(batch.q)
    ws = runner._workspace() if runner.workspace_size and runner.replay else None
    with fast_launch.capture() as captured:
        launch.launch_unified(batch.q, batch.cache, plan.metadata, runner.options, out,
                              plan.decision.plan.params, workspace=ws)
    first = captured.launches[0]
    jit = first.fn[first.grid]
    cells = {"triton_jit": (lambda: [jit(*first.args, **first.kwargs) for _ in range(100)],
                            100)}
    inputs = inputs_of(batch.q, batch.cache, plan.metadata, out, (None,) * 4, ws,
                       runner.quantized)
    try:
        sequence = fast_launch.LaunchSequence.build(
            fast_launch.Captured(captured.launches[:1], 1), inputs)
    except fast_launch.Unusable as exc:
        return cells, str(exc)
    assert sequence.launch(inputs)
    cells["cheap"] = (lambda: [sequence.launch(inputs) for _ in range(100)], 100)
    return cells, None


# --------------------------------------------------------------------------- CPU model


def _stub_kernels():
    """Replace launch.py's kernels by stand-ins: Triton's binder and cache key (so the
    recording, the checks against Triton and the keys are real), launchers doing
    nothing, every launch counted as Triton's launch hook would."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    from portattn.kernels import fast_launch, launch

    counted = [0]

    class Compiled:
        function = object()
        packed_metadata = (4, 1, 0)

        @staticmethod
        def run(*args):
            return None

    class Kernel:
        def __init__(self, interpreted):
            jit = JITFunction(interpreted.fn)
            self.signature, self.params = jit.signature, jit.params
            self.arg_names, self.debug = jit.arg_names, False
            self.pre_run_hooks, self.used_global_vals = [], {}
            binder = create_function_from_signature(self.signature, self.params,
                                                    BaseBackend)
            self.device_caches = {0: ({}, {}, None, BaseBackend, binder)}

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                counted[0] += 1
                fast_launch.jit_run_options(kwargs, self.debug)
                kernel_cache, key_cache, _, _, binder = self.device_caches[0]
                _, specialization, options = binder(*args, **kwargs)
                key = compute_cache_key(key_cache, specialization, options)
                return kernel_cache.setdefault(key, Compiled())
            return run

    for name in ("unified_attention_kernel", "merge_segments_kernel"):
        wrapped = getattr(launch, name)
        wrapped.fn = Kernel(wrapped.fn)

    def count_launches():
        start = counted[0]

        class Counter:
            @property
            def count(self):
                return counted[0] - start

            def stop(self):
                pass

        return Counter()

    fast_launch._count_launches = count_launches
    fast_launch._device_functions = lambda: (lambda: 0, lambda index: 0)
    # the float scales' device tensors are kept under that device and stream, as on a GPU
    from portattn.kernels import scalars

    scalars.cuda_index = scalars.stream_key = lambda device: 0

    from portattn.backends import unified_runner

    original = unified_runner.UnifiedRunner.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.replay = True
        self._capturing = lambda: False
        self._stream = lambda index: 0

    unified_runner.UnifiedRunner.__init__ = init


def measure_cases(device: str, dtype: torch.dtype) -> dict:
    """Every case's result; all their cells timed together (:func:`time_cells`), so a
    slow spell of the host spreads over every case rather than falling on one."""
    prepared = {case: prepare_case(case, device, dtype) for case in CASES}
    timed = time_cells({(case, *key): cell for case, (_result, cells, _plan) in prepared.items()
                        for key, cell in cells.items()})
    return {case: fill_case(result, {key[1:]: value for key, value in timed.items()
                                     if key[0] == case}, plan)
            for case, (result, _cells, plan) in prepared.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="1 and 2 layers, few calls: checks the paths run (times mean nothing)")
    args = parser.parse_args(argv)
    if args.quick:
        global LAYERS, CALLS_PER_SAMPLE, REPEATS
        LAYERS, CALLS_PER_SAMPLE, REPEATS = (1, 2), 4, 1
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float16
    if not gpu:
        _stub_kernels()
    planning.clear()
    import triton

    from portattn.kernels import launch_entries

    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu (stand-in kernels, "
                  "launcher does nothing: the Python outside the launch)",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "triton": triton.__version__,
        # what a relaunch calls on this Triton
        "relaunch_entry": ("stand-in launcher" if not gpu else "per-kernel C entry"
                           if launch_entries.c_launch_known() else "shared C entry"
                           if launch_entries.argument_layout() == "shared" else
                           "launcher object, as the JIT calls it"),
        "dtype": str(dtype).replace("torch.", ""),
        "heads": "32/8, head 128, block 16", "target_us": TARGET_US, "goal_us": GOAL_US,
        "timing": "each sample behind a GPU spin kernel (host time alone)" if gpu else
                  "stand-ins",
        "cases": measure_cases(device, dtype),
        "plan_caches": planning.cache_info(),
    }
    text = json.dumps(result)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    _table(result)
    return result


def _table(result: dict) -> None:
    names = ("attention", "attention_out", "plan_run", "plan_run_out", "jit_path")
    print(f"host us per call, median (min) -- {result['device']}, Triton "
          f"{result['triton']}, relaunch through the {result['relaunch_entry']}",
          file=sys.stderr)
    print(f"{'case':13} {'layers':>6} " + " ".join(f"{n:>15}" for n in names),
          file=sys.stderr)
    for case, data in result["cases"].items():
        for count, timings in data["layers"].items():
            low = data["layers_min"][count]
            cells = " ".join(f"{timings[n]:7.2f} ({low[n]:5.2f})" for n in names)
            print(f"{case:13} {count:>6} {cells}", file=sys.stderr)
        print(f"{'':14} launch: triton jit {data.get('triton_jit_us')} us, cheap "
              f"{data.get('cheap_launch_us')} us; attention / JIT launch "
              f"{data.get('attention_per_jit_launch')}; replayed={data['replayed']} "
              f"{data['fallback_reasons'] or ''}", file=sys.stderr)


if __name__ == "__main__":
    main()

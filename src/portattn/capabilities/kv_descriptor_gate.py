"""Functional gate of the unified kernel's descriptor (TMA) K/V loads.

The probe's toy descriptor kernel (:mod:`.descriptor_check`) says descriptors work in
a simple pipelined loop; our kernel is bigger (block-table lookups, masked tiles, quantized
caches, two head sizes), and a descriptor kernel that compiles in one shape may fail in
Triton's pipeliner in another. So the first time a descriptor *variant* is wanted on a
machine, :func:`check_variant` compiles and runs the unified kernel both ways (pointer and
descriptor loads) on a tiny problem of that variant and compares the outputs; the answer
(``{"ok", "reason"}``) is kept in memory and on disk, keyed by (device type, arch, driver,
Triton version, portattn version and a digest of the kernels' sources, variant), next to
the capabilities cache (``kv-descriptor-gate.json``), and forgotten with it
(``cache.clear_cache``, ``probe(refresh=True)``, ``portattn report --refresh``). A check
process that timed out or was killed by a signal says something about this moment (a busy
GPU, the OOM killer), not about the kernel: that answer is kept in memory only. Never at
import.

Variant key: ``kv_dtype`` (torch dtype name), ``quant`` (KVQuant mode), ``head_qk``,
``head_v``, ``block_size``, ``block_n`` (the descriptor tiles' lengths), ``fp8_dot``
(fp8 q times an fp8 per-tensor cache on fp8 tensor cores: the check then runs an fp8 q),
``kv_bits``, ``v_pairs``, and for a staged prefill (:mod:`portattn.kernels.stage`)
``staged``: q's dtype, the staged loop's tile and switches; the check then runs the staged launch
(staging kernel, then descriptor loads over the staged blocks, the cache's quant mode
carried as the launch carries it) against the unstaged pointer loads.

On a GPU the check runs in a child process (``python -m
portattn.capabilities.kv_descriptor_gate --device cuda:N --variant JSON``), as the probe's
checks do: a miscompiled kernel may fault the context or crash the compiler. Under the
Triton interpreter it runs in-process. :data:`RUNNER` is the function that runs one check
(tests replace it to inject compile failures and mismatches).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from portattn.capabilities._text import one_line
from portattn.capabilities.descriptor_check import (
    TIMED_OUT,
    child_env,
    failed_child_reason,
    is_transient,
)

CHILD_TIMEOUT_S = 300
CACHE_FORMAT = "portattn.kv-descriptor-gate/8"  # 4: the plan's v_pairs; 5: staged
#: variants; 6: staged variants name how the staged keys are read (kv_load.STAGED_KV_LOAD);
#: 7: and the staged launch's program order and loop (flat_grid, one_loop); 8: the
#: machine key names the portattn version and the kernels' source digest
#: Tiny problem of a check: two sequences, one decode and one short chunk.
QUERY_LENS = (1, 5)
SEQ_LENS = (37, 70)

_MEMORY: dict[str, dict] = {}


def staged_switches(staged: dict) -> dict:
    """The staged launch's switches a check runs as the plan has them (``flat_grid``,
    ``one_loop``: ``heuristics.staged_long_config``)."""
    return {name: bool(staged.get(name)) for name in ("flat_grid", "one_loop")}


def variant_key(*, kv_dtype: str, quant: str, head_qk: int, head_v: int, block_size: int,
                block_n: int, fp8_dot: bool = False, kv_bits: str | None = None,
                v_pairs: bool = False, staged: dict | None = None) -> dict:
    """A checked variant: the switches a plan's launch depends on (``kv_bits``: the plan's
    rebuild of 8-bit codes; ``v_pairs``: its 8-bit V read as int16 pairs; both depend on
    the GPU, so the check runs what the plan runs whatever the architecture; ``staged``:
    ``{"q_dtype", "block_m", "block_n", "num_warps", "num_stages"}`` of a staged prefill,
    whose ``block_n`` is then the variant's, and its ``flat_grid`` / ``one_loop``
    switches)."""
    key = {"kv_dtype": kv_dtype, "quant": quant, "head_qk": int(head_qk),
           "head_v": int(head_v), "block_size": int(block_size), "block_n": int(block_n),
           "fp8_dot": bool(fp8_dot), "kv_bits": kv_bits, "v_pairs": bool(v_pairs)}
    if staged is not None:
        from portattn.kernels.kv_load import STAGED_KV_LOAD

        checked = {name: staged[name] for name in
                   ("q_dtype", "block_m", "block_n", "num_warps", "num_stages")}
        checked["kv_load"] = STAGED_KV_LOAD  # how the staged launch reads its keys
        checked.update(staged_switches(staged))
        key["staged"] = checked
    return key


def machine_key(caps) -> dict:
    """What a gate answer depends on besides the variant: the machine, and the code the
    check ran (an answer about another release's kernel, or an edited checkout's, is not
    trusted: it is checked again)."""
    from portattn import __version__

    return {"device_type": caps.device_type, "arch": caps.arch,
            "driver": caps.driver_version, "triton": caps.triton_version,
            "interpreter": bool(caps.triton_interpreter), "portattn": __version__,
            "kernels": kernel_source_digest()}


@functools.cache
def kernel_source_digest() -> str:
    """A digest of the sources a check compiles and runs: the ``portattn.kernels``
    package (kernels, launchers, plans), the Triton backend's planning and runner
    (``backends/triton_*.py``, ``backends/unified_runner.py``) and this module. Read
    once per process, when a descriptor variant is first wanted; ``"unreadable"`` where
    the files cannot be read (the version in :func:`machine_key` then tells releases
    apart)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    try:
        backends = root / "backends"
        for path in [*sorted((root / "kernels").rglob("*.py")),
                     *sorted(backends.glob("triton_*.py")), backends / "unified_runner.py",
                     Path(__file__).resolve()]:
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    except OSError:
        return "unreadable"
    return digest.hexdigest()[:16]


def _text_key(machine: dict, variant: dict) -> str:
    return json.dumps({"machine": machine, "variant": variant}, sort_keys=True)


def cache_path() -> Path:
    from portattn.capabilities import cache

    return cache.cache_dir() / "kv-descriptor-gate.json"


#: The sidecar file :func:`_store_disk` locks (never deleted: a process may hold it).
LOCK_NAME = ".kv-descriptor-gate.lock"


def lock_path() -> Path:
    """The lock of :func:`cache_path`'s read-merge-write: a file of its own, since the
    cache file itself is replaced (``os.replace``) by every write."""
    return cache_path().with_name(LOCK_NAME)


def _disk_enabled() -> bool:
    from portattn.capabilities import cache

    return cache.disk_cache_enabled()


def _load_disk() -> dict[str, Any]:
    try:
        with open(cache_path(), encoding="utf-8") as fh:
            data = json.load(fh)
        if isinstance(data, dict) and data.get("format") == CACHE_FORMAT and \
                isinstance(data.get("results"), dict):
            return data["results"]
    except Exception:  # a bad cache file is a miss, never an error
        pass
    return {}


def _store_disk(key: str, result: dict) -> None:
    """Add one answer to the file (an unwritable cache only costs a re-check next
    process). Read, merge and rewrite under :func:`_disk_lock`: two processes checking
    different variants at once would otherwise each write what they read plus their own
    answer, and one answer would be lost."""
    from portattn.capabilities import cache

    try:
        path = cache_path()
    except Exception:  # no folder can be named (cache.cache_dir): memory only
        return
    with _disk_lock():
        results = _load_disk()
        results[key] = result
        cache.write_json_atomic(path, {"format": CACHE_FORMAT, "results": results})


@contextlib.contextmanager
def _disk_lock() -> Iterator[None]:
    """Hold an exclusive ``flock`` on :func:`lock_path` within the block (closing the file
    releases it, also when the process dies). Where ``fcntl`` is missing (Windows) or the
    lock cannot be taken (a filesystem without locks, an unwritable folder) the block runs
    unlocked: a lost answer only costs a re-check, never an error."""
    handle = _acquire_lock()
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def _acquire_lock() -> IO[str] | None:
    """The open, exclusively locked :func:`lock_path`, or None (no lock to be had)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        path = lock_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a", encoding="utf-8")
    except Exception:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except OSError:
        handle.close()
        return None
    return handle


def clear(*, disk: bool = False) -> None:
    """Forget every answer of this process, and with ``disk=True`` the file too (not its
    lock, which another process may hold). ``cache.clear_cache`` and a refreshed probe
    call it: the answers were checked on the machine state being forgotten."""
    _MEMORY.clear()
    if not disk:
        return
    try:
        path = cache_path()
        if not path.exists():  # nothing to forget (and no lock file made for it)
            return
        # under the lock: a writer between its read and its rewrite would put the
        # forgotten answers back
        with _disk_lock():
            path.unlink()
    except Exception:  # gone meanwhile, unwritable, or no folder can be named
        pass


def check_variant(caps, variant: dict, device: str) -> dict:
    """``{"ok", "reason", "origin"}`` for the descriptor variant on this machine: from
    memory, the disk cache, or by running :data:`RUNNER` (then recorded: its answer, a
    check process's exit with an error status included, in memory and on disk; an
    exception raised by the runner itself, or an answer whose check process timed out or
    was killed by a signal (``descriptor_check.is_transient``), in memory only)."""
    key = _text_key(machine_key(caps), variant)
    known = _MEMORY.get(key)  # one lookup: clear() may run in another thread
    if known is not None:
        return {**known, "origin": "memory"}
    if _disk_enabled():
        stored = _load_disk().get(key)
        if isinstance(stored, dict) and "ok" in stored:
            result = {"ok": bool(stored["ok"]), "reason": str(stored.get("reason", ""))}
            _MEMORY[key] = result
            return {**result, "origin": "disk-cache"}
    keep_on_disk = True
    try:
        raw = RUNNER(variant, device)
        reason = str(raw.get("reason", ""))
        result = {"ok": bool(raw.get("ok")), "reason": reason}
        keep_on_disk = not is_transient(reason)
    except Exception as exc:
        # the check could not be run (the child not started: out of memory, no such
        # executable...): a failure for this process, not an answer about the kernel
        # to keep for the next one
        result = {"ok": False, "reason": one_line(exc)}
        keep_on_disk = False
    _MEMORY[key] = result
    if keep_on_disk and _disk_enabled():
        _store_disk(key, result)
    return {**result, "origin": "checked"}


# --- the check itself -----------------------------------------------------------------

def _quant_for(key: str):
    """A KVQuant from its ``key`` (``mode`` or ``mode:e4m3fn``), with fixed scales."""
    import torch

    from portattn.types import KVQuant

    mode, _, fmt = key.partition(":")
    fp8 = torch.float8_e5m2 if fmt == "e5m2" else torch.float8_e4m3fn
    if mode in ("", "none"):
        return None
    if mode == "fp8_per_tensor":
        return KVQuant.fp8_per_tensor(0.02, 0.03, fp8)
    if mode == "fp8_per_token_head":
        return KVQuant.fp8_per_token_head(fp8)
    return KVQuant(mode)


def run_check(variant: dict, device: str) -> dict:
    """Run the unified kernel on a tiny problem of ``variant`` with pointer and with
    descriptor loads, in this process; ``{"ok", "reason"}``. Both outputs start NaN; the
    descriptor output must be finite where the pointer output is and match it."""
    import torch

    from portattn.backends.base import Plan
    from portattn.backends.triton_unified import TritonUnified
    from portattn.kernels import heuristics
    from portattn.kernels import kv_load as kv_load_rules
    from portattn.options import normalize_options
    from portattn.testing import make_paged_batch

    quant = _quant_for(variant["quant"])
    staged = variant.get("staged")
    if staged is not None:
        q_dtype = getattr(torch, staged["q_dtype"])
    else:
        q_dtype = torch.float16 if quant is not None else getattr(torch, variant["kv_dtype"])
    batch = make_paged_batch(QUERY_LENS, SEQ_LENS, num_q_heads=4, num_kv_heads=2,
                             head_size=variant["head_qk"], head_size_v=variant["head_v"],
                             block_size=variant["block_size"], dtype=q_dtype, device=device,
                             quant=quant, seed=0,
                             layout="diffkv" if variant["head_qk"] != variant["head_v"]
                             else "split")
    shape = heuristics.Shape(4, 2, variant["head_qk"], batch.cache.key_cache.element_size(),
                             8, 128, 2, 132, "sm90", variant["head_v"],
                             heuristics.quant_mode(variant["quant"]))
    block_n = variant["block_n"]
    cfg = heuristics.TileConfig(16, 8, block_n, 4, 2)
    fp8_dot = bool(variant.get("fp8_dot"))
    q = batch.q
    extra: dict[str, Any] = {}
    if fp8_dot:  # fp8 codes of q with a scale, as an fp8 serving stack passes them
        fp8 = batch.cache.key_cache.dtype
        q = (q.float() / 0.05).clamp(-448.0, 448.0).to(fp8)
        extra["q_scale"] = 0.05
    if staged is not None:  # the unstaged prefill with pointer loads as the reference
        pointer = heuristics.plan_launch(shape, mode="prefill", long=cfg)
        block_m = staged["block_m"]
        tile = heuristics.TileConfig(block_m, block_m // shape.group, staged["block_n"],
                                     staged["num_warps"], staged["num_stages"])
        # staged from the longer prompt's queries on: one staged sequence and one read
        # from the cache beside it, as a long prompt with short ones runs
        descriptor = {**pointer, "stage": heuristics.stage_config(shape,
                                                                 min_q=max(QUERY_LENS)),
                      "stage_long": dict(tile.as_dict(), **staged_switches(staged)),
                      "_kv_load_forced": True}
    else:
        pointer = heuristics.plan_launch(shape, mode="decode", short=cfg, fp8_dot=fp8_dot)
        for switch in ("kv_bits", "v_pairs"):  # the variant's, not the sm90 shape's
            pointer.pop(switch, None)
            if variant.get(switch):
                pointer[switch] = variant[switch]
        descriptor = {**kv_load_rules.descriptor_params(pointer, variant["block_size"]),
                      "_kv_load_forced": True}
    outs = []
    for params in (pointer, descriptor):
        out = torch.full((batch.q.shape[0], 4, variant["head_v"]), float("nan"),
                         dtype=q_dtype, device=device)
        options = normalize_options(q, batch.cache, out=out, **extra)
        plan = Plan("triton_unified", heuristics.variant_name(params), params)
        TritonUnified().run(q, batch.cache, batch.metadata, options, out, plan)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        outs.append(out.float().cpu())
    want, got = outs
    if not torch.isfinite(want).all():
        return {"ok": False, "reason": "the pointer variant left NaN rows (check broken)"}
    if not torch.isfinite(got).all():
        return {"ok": False, "reason": "descriptor loads left NaN/inf rows"}
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    if err > 1e-2:
        return {"ok": False, "reason": f"descriptor loads differ from pointer loads "
                                       f"(relative error {err:.3g})"}
    return {"ok": True, "reason": ""}


def run_check_isolated(variant: dict, device: str,
                       timeout: float = CHILD_TIMEOUT_S) -> dict:
    """:func:`run_check` in a child process on a GPU (in-process on CPU tensors, i.e.
    under the Triton interpreter); a crash or hang becomes a failed check (its reason says
    which: ``descriptor_check.failed_child_reason``)."""
    if not device.startswith("cuda"):
        try:
            return run_check(variant, device)
        except Exception as exc:  # the kernel's own failure under the interpreter: an
            return {"ok": False, "reason": one_line(exc)}  # answer, as a child's is
    cmd = [sys.executable, "-m", "portattn.capabilities.kv_descriptor_gate", "--device",
           device, "--variant", json.dumps(variant)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=child_env())
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"{TIMED_OUT} {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "ok" in record:
            return {"ok": bool(record["ok"]), "reason": str(record.get("reason", ""))}
    return {"ok": False, "reason": failed_child_reason(proc.returncode, proc.stderr)}


#: The function running one check (``variant``, ``device``) -> ``{"ok", "reason"}``.
RUNNER: Callable[[dict, str], dict] = run_check_isolated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--variant", required=True, help="the variant key as JSON")
    args = parser.parse_args(argv)
    try:
        if args.device.startswith("cuda"):  # Triton launches on the current device
            import torch

            torch.cuda.set_device(args.device)
        record = run_check(json.loads(args.variant), args.device)
    except Exception as exc:
        record = {"ok": False, "reason": one_line(exc)}
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

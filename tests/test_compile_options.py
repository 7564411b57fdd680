"""Every kernel launch states its compiler options (``kernels/compile_options.py``):
FP fusion on whatever Triton's default (3.9 warns when a launch leaves it unset; 3.10
turns it off). Each launcher runs here with its kernel replaced by a recorder that still
launches it (the interpreter drops options it does not know), so the calls are the real
ones and their results are checked as well."""

from __future__ import annotations

import warnings

import pytest
import torch

from portattn import KVQuant
from portattn.kernels.compile_options import compile_options
from portattn.testing import make_paged_batch

from unified_check import KernelCalls, check_unified

interp = pytest.mark.interpreter
F16 = torch.float16


@pytest.fixture(autouse=True)
def triton_default_fusion(monkeypatch):
    """Neither fusion variable set, as on a machine nobody tuned."""
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    monkeypatch.delenv("TRITON_FORCE_DISABLE_FP_FUSION", raising=False)


def _fused(calls: KernelCalls) -> list:
    """The ``enable_fp_fusion`` option of each recorded launch (missing: None)."""
    assert calls.kwargs, "the launcher did not launch this kernel"
    return [kw.get("enable_fp_fusion") for kw in calls.kwargs]


def _spy(monkeypatch, module, name: str) -> KernelCalls:
    spy = KernelCalls(getattr(module, name))
    monkeypatch.setattr(module, name, spy)
    return spy


@interp
def test_attention_and_merge_launches_ask_for_fp_fusion(monkeypatch):
    from portattn.kernels import launch

    attention = _spy(monkeypatch, launch, "unified_attention_kernel")
    merge = _spy(monkeypatch, launch, "merge_segments_kernel")
    # a split decode merged by the merge kernel, then a prefill (the long launch)
    check_unified([1, 1], [40, 23], group=2, segments=4, merge_in_kernel=False)
    check_unified([9, 4], [30, 4], group=2, mode="prefill")
    assert _fused(attention) == [True] * len(attention.kwargs)
    assert {kw["SEQ_MODE"] for kw in attention.kwargs} >= {0, 1}  # both launch shapes
    assert _fused(merge) == [True] * len(merge.kwargs)


@interp
def test_the_staging_launch_asks_for_fp_fusion(monkeypatch):
    from portattn.kernels import stage_launch

    stage = _spy(monkeypatch, stage_launch, "stage_kv_kernel")
    check_unified([13, 6], [41, 6], group=2, mode="prefill", stage=32,
                  quant=KVQuant.fp8_per_tensor(0.02, 0.03))
    assert _fused(stage) == [True] * len(stage.kwargs)


@interp
def test_the_cache_write_asks_for_fp_fusion(monkeypatch):
    from portattn.kernels import write_launch

    write = _spy(monkeypatch, write_launch, "cache_write_kernel")
    batch = make_paged_batch([1], [20], num_kv_heads=2, head_size=32, dtype=F16,
                             quant=KVQuant.int8_per_token_head())
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(3, 2, 32, generator=gen).to(F16)
    value = torch.randn(3, 2, 32, generator=gen).to(F16)
    slots = torch.tensor([5, -1, 17], dtype=torch.int64)
    cache = batch.cache
    write_launch.launch_cache_write(cache, key, value, slots)
    assert _fused(write) == [True]
    # and it wrote: slot 17's codes times its scale give the key back at int8 precision
    block, offset = divmod(17, cache.block_size)
    codes = cache.key_cache[block, offset].double()
    scales = cache.k_scale_cache[block, offset].double()  # per (slot, kv head)
    back = codes * scales[:, None]
    assert torch.allclose(back, key[2].double(), atol=float(scales.max()) * 0.51)


@interp
def test_the_probes_check_kernels_ask_for_fp_fusion(monkeypatch):
    from portattn.capabilities import descriptor_check

    built = descriptor_check._build_kernels
    spies = []

    def spied():
        kernels = [KernelCalls(k) for k in built()]
        spies.extend(kernels)
        return tuple(kernels)

    monkeypatch.setattr(descriptor_check, "_build_kernels", spied)
    descriptor_check._run_one("pointer", "cpu")  # raises if its result is wrong
    assert _fused(spies[0]) == [True]


def test_the_gluon_launch_asks_for_fp_fusion(monkeypatch):
    """The Gluon prefill cannot run here: its launch is recorded, not run."""
    pytest.importorskip("triton.experimental.gluon")
    from portattn.kernels import gluon_launch
    from portattn.options import normalize_options

    class Recorder:
        def __init__(self):
            self.kwargs = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.kwargs.append(kwargs)

    recorder = Recorder()
    monkeypatch.setattr(gluon_launch, "_kernel", lambda: recorder)
    batch = make_paged_batch([20], [40], num_q_heads=2, num_kv_heads=1, head_size=128,
                             dtype=torch.bfloat16)
    out = torch.empty_like(batch.q)
    gluon_launch.launch_gluon_prefill(batch.q, batch.cache, batch.metadata,
                                      normalize_options(batch.q, batch.cache), out, min_q=1)
    assert [kw.get("enable_fp_fusion") for kw in recorder.kwargs] == [True]


@interp
def test_triton_takes_the_options_with_fusion_on_and_no_warning(monkeypatch):
    """Triton's own parsing of launch options (its NVIDIA backend; no GPU needed): our
    options give fusion on, without the warning Triton 3.9 gives at each launch that
    leaves it unset; a ``TRITON_DEFAULT_FP_FUSION`` the user set is left to Triton."""
    compiler = pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.compiler import GPUTarget

    backend = compiler.CUDABackend(GPUTarget("cuda", 90, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = backend.parse_options(dict(compile_options(), num_warps=4))
    assert options.enable_fp_fusion is True
    assert not [w for w in caught if "FP_FUSION" in str(w.message)]
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")  # the user's choice
    assert dict(compile_options()) == {}
    assert backend.parse_options(dict(compile_options(), num_warps=4)).enable_fp_fusion \
        is False


@interp
def test_a_changed_fusion_setting_plans_again(monkeypatch):
    """The options are compiled into the kernels a plan's fast relaunch keeps: a change of
    ``TRITON_DEFAULT_FP_FUSION`` is a decision setting, so calls plan again (a new body
    and runner) instead of relaunching kernels compiled with the old options."""
    from portattn import attention, planning

    batch = make_paged_batch([1, 1], [20, 9], num_kv_heads=2, head_size=32, dtype=F16)
    planning.clear()
    made = planning.stats["bodies"]
    for _ in range(2):
        attention(batch.q, batch.cache, batch.metadata, validate=False)
    assert planning.stats["bodies"] == made + 1
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    attention(batch.q, batch.cache, batch.metadata, validate=False)
    assert planning.stats["bodies"] == made + 2
    planning.clear()

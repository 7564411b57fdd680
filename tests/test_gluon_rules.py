"""Where the Gluon prefill (``kernels/gluon_prefill.py``) serves a plan, on the CPU: the
problem and tensor rules, the plan's choice and ``PORTATTN_GLUON``, and the launch's
fallback to staging (tensors it cannot read; a launch that raised). The kernel itself
runs on Hopper only: tests/gpu/test_gluon_prefill_gpu.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from indexing import take
from portattn import InputError, PagedKVCache
from portattn.backends import gluon_rules
from portattn.backends.triton_unified import TritonUnified
from portattn.capabilities.profiles import simulated
from portattn.dispatch.problem import Problem
from portattn.errors import UnsupportedError
from portattn.kernels import gluon_launch
from portattn.testing import make_paged_batch

BF16 = torch.bfloat16
GOOD = dict(arch="sm90", q_dtype=BF16, kv_dtype=BF16, out_dtype=BF16, kv_quant="none",
            head_size_qk=128, head_size_v=128, block_size=16, sliding_window=False,
            softcap=False, alibi="none", sinks=False)


def test_the_measured_class_has_no_reason():
    assert gluon_launch.problem_reasons(**GOOD) == []
    assert gluon_launch.problem_reasons(**{**GOOD, "q_dtype": torch.float16,
                                           "kv_dtype": torch.float16,
                                           "out_dtype": torch.float16}) == []
    for head in (64, 256, 96, 80, 192):  # 96 / 80 / 192: padded with zeros to 128 / 256
        assert gluon_launch.problem_reasons(**{**GOOD, "head_size_qk": head,
                                               "head_size_v": head}) == []


@pytest.mark.parametrize("head,width", [(64, 64), (32, 64), (80, 128), (96, 128),
                                        (128, 128), (136, 256), (192, 256), (256, 256),
                                        (264, None), (512, None)])
def test_a_head_runs_in_the_narrowest_tile_that_holds_it(head, width):
    assert gluon_launch.tile_width(head) == width


@pytest.mark.parametrize("release, early", [
    ("3.5.1", False), ("3.6.0", False), ("3.6+git1", False), ("3.7.1", False),
    ("3.8.0", True), ("3.9.0rc1", True), ("3.10.2", True), ("4.0.0+git1234", True),
    ("unknown", True)])
def test_the_consumers_cast_p_early_from_triton_3_8(monkeypatch, release, early):
    """P is cast right after each softmax where Triton 3.8's late cast spilled inside the
    key-tile loop (3.8 on), at the PV MMA before (a mixed batch measured 3.5% faster on
    3.6), and as on the newest releases where the version cannot be read."""
    import triton

    monkeypatch.setattr(triton, "__version__", release)
    gluon_launch.casts_p_early.cache_clear()
    try:
        assert gluon_launch.casts_p_early() is early
        shape = dict(num_q_heads=32, num_kv_heads=8, kv_head_stride=128, head_size=128,
                     block_size=16, causal=True, sliding_window=False, kv_scaled=False,
                     softcap=0, alibi=0, sinks=False, long_tiles=False)
        assert gluon_launch.kernel_switches(**shape)["P_EARLY"] is early
        # the offline compile's other setting
        assert gluon_launch.kernel_switches(**shape, p_early=not early)["P_EARLY"] is not early
    finally:
        gluon_launch.casts_p_early.cache_clear()


@pytest.mark.parametrize("change,words", [
    (dict(arch="sm100"), "sm100 is not sm90"),
    (dict(arch="sm80"), "sm80 is not sm90"),
    (dict(q_dtype=torch.float32, kv_dtype=torch.float32, out_dtype=torch.float32),
     "not float16 / bfloat16"),
    (dict(kv_dtype=torch.float16), "the cache is not q's dtype"),
    (dict(kv_quant="int8_per_token_head", kv_dtype=torch.int8, q_dtype=torch.float16,
          out_dtype=torch.float16), "with an fp16 q"),
    (dict(out_dtype=torch.float16), "output dtype"),
    (dict(head_size_qk=192, head_size_v=128), "head sizes 192/128"),
    (dict(head_size_qk=100, head_size_v=100), "head sizes 100/100"),
    (dict(head_size_qk=320, head_size_v=320), "head sizes 320/320"),
    (dict(block_size=128), "block size 128"),
    (dict(block_size=8), "block size 8"),
])
def test_each_unmeasured_or_unsupported_class_names_its_reason(change, words):
    reasons = gluon_launch.problem_reasons(**{**GOOD, **change})
    assert len(reasons) == 1 and words in reasons[0], reasons


def test_unmeasured_classes_are_named():
    assert gluon_launch.unmeasured_reasons(head_size_qk=128, block_size=16) == []
    assert gluon_launch.unmeasured_reasons(head_size_qk=256, block_size=16) == []
    why = gluon_launch.unmeasured_reasons(head_size_qk=64, block_size=32)
    assert len(why) == 2 and "head size 64" in why[0] and "block size 32" in why[1]
    # head 256 reads 64-key tiles: a 128-slot block cannot be whole boxes of one tile
    why = gluon_launch.problem_reasons(**{**GOOD, "head_size_qk": 256, "head_size_v": 256,
                                          "block_size": 64})
    assert why == []
    assert gluon_launch.problem_reasons(**{**GOOD, "block_size": 32}) == []


@pytest.mark.parametrize("quant,kv_dtype,q_dtype", [
    ("fp8_per_tensor:e4m3fn", torch.float8_e4m3fn, BF16),
    ("fp8_per_tensor:e5m2", torch.float8_e5m2, torch.float16),
    ("int8_per_token_head", torch.int8, BF16),
    ("fp8_per_token_head:e4m3fn", torch.float8_e4m3fn, BF16),
])
def test_8bit_caches_are_served_through_the_staged_copy(quant, kv_dtype, q_dtype):
    """8-bit caches reach the kernel staged (widened to q's dtype): any cache block
    size, every feature as for 16-bit caches."""
    kw = {**GOOD, "kv_quant": quant, "kv_dtype": kv_dtype, "q_dtype": q_dtype,
          "out_dtype": q_dtype}
    assert gluon_launch.reads_staged_copy(quant)
    for block_size in (16, 32, 256):
        assert gluon_launch.problem_reasons(**{**kw, "block_size": block_size}) == []
        assert gluon_launch.unmeasured_reasons(head_size_qk=128, block_size=block_size,
                                               kv_quant=quant) == []
    assert gluon_launch.problem_reasons(**{**kw, "softcap": True, "alibi": "sqrt",
                                           "sinks": True, "sliding_window": True}) == []
    assert not gluon_launch.reads_staged_copy("none")


def test_every_score_feature_is_served():
    assert gluon_launch.problem_reasons(**{**GOOD, "softcap": True, "alibi": "linear",
                                           "sinks": True, "sliding_window": True}) == []


def test_tensor_rules():
    batch = make_paged_batch([40], [40], num_q_heads=4, num_kv_heads=2, head_size=64,
                             dtype=BF16)
    why = gluon_launch.tensor_reasons(batch.q, batch.cache, torch.empty_like(batch.q))
    assert why == ["not a CUDA tensor (the Gluon kernel runs on the GPU only)"]
    packed = make_paged_batch([40], [40], num_q_heads=4, num_kv_heads=2, head_size=64,
                              dtype=BF16, layout="packed")
    why = gluon_launch.tensor_reasons(packed.q, packed.cache, torch.empty_like(packed.q))
    assert any("key_cache's block stride" in r for r in why), why
    assert any("value_cache's block stride" in r for r in why), why
    q = torch.randn(40, 64, 4, dtype=BF16).transpose(1, 2)  # heads not contiguous rows
    why = gluon_launch.tensor_reasons(q, batch.cache, torch.empty(40, 4, 64, dtype=BF16))
    assert any("q's heads are not contiguous" in r for r in why), why
    # a head stride wider than the head (the first half of each 128-wide head): accepted,
    # the kernel's column of kv head h is h x the head stride
    kc = torch.zeros(4, 16, 2, 128, dtype=BF16)[..., :64]
    vc = torch.zeros(4, 16, 2, 128, dtype=BF16)[..., :64]
    wide = PagedKVCache(kc, vc)
    why = gluon_launch.tensor_reasons(batch.q, wide, torch.empty_like(batch.q))
    assert why == ["not a CUDA tensor (the Gluon kernel runs on the GPU only)"], why
    # a padded head (96) reads through a rank-3 descriptor: its head stride is a TMA
    # stride and must be 16-byte aligned (100 x 2 bytes is not); 104 x 2 is
    for stride, bad in ((100, True), (104, False)):
        kc, vc = (torch.zeros(4, 16, 2, stride, dtype=BF16)[..., :96] for _ in range(2))
        q96 = torch.randn(40, 4, 96, dtype=BF16)
        why = gluon_launch.tensor_reasons(q96, PagedKVCache(kc, vc), torch.empty_like(q96))
        assert any("head stride is not 16-byte aligned" in r for r in why) == bad, why


def _problem(**kw):
    base = dict(num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                dtype="bfloat16", query_len=4096, seq_len=4096)
    return Problem.make(**{**base, **kw})


def _plan(problem, profile="sm90"):
    return TritonUnified().plan(problem, simulated(profile))


def test_a_long_prefill_on_sm90_plans_the_gluon_kernel():
    plan = _plan(_problem())
    assert plan.params.get("stage"), plan.params  # the staged plan it takes over
    assert plan.params["gluon"] == {"min_q": plan.params["stage"]["min_q"], "reads": "cache"}
    assert plan.variant.endswith("-gluon") and "staged" not in plan.variant
    assert "measured faster" in plan.params["gluon_reason"]


@pytest.mark.parametrize("kw", [dict(kv_quant="fp8_per_tensor:e4m3fn"),
                                dict(kv_quant="int8_per_token_head"),
                                dict(kv_quant="fp8_per_tensor:e5m2", dtype="float16")])
def test_an_8bit_prefill_plans_the_kernel_over_the_staged_copy(kw):
    from portattn.kernels import launch

    plan = _plan(_problem(**kw))
    assert plan.params["stage"] and plan.params["gluon"]["reads"] == "staged"
    assert plan.variant.endswith("-staged-gluon")
    assert "staged 16-bit copy" in plan.params["gluon_reason"]
    # the staged copy is sized per call, as for the unified kernel over it
    sizing = (1, 32, 8, 128, 128, "per_token" in kw["kv_quant"], BF16)
    assert launch.plan_workspace_size(*sizing, plan.params, num_tokens=4096) > 4096 * 8 * 128


def test_score_features_plan_the_kernel_where_measured_faster(monkeypatch):
    plan = _plan(_problem(softcap=True, alibi="sqrt", sinks=True))
    assert plan.params["gluon"]["reads"] == "cache"
    for kv_quant in ("none", "fp8_per_tensor:e4m3fn"):
        plan = _plan(_problem(sliding_window=True, kv_quant=kv_quant))
        assert "gluon" not in plan.params and plan.variant.endswith("-staged")
        assert "sliding window: measured slower" in plan.params["gluon_reason"]
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    assert _plan(_problem(sliding_window=True)).params["gluon"]["reads"] == "cache"


@pytest.mark.parametrize("kw,words", [
    (dict(out_dtype="float16"), "output dtype"),
    (dict(kv_quant="int8_per_token_head", dtype="float16"), "with an fp16 q"),
])
def test_other_classes_stay_staged_with_the_reason(kw, words):
    plan = _plan(_problem(**kw))
    assert "gluon" not in plan.params and words in plan.params["gluon_reason"]


def test_head_64_is_staged_in_auto_and_served_when_forced(monkeypatch):
    plan = _plan(_problem(head_size=64))
    assert "gluon" not in plan.params and plan.variant.endswith("-staged")
    assert "measured faster than staging at 96/128/192/256" in plan.params["gluon_reason"]
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    plan = _plan(_problem(head_size=64))
    assert plan.params["gluon"] and plan.variant.endswith("-gluon")


@pytest.mark.parametrize("head", [96, 192])
def test_heads_96_and_192_run_the_kernel_padded_in_auto(head):
    """Measured on the H200 (session 17): staging beats the cache read in the loop at these
    heads, and the kernel, padded to 128 / 256, beats staging."""
    plan = _plan(_problem(head_size=head))
    assert plan.params["gluon"]["reads"] == "cache" and plan.variant.endswith("-gluon")


def test_an_unmeasured_padded_head_reads_the_cache_in_auto_and_forced(monkeypatch):
    """Head 80: the kernel serves it (padded to 128, GPU-tested) but no plan stages it
    (staging not measured there), so it has no part to take, forced or not."""
    plan = _plan(_problem(head_size=80))
    assert "gluon" not in plan.params and "stage" not in plan.params
    assert "STAGED_PREFERRED" in plan.params["stage_reason"]
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    plan = _plan(_problem(head_size=80))
    assert "gluon" not in plan.params and "does not stage" in plan.params["gluon_reason"]


def test_forcing_takes_no_plan_that_does_not_stage(monkeypatch):
    """Plans take the kernel in place of staging: at block 32 nothing is staged on sm90
    (not measured), so even forced the plan reads the cache, with the reason."""
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    plan = _plan(_problem(block_size=32))
    assert "gluon" not in plan.params and "does not stage" in plan.params["gluon_reason"]
    assert "forces it" in _plan(_problem(head_size=64)).params["gluon_reason"]


def test_short_prefills_and_other_archs_have_no_part_for_it():
    plan = _plan(_problem(query_len=64, seq_len=4096))
    assert "gluon" not in plan.params and "does not stage" in plan.params["gluon_reason"]
    plan = _plan(_problem(), "sm100")
    assert "gluon" not in plan.params


def test_the_setting(monkeypatch):
    monkeypatch.setenv("PORTATTN_GLUON", "0")
    plan = _plan(_problem())
    assert "gluon" not in plan.params and plan.variant.endswith("-staged")
    assert plan.params["gluon_reason"] == "PORTATTN_GLUON=0 forbids it"
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    assert _plan(_problem()).params["_gluon_forced"] is True
    with pytest.raises(UnsupportedError, match="with an fp16 q"):
        _plan(_problem(kv_quant="int8_per_token_head", dtype="float16"))
    monkeypatch.setenv("PORTATTN_GLUON", "maybe")
    with pytest.raises(InputError, match="PORTATTN_GLUON"):
        _plan(_problem())


def test_a_triton_without_gluon_is_a_reason_on_a_probed_device(monkeypatch):
    monkeypatch.setattr(gluon_launch, "gluon_reason", lambda: "this Triton has no Gluon")
    caps = dataclasses.replace(simulated("sm90"), profile=None)  # looks probed
    params = gluon_rules.choose_gluon_prefill(_problem(), caps,
                                              {"mode": "prefill", "stage": {"min_q": 512}})
    assert "gluon" not in params and "no Gluon" in params["gluon_reason"]


def test_a_gluon_with_the_older_warp_specialize_is_a_reason():
    """Triton 3.5's form (default and worker partitions apart) cannot take the kernel; 3.6's
    can, and a form neither (a renamed parameter) is left to the launch to tell."""
    def older(default_args, default_partition, worker_args, worker_partitions,
              worker_num_warps, worker_num_regs, _semantic=None, _generator=None):
        pass

    def current(functions_and_args, worker_num_warps, worker_num_regs=None, _semantic=None,
                _generator=None):
        pass

    def renamed(partitions, worker_num_warps, _semantic=None):
        pass

    assert "older form" in gluon_launch.warp_specialize_reason(older)
    assert gluon_launch.warp_specialize_reason(current) is None
    assert gluon_launch.warp_specialize_reason(renamed) is None


def test_this_tritons_gluon_takes_the_kernel_from_3_6_on():
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
        pytest.skip(f"Triton {triton.__version__}: the older warp_specialize form")
    gl = pytest.importorskip("triton.experimental.gluon.language")
    assert gluon_launch.warp_specialize_reason(gl.warp_specialize) is None


# ---------------------------------------------------------------- the launch's fallbacks

def _staged_call(monkeypatch, forced=False, quant=None):
    """A small staged prefill planned with the Gluon kernel (over the cache; over the
    staged copy with an 8-bit ``quant``): returns a runner of ``launch_unified`` and the
    counts of Gluon launches and staging launches."""
    from portattn.kernels import launch
    from portattn.kernels.heuristics import TileConfig
    from portattn.options import normalize_options

    batch = make_paged_batch([20, 9], [60, 30], num_q_heads=4, num_kv_heads=2,
                             head_size=32, block_size=16, dtype=torch.float16, seed=3,
                             quant=quant)
    options = normalize_options(batch.q, batch.cache)
    long = TileConfig(block_m=32, block_q=16, block_n=16, num_warps=4, num_stages=2).as_dict()
    params = {"mode": "prefill", "long": long,
              "stage": {"block": 32, "sblocks": 2, "min_q": 10}, "stage_long": long,
              "stage_kv_load": "staged", "_kv_load_forced": True,
              "gluon": {"min_q": 10, "reads": "cache" if quant is None else "staged"},
              "_gluon_forced": forced}
    counts = {"gluon": 0, "stage": 0}
    original = launch.stage_kv
    monkeypatch.setattr(launch, "stage_kv", lambda *a: (counts.__setitem__(
        "stage", counts["stage"] + 1), original(*a))[1])

    def run():
        out = torch.full_like(batch.q, float("nan"))
        launch.launch_unified(batch.q, batch.cache, batch.metadata, options, out, params)
        return out
    return batch, options, run, counts


@pytest.mark.interpreter
def test_tensors_it_cannot_read_are_staged_or_refused_when_forced(monkeypatch):
    from portattn.testing import dense_attention, relative_error

    batch, options, run, counts = _staged_call(monkeypatch)
    out = run()  # CPU tensors: not for the Gluon kernel, staged instead
    expected = dense_attention(batch.q.double(), batch.keys, batch.values, batch.query_lens,
                               scale=options.scale)
    assert counts["stage"] == 1 and relative_error(out.double(), expected) < 3e-3
    batch, options, run, counts = _staged_call(monkeypatch, forced=True)
    with pytest.raises(InputError, match="not a CUDA tensor"):
        run()
    assert counts["stage"] == 0


@pytest.mark.interpreter
def test_a_gluon_launch_that_raises_is_staged_and_remembered(monkeypatch, caplog):
    from portattn.kernels import launch
    from portattn.testing import dense_attention, relative_error

    monkeypatch.setattr(launch, "GLUON_FAILED", {})
    monkeypatch.setattr(gluon_launch, "tensor_reasons", lambda *a: [])
    tries = []

    def broken(*args):
        tries.append(1)
        raise RuntimeError("PassManager::run failed (injected)")
    monkeypatch.setattr(gluon_launch, "launch_gluon_prefill", broken)
    from portattn import planning
    from portattn.dispatch.selector import decide, decision_cache

    forgotten = []
    monkeypatch.setattr(planning, "forget_plans", lambda: forgotten.append(1))
    decide(_problem(), simulated("sm90"))
    assert len(decision_cache) > 0
    batch, options, run, counts = _staged_call(monkeypatch)
    with caplog.at_level("WARNING", logger="portattn"):
        out = run()
    expected = dense_attention(batch.q.double(), batch.keys, batch.values, batch.query_lens,
                               scale=options.scale)
    assert relative_error(out.double(), expected) < 3e-3
    assert tries == [1] and counts["stage"] == 1
    assert forgotten == [1] and len(decision_cache) == 0  # decided and planned again
    assert "Gluon prefill failed" in caplog.text and len(launch.GLUON_FAILED) == 1
    # plans made from now on say so (and FA4's lead, where it yielded, applies again)
    (key,) = launch.GLUON_FAILED
    failed = _problem(dtype="float16", head_size=32, num_q_heads=4, num_kv_heads=2)
    assert launch.gluon_class_key(torch.float16, 32, 16, True, "cache", False, False,
                                  "none", False, "none") == key
    assert "injected" in gluon_rules.gluon_failure(failed, "cache")
    assert gluon_rules.gluon_failure(failed, "staged") is None
    assert "gluon" in _plan(_problem()).params  # another class keeps the kernel
    head128 = launch.gluon_class_key(BF16, 128, 16, True, "cache", False, False, "none",
                                     False, "none")
    launch.GLUON_FAILED[head128] = "RuntimeError: injected at head 128"
    plan = _plan(_problem())
    assert "gluon" not in plan.params and "injected at head 128" in plan.params["gluon_reason"]
    monkeypatch.setenv("PORTATTN_GLUON", "1")  # forced: tried again (and raised if it fails)
    assert _plan(_problem()).params["gluon"]
    monkeypatch.delenv("PORTATTN_GLUON")
    run()  # remembered: staged without trying again
    assert tries == [1] and counts["stage"] == 2
    batch, options, run, counts = _staged_call(monkeypatch, forced=True)
    with pytest.raises(RuntimeError, match="injected"):
        run()


def test_a_gluon_plan_sizes_no_staging_workspace():
    """Its long sequences read the cache: only the split partials are sized per call (a
    refused launch stages into a workspace of its own)."""
    from portattn.kernels import launch

    plan = _plan(_problem(query_len=8192, seq_len=8192))
    sizing = (1, 32, 8, 128, 128, False, BF16)
    staged = {k: v for k, v in plan.params.items() if k != "gluon"}
    with_gluon = launch.plan_workspace_size(*sizing, plan.params, num_tokens=8192)
    without = launch.plan_workspace_size(*sizing, staged, num_tokens=8192)
    assert with_gluon == launch.plan_workspace_size(*sizing, plan.params, num_tokens=0)
    assert without > with_gluon + 8192 * 8 * 128  # the staged K and V of 8192 keys


@pytest.mark.interpreter
def test_an_8bit_cache_stages_then_the_kernel_reads_the_staged_copy(monkeypatch, caplog):
    """The launch stages first, then hands the kernel the staged copy (blocks of the
    plan's staged size, in q's dtype) and the table pointing into it, with the long
    sequences' query count; the unified kernel over the staged copy does not run then (the stand-in
    writes nothing: the long sequence's rows stay NaN, the short one's are computed). A
    launch that raises falls back to the unified kernel over the staged copy, remembered
    under the staged class."""
    from portattn import KVQuant
    from portattn.kernels import launch
    from portattn.kernels.stage_launch import StagedCache
    from portattn.testing import dense_attention, relative_error

    monkeypatch.setattr(launch, "GLUON_FAILED", {})
    monkeypatch.setattr(gluon_launch, "tensor_reasons", lambda *a: [])
    seen = []

    def record(q, cache, metadata, options, out, min_q):
        seen.append((type(cache), cache.block_size, cache.dtype, min_q,
                     tuple(metadata.block_table.shape)))
    monkeypatch.setattr(gluon_launch, "launch_gluon_prefill", record)
    quant = KVQuant.fp8_per_tensor(0.02, 0.03)
    batch, options, run, counts = _staged_call(monkeypatch, quant=quant)
    out = run()
    assert counts["stage"] == 1
    assert seen == [(StagedCache, 32, torch.float16, 10, (2, 2))]
    assert torch.isnan(out[:20]).all() and torch.isfinite(out[20:]).all()

    def broken(*args):
        raise RuntimeError("PassManager::run failed (injected)")
    monkeypatch.setattr(gluon_launch, "launch_gluon_prefill", broken)
    with caplog.at_level("WARNING", logger="portattn"):
        out = run()
    keys = [k.double() * 0.02 for k in _fp8_values(batch, "k")]
    values = [v.double() * 0.03 for v in _fp8_values(batch, "v")]
    expected = dense_attention(batch.q.double(), keys, values, batch.query_lens,
                               scale=options.scale)
    assert relative_error(out.double(), expected) < 3e-3
    assert [key[4] for key in launch.GLUON_FAILED] == ["staged"]
    # remembered under the call's class (its cache's block size 16 and fp8 quant, not the
    # staged copy's 32 and none), the one plans look up
    failed = _problem(dtype="float16", head_size=32, num_q_heads=4, num_kv_heads=2,
                      kv_quant="fp8_per_tensor")
    assert "injected" in gluon_rules.gluon_failure(failed, "staged")


def _fp8_values(batch, which):
    """The codes of each sequence's keys, read through the block table by the test."""
    cache = batch.cache.key_cache if which == "k" else batch.cache.value_cache
    rows = []
    for b, n in enumerate(batch.seq_lens):
        blocks = batch.metadata.block_table[b, :(n + 15) // 16].long()
        rows.append(take(cache, blocks).float().reshape(-1, *cache.shape[2:])[:n])
    return rows


@pytest.mark.parametrize("num_tokens,num_seqs,hint,floor", [
    (8192, 4, 2048, 2048),      # 4 x 2048: every sequence at the hint
    (8192, 8, 1024, 1024),
    (2111, 64, 2048, 0),        # 2048 + 63 decodes: some may be decodes
    (2008, 3, 700, 608),        # an understated hint still gives a floor
    (8192, 1, 8192, 8192),
    (8192, 4, None, 0),         # no hint: nothing is known
    (10, 0, 5, 0),
])
def test_fewest_queries_is_a_floor_from_host_numbers(num_tokens, num_seqs, hint, floor):
    from portattn.kernels.heuristics import fewest_queries

    assert fewest_queries(num_tokens, num_seqs, hint) == floor


@pytest.mark.parametrize("query_lens,hint,mode,one_launch", [
    ([2048] * 4, 2048, "mixed", True),
    ([1024] * 8, 1024, "mixed", True),
    ([8192], 8192, "prefill", True),
    ([2048] * 4, None, "mixed", False),        # without the hint: the launches beside it
    ([2048] + [1] * 63, 2048, "mixed", False),  # decodes beside the long prompt
    ([1000, 1000, 8], 700, "prefill", True),   # understated: the kernel takes all three
    ([600, 600, 100], 600, "prefill", False),  # a middle-sized prompt may be there
])
def test_a_batch_with_no_short_sequence_is_one_gluon_launch(query_lens, hint, mode,
                                                            one_launch, monkeypatch):
    """Where the call's tokens and ``max_seqlen_q`` leave no sequence fewer queries than
    the kernel's share, the kernel takes every sequence (``min_q`` 1: whatever
    ``cu_seqlens_q`` says, so an understated hint leaves no row unwritten) and nothing is
    launched over the cache beside it; otherwise the kernel takes the long sequences and
    the short and middle ones read the cache as before."""
    import types

    from portattn.kernels import launch

    taken, beside = [], []
    monkeypatch.setattr(launch, "_try_gluon",
                        lambda q, cache, md, options, out, params, min_q, reads:
                        taken.append((min_q, reads)) or True)
    monkeypatch.setattr(launch, "_launch_over_cache",
                        lambda *a: beside.append(a[-2:]))
    q = torch.empty(sum(query_lens), 1, 8)
    metadata = types.SimpleNamespace(seq_lens=torch.empty(len(query_lens)),
                                     max_seqlen_q=hint)
    params = {"mode": mode, "short": {"block_q": 4}, "gluon": {"min_q": 512, "reads": "cache"}}
    assert launch._launch_gluon(q, None, metadata, None, None, params, None)
    short_q = 4 if mode == "mixed" else 0
    if one_launch:
        assert taken == [(1, "cache")] and beside == []
    else:
        assert taken == [(512, "cache")] and beside == [(short_q, 512)]


def test_the_grid_covers_every_long_tile_and_numbers_the_long_ones_only():
    """``grid_tiles``: a launch over every sequence holds each one's 128-query tiles as the
    kernel numbers them (from ``cu_seqlens_q[b] // 128 + b``); one that skips the
    sequences of fewer than ``min_q`` queries holds at least the long sequences' tiles,
    and far fewer programs than one per sequence for a batch of decodes beside a prompt."""
    import random

    rng = random.Random(7)
    for _ in range(2000):
        num_seqs = rng.randint(1, 300)
        kind = rng.random()
        lens = [rng.choice([1, 1, 3, rng.randint(1, 700), rng.randint(500, 3000)])
                if kind < 0.7 else rng.randint(0, 2000) for _ in range(num_seqs)]
        num_tokens = sum(lens)
        for min_q in (1, 5, 64, 512):
            tiles, long_only = gluon_launch.grid_tiles(num_tokens, num_seqs, min_q)
            every = num_tokens // 128 + num_seqs
            assert long_only == (min_q > 1 and num_seqs > 1 and 2 * tiles <= every)
            if long_only:
                need = sum(-(-n // 128) for n in lens if n >= min_q)
            else:  # past the last tile the kernel gives any sequence's queries
                starts, need = 0, 0
                for b, n in enumerate(lens):
                    need = max(need, starts // 128 + b + -(-n // 128))
                    starts += n
            assert tiles >= need, (lens, min_q, tiles, need)
    tiles, long_only = gluon_launch.grid_tiles(1024 + 255, 256, 512)
    assert long_only and tiles == 9 + 2  # not 9 + 256
    # four prompts of 2048 with min_q 512: no program to remove, every tile numbered
    assert gluon_launch.grid_tiles(8192, 4, 512) == (64 + 4, False)


@pytest.mark.parametrize("head", [96, 80, 192])
def test_a_padded_head_reads_through_rank3_descriptors_that_stop_at_the_head(head):
    """Heads narrower than their tile: q and the caches seen as [rows, heads, head] with
    boxes of 64 columns, so TMA fills the columns past the head with zeros instead of
    bringing the next head's values (the kernel's rank-3 mode)."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from triton.experimental.gluon import language as gl

    width = gluon_launch.tile_width(head)
    q = torch.randn(300, 8, head, dtype=BF16)
    cache = torch.randn(20, 16, 2, head, dtype=BF16)
    qd = gluon_launch._q_descriptor(q, 64, width, gl.bfloat16)
    assert (list(qd.shape), list(qd.strides), list(qd.block_shape)) == \
        ([300, 8, head], [8 * head, head, 1], [64, 1, 64])
    kd = gluon_launch._rows(cache, 16, width, gluon_launch.TILES[width][0], gl.bfloat16)
    assert (list(kd.shape), list(kd.strides), list(kd.block_shape)) == \
        ([320, 2, head], [2 * head, head, 1], [16, 1, 64])
    assert kd.layout.rank == 3 and kd.layout.swizzle_byte_width == 128


def test_a_head_that_fills_its_tile_keeps_the_row_view():
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from triton.experimental.gluon import language as gl

    q = torch.randn(300, 8, 128, dtype=BF16)
    cache = torch.randn(20, 16, 2, 128, dtype=BF16)
    qd = gluon_launch._q_descriptor(q, 64, 128, gl.bfloat16)
    assert (list(qd.shape), list(qd.block_shape)) == ([300, 8 * 128], [64, 128])
    kd = gluon_launch._rows(cache, 16, 128, 128, gl.bfloat16)
    assert (list(kd.shape), list(kd.strides), list(kd.block_shape)) == \
        ([320, 256], [256, 1], [16, 128])


def test_a_cache_whose_slots_are_not_rows_is_staged(monkeypatch):
    """K and V interleaved per block (``layout="packed"``): the block stride is twice the
    rows' span, so TMA cannot read whole blocks as rows; the plan stages and says why
    (16-bit caches; an 8-bit one is read from its staged copy, which is rows)."""
    from portattn.dispatch.problem import cache_slot_rows
    from portattn.options import normalize_options

    split = PagedKVCache.allocate(4, 16, 2, 128)
    packed = PagedKVCache.allocate(4, 16, 2, 128, layout="packed")
    assert cache_slot_rows(split.key_cache) and cache_slot_rows(split.value_cache)
    assert not cache_slot_rows(packed.key_cache) and not cache_slot_rows(packed.value_cache)
    narrow = PagedKVCache.allocate(4, 16, 1, 36)  # 72-byte slots: rows, not 16-byte aligned
    assert not cache_slot_rows(narrow.key_cache)
    plan = _plan(_problem(kv_rows=False))
    assert "gluon" not in plan.params and "not evenly spaced rows" in plan.params["gluon_reason"]
    assert plan.params["gluon_reason"] and plan.params["stage"]
    assert _plan(_problem(kv_rows=False, kv_quant="fp8_per_tensor:e4m3fn")).params["gluon"]
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    with pytest.raises(UnsupportedError, match="not evenly spaced rows"):
        _plan(_problem(kv_rows=False))
    monkeypatch.delenv("PORTATTN_GLUON")
    batch = make_paged_batch([3], [40], num_q_heads=4, num_kv_heads=2, head_size=128,
                             block_size=16, dtype=torch.float16)
    options = normalize_options(batch.q, batch.cache)
    for cache, rows in ((batch.cache, True),
                        (PagedKVCache.allocate(8, 16, 2, 128, layout="packed"), False)):
        problem = Problem.from_call(batch.q, cache, batch.metadata, options, 3, 40)
        assert problem.kv_rows is rows
        assert ("not evenly spaced rows" in problem.describe()) is not rows


def test_routing_a_simulated_hopper_prefill_does_not_define_the_kernels():
    """``gluon_failure`` (asked while a plan is chosen) reads the launchers' failure table
    only where they were imported: importing them defines the kernels, which fails on a
    Triton without what they use (3.4: no ``triton.constexpr_function``) and would turn a
    simulated profile's routing (``portattn report``) into a crash. A fresh process, so
    nothing imported the launchers before."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys\n"
        "from portattn.backends import gluon_rules\n"
        "from portattn.dispatch.problem import Problem\n"
        "from portattn.capabilities.profiles import simulated\n"
        "from portattn.dispatch.selector import decide\n"
        "p = Problem.make(device_type='cuda', dtype='bfloat16', head_size=128,\n"
        "                 query_len=8192, seq_len=8192)\n"
        "d = decide(p, simulated('sm90'), 'triton_unified')\n"
        "print(gluon_rules.gluon_failure(p, 'cache'), d.backend,\n"
        "      'portattn.kernels.launch' in sys.modules)\n")
    src = str(Path(gluon_rules.__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=src, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "triton_unified", "False"]

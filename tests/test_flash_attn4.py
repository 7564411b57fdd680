"""FA4 (``flash_attn.cute``, pip ``flash-attn-4``) in the ``flash_attn`` backend, on a CPU:
detection of each flash-attn generation with stand-in modules, the reasons per arch, the
argument mapping against a stand-in of FA4's varlen call, the JIT bookkeeping, routing
with ``sm90+fa4`` and the report. The GPU tier (tests/gpu/test_flash_attn4_gpu.py) checks
the real library."""

import importlib
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from portattn.backends import flash_attn_calls, flash_attn_jit
from portattn.backends.flash_attn import FlashAttn, FlashAttnGather
from portattn.capabilities import Capabilities, clear_cache, probe
from portattn.cli import main
from portattn.dispatch import Problem, decide
from portattn.dispatch.priorities import (
    LONG_CHUNK_BUCKET,
    MEASURED_LEADS,
    MEASURED_YIELDS,
    MeasuredYield,
    leads_for,
    priority_list,
    problem_class,
    yields_for,
)
from portattn.dispatch.routing import backend_availability
from portattn.dispatch.selector import with_notes
from portattn.options import normalize_options
from portattn.testing import dense_attention, make_paged_batch, relative_error

probe_mod = importlib.import_module("portattn.capabilities.probe")


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _namespace(name):
    """What ``import flash_attn`` gives with only FA4 installed: a namespace package (a
    ``__path__``, no ``__file__``, no FA2 functions)."""
    return _module(name, __path__=[])


# ================================================================ detection


@pytest.fixture
def no_flash_attn(monkeypatch):
    for name in ("flash_attn", "flash_attn_interface", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(probe_mod, "_dist_version", lambda *names: "4.0.0b36" if any(
        n in ("flash-attn-4", "flash_attn_4") for n in names) else None)
    return monkeypatch


def _install(monkeypatch, *, fa2=False, fa3=False, fa4=True):
    fa4_module = _module("flash_attn.cute", __version__="0.0.0",
                         flash_attn_varlen_func=lambda *a, **k: None)
    if fa2:
        parent = _module("flash_attn", __version__="2.8.3", __file__="/site/flash_attn/init.py",
                         __path__=["/site/flash_attn"], flash_attn_varlen_func=lambda *a: None)
    else:
        parent = _namespace("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", parent)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", fa4_module if fa4 else None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        _module("flash_attn_interface") if fa3 else None)


@pytest.mark.parametrize("fa2,fa3,expected,version", [
    (False, False, ("fa4",), "4.0.0b36"),
    (True, False, ("fa2", "fa4"), "2.8.3"),
    (True, True, ("fa2", "fa3", "fa4"), "2.8.3"),
])
def test_each_generation_is_detected(no_flash_attn, fa2, fa3, expected, version):
    _install(no_flash_attn, fa2=fa2, fa3=fa3)
    check, found_version, interfaces = probe_mod.probe_flash_attn("nvidia", "sm90", (9, 0))
    assert check.ok and interfaces == expected and found_version == version, check
    assert check.reason.startswith(f"flash-attn {version} ({', '.join(expected)}) on sm90")
    if fa2:
        assert "FA4 from flash-attn-4 4.0.0b36" in check.reason
    assert "flash_attn_varlen_func" not in check.reason  # FA4's namespace is not "too old"


def test_fa4_alone_is_usable_without_fa2(no_flash_attn):
    _install(no_flash_attn)
    check, _, interfaces = probe_mod.probe_flash_attn("nvidia", "sm100", (10, 0))
    assert check.ok and interfaces == ("fa4",)
    caps = probe(simulate="sm90+fa4")
    assert FlashAttn().unavailable(caps) == []


def test_fa2_without_fa4_is_not_listed_as_fa4(no_flash_attn):
    _install(no_flash_attn, fa2=True, fa4=False)
    check, _, interfaces = probe_mod.probe_flash_attn("nvidia", "sm90", (9, 0))
    assert check.ok and interfaces == ("fa2",)


def test_fa4_without_its_varlen_call_is_a_reason(no_flash_attn):
    _install(no_flash_attn)
    no_flash_attn.setitem(sys.modules, "flash_attn.cute", _module("flash_attn.cute"))
    check, _, interfaces = probe_mod.probe_flash_attn("nvidia", "sm90", (9, 0))
    assert not check.ok and interfaces == ()
    assert "flash_attn.cute has no flash_attn_varlen_func" in check.reason


def _cute_on_disk(tmp_path, monkeypatch, body):
    """A real FA4-only layout: site/flash_attn/cute/__init__.py and no flash_attn/__init__."""
    cute = tmp_path / "site" / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (cute / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("flash_attn", "flash_attn.cute"):
        # recorded, so what the test imports from the temporary site leaves with it (a
        # namespace `flash_attn` left behind changed later probes' disk-cache key)
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    importlib.invalidate_caches()


def test_a_broken_fa4_install_is_a_reason(tmp_path, monkeypatch):
    _cute_on_disk(tmp_path, monkeypatch, "raise ImportError('libcute_dsl_runtime.so: cannot "
                                         "open shared object file')\n")
    check, _, interfaces = probe_mod.probe_flash_attn("nvidia", "sm90", (9, 0))
    assert not check.ok and interfaces == ()
    assert "flash_attn.cute (FA4) failed to import: ImportError: libcute_dsl" in check.reason


def test_presence_off_the_gpu_is_read_without_running_the_package(tmp_path, monkeypatch):
    _cute_on_disk(tmp_path, monkeypatch, "raise RuntimeError('must not run on a CPU probe')\n")
    assert probe_mod._flash_attn_layout() == (False, True)
    assert probe_mod._flash_attn_modules_present() == ["flash_attn.cute"]
    check, _, interfaces = probe_mod.probe_flash_attn("cpu", "cpu", None)
    assert interfaces == ("fa4",) and not check.ok
    assert "compute capability 8.0" in check.reason
    assert "flash_attn.cute" not in sys.modules or sys.modules["flash_attn.cute"] is None
    assert "flash_attn.cute" in probe_mod.fingerprint()["flash_attn_modules"]


def test_a_real_probe_on_this_cpu_lists_fa4_but_cannot_use_it(no_flash_attn):
    _install(no_flash_attn)
    no_flash_attn.setattr(probe_mod, "_gpu_index", lambda: None)
    clear_cache()
    try:
        caps = probe(refresh=True, use_disk_cache=False)
    finally:
        clear_cache()
    assert caps.flash_attn_interfaces == ("fa4",) and not caps.flash_attn.ok


@pytest.mark.parametrize("name,canonical,interfaces,version", [
    ("sm90+fa4", "sm90+fa4", ("fa4",), "4.0.0b36"),
    ("sm100+fa4", "sm100+fa4", ("fa4",), "4.0.0b36"),
    ("sm90+fa4+fa3+fa2", "sm90+fa2+fa3+fa4", ("fa2", "fa3", "fa4"), "2.8.3"),
    ("sm120+fa4", "sm120+fa4", ("fa4",), "4.0.0b36"),
])
def test_fa4_profiles(name, canonical, interfaces, version):
    caps = probe(simulate=name)
    assert caps.profile == canonical and caps.flash_attn.ok
    assert caps.flash_attn_interfaces == interfaces and caps.flash_attn_version == version
    assert Capabilities.from_dict(json.loads(json.dumps(caps.to_dict()))) == caps


def test_fa4_twice_is_a_bad_profile():
    with pytest.raises(ValueError, match=r"\+fa4 at most once"):
        probe(simulate="sm90+fa4+fa4")


# ================================================================ reasons


@pytest.mark.parametrize("profile,kwargs,expected", [
    ("sm80+fa4", {}, "only on sm90 and sm100/sm110 (its kernels for sm80 and sm120 take no "
                     "page_table); this is sm80"),
    ("sm120+fa4", {}, "this is sm120"),
    ("sm90+fa4", dict(alibi="linear"), "has no ALiBi input"),
    ("sm90+fa4", dict(dtype="float32"), "supports float16/bfloat16 q, not torch.float32"),
    ("sm100+fa4", dict(dtype="float8_e4m3fn", kv_quant="fp8_per_tensor:e4m3fn",
                       out_dtype="bfloat16"), "flash_attn_varlen_func takes no fp8 descales"),
    ("sm90+fa4", dict(dtype="float8_e4m3fn", kv_quant="fp8_per_tensor:e4m3fn",
                      out_dtype="bfloat16"), "runs fp8 only on sm100 (compute capability "
                                             "10.x); this is sm90"),
    ("sm100+fa4", dict(dtype="float8_e4m3fn", kv_quant="fp8_per_tensor:e5m2",
                       out_dtype="bfloat16"), "same format and per-tensor scales "
                                              "(fp8_per_tensor:e4m3fn"),
    ("sm100+fa4", dict(dtype="float8_e4m3fn", kv_quant="fp8_per_token_head:e4m3fn",
                       out_dtype="bfloat16"), "not fp8_per_token_head:e4m3fn"),
    ("sm100+fa4", dict(kv_quant="fp8_per_tensor:e4m3fn"), "only with a q of the same fp8 "
                                                          "format"),
    ("sm90+fa4", dict(kv_quant="int8_per_token_head"), "reads no int8_per_token_head cache"),
    ("sm90+fa4", dict(out_dtype="float8_e4m3fn"), "fp8 output is not supported"),
    ("sm90+fa4", dict(out_dtype="float32"), "writes torch.bfloat16 here, not torch.float32"),
    ("sm100+fa4", dict(dtype="float8_e4m3fn", kv_quant="fp8_per_tensor:e4m3fn",
                       out_dtype="float8_e4m3fn"), "writes torch.bfloat16 here"),
    ("sm90+fa4", dict(head_size=264), "from 8 to 256 in multiples of 8, not 264/264"),
    ("sm90+fa4", dict(head_size=100), "multiples of 8, not 100/100"),
    ("sm90+fa4", dict(head_size=128, head_size_v=260), "not 128/260"),
    ("sm100+fa4", dict(head_size=160), "up to 128 (multiples of 8), 192/128 or 256/256, "
                                       "not 160/160"),
    ("sm100+fa4", dict(head_size=256, head_size_v=128), "not 256/128"),
    ("sm100+fa4", dict(head_size=64, head_size_v=512), "not 64/512"),
    ("sm100+fa4", dict(head_size=72, dtype="float8_e4m3fn", kv_quant="fp8_per_tensor:e4m3fn",
                       out_dtype="bfloat16"), "multiples of 16"),
])
def test_each_fa4_limit_has_its_reason(profile, kwargs, expected):
    reasons = FlashAttn().why_not(Problem.make(block_size=16, **kwargs),
                                  probe(simulate=profile))
    assert any(expected in r for r in reasons), reasons
    assert any("FA2 interface (flash_attn_varlen_func) is not installed" in r
               for r in reasons), reasons


@pytest.mark.parametrize("profile,kwargs", [
    ("sm90+fa4", dict(block_size=16)),
    ("sm90+fa4", dict(block_size=1, query_len=300, seq_len=900, num_seqs=3)),
    ("sm90+fa4", dict(block_size=5, sliding_window=True, softcap=True, causal=False)),
    ("sm90+fa4", dict(block_size=128, sinks=True, softcap=True, sliding_window=True)),
    ("sm90+fa4", dict(head_size=192, head_size_v=128)),
    ("sm90+fa4", dict(head_size=256, head_size_v=64, num_q_heads=10, num_kv_heads=2)),
    ("sm90+fa4", dict(head_size=256, dtype="float16", num_q_heads=16, num_kv_heads=1)),
    ("sm90+fa4", dict(head_size=8)),
    ("sm100+fa4", dict(head_size=192, head_size_v=128)),
    ("sm100+fa4", dict(head_size=256)),
])
def test_fa4_serves(profile, kwargs):
    problem = Problem.make(**kwargs)
    caps = probe(simulate=profile)
    assert FlashAttn().why_not(problem, caps) == []
    plan = FlashAttn().plan(problem, caps)
    assert plan.params["interface"] == "fa4" and "FA4" in plan.variant
    assert "_fa4_configuration" not in plan.describe()  # bookkeeping, not shown


def test_install_hint_where_fa4_would_serve():
    hint = "FA4 (flash_attn.cute) would serve this call but is not installed: pip install " \
           "flash-attn-4"
    plain = Problem.make(block_size=16)
    for profile in ("sm90+fa2", "sm100+fa2"):
        assert any(hint in r for r in FlashAttn().why_not(plain, probe(simulate=profile)))
    for profile in ("sm80+fa2", "sm120+fa2"):
        assert not any(hint in r for r in FlashAttn().why_not(plain, probe(simulate=profile)))
    alibi = FlashAttn().why_not(Problem.make(block_size=16, alibi="linear"),
                                probe(simulate="sm90+fa2"))
    assert not any(hint in r for r in alibi), alibi
    gather = FlashAttnGather().why_not(Problem.make(block_size=16, sinks=True),
                                       probe(simulate="sm90+fa2"))
    assert not any(hint in r for r in gather), gather


def test_gather_variant_never_uses_fa4():
    reasons = FlashAttnGather().why_not(Problem.make(block_size=16), probe(simulate="sm90+fa4"))
    assert any("flash_attn_gather needs flash-attn 2" in r for r in reasons), reasons


def test_interface_variable_with_fa4(monkeypatch):
    caps = probe(simulate="sm90+fa2+fa3+fa4")
    block16, alibi256 = Problem.make(block_size=16), Problem.make(block_size=256, alibi="linear")
    assert FlashAttn().plan(block16, caps).params["interface"] == "fa4"  # auto: FA4 first
    assert FlashAttn().plan(alibi256, caps).params["interface"] == "fa2"  # FA4, FA3 cannot
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa3")
    assert FlashAttn().plan(block16, caps).params["interface"] == "fa3"
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa2")
    reasons = FlashAttn().why_not(block16, caps)
    assert any("FA4 (flash_attn.cute) is turned off by PORTATTN_FLASH_ATTN_INTERFACE" in r
               for r in reasons), reasons
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa4")
    reasons = FlashAttn().why_not(alibi256, caps)
    assert any("has no ALiBi input" in r for r in reasons) and any(
        "FA2 interface (flash_attn_varlen_func) is turned off" in r for r in reasons), reasons


def test_an_interface_the_variable_names_but_is_missing_is_said(monkeypatch):
    """The variable names an interface this machine lacks: the reasons say so (and why it
    would not serve where it could not), and never advise installing an interface the
    variable excludes."""
    block16 = Problem.make(block_size=16)
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa4")
    reasons = FlashAttn().why_not(block16, probe(simulate="sm80+fa2"))
    assert any("FA4 (flash_attn.cute), which PORTATTN_FLASH_ATTN_INTERFACE asks for, is not "
               "installed (nor would it serve this call: it pages on compute capability "
               "9.x" in r for r in reasons), reasons
    reasons = FlashAttn().why_not(block16, probe(simulate="sm90+fa2"))
    assert any("FA4 (flash_attn.cute) would serve this call but is not installed" in r
               for r in reasons) and not any("FA3" in r for r in reasons), reasons
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa2")
    reasons = FlashAttn().why_not(block16, probe(simulate="sm90+fa4"))
    assert not any("not installed:" in r for r in reasons), reasons  # no install advice


# ================================================================ the argument mapping
# The stand-in follows FA4 4.0.0b36's flash_attn.cute.flash_attn_varlen_func: its exact
# signature (no fp8 descales), the checks its _flash_attn_fwd makes (dtypes, int32 and
# unit-stride lengths, page_table with seqused_k and no cu_seqlens_k, shapes, fp8 only on
# sm100, head sizes per arch, learnable_sink per query head), its window resolution (None
# = unbounded; both sides negative = no window; causal forces right = 0; otherwise a
# window, where a right side of -1 ends one key before the query), bottom-right aligned
# masks, softcap on the scaled score, sinks joining the denominator, and its return value
# (out, lse).

STAND_IN_ARCH = {"value": 90}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fa4_window(causal, left, right):
    if left is not None and right is not None and left < 0 and right < 0:
        left = right = None
    if causal:
        right = 0
    if left is None and right == 0:
        return True, False, None, None
    return False, left is not None or right is not None, left, right


def _stand_in_varlen(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None,
                     max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, seqused_q=None,
                     seqused_k=None, gather_kv_indices=None, page_table=None,
                     softmax_scale=None, causal=False, window_size=(None, None),
                     learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                     deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None,
                     block_sparse_tensors=None, aux_tensors=None, aux_scalars=None,
                     return_lse=False, scheduler_metadata=None, seqlen_k_per_split=None,
                     disable_scheduler_metadata=False, gather_bwd_recompute_p=False,
                     gather_bwd_token_chunk=None):
    arch = STAND_IN_ARCH["value"]
    assert qv is None and gather_kv_indices is None and k is not v
    assert page_table is not None and cu_seqlens_k is None, "page_table with seqused_k"
    assert page_table.dtype == torch.int32 and page_table.stride(-1) == 1
    batch = cu_seqlens_q.shape[0] - 1
    num_pages, page_size, num_kv_heads, head_dim_v = v.shape
    num_heads, head_dim = q.shape[1:]
    assert page_table.shape[0] == batch and k.shape == (num_pages, page_size, num_kv_heads,
                                                        head_dim)
    for t in (cu_seqlens_q, seqused_k):
        assert t.dtype == torch.int32 and t.stride(0) == 1
    assert seqused_k.shape == (batch,)
    assert v.dtype in (torch.float16, torch.bfloat16, *FP8)
    assert q.dtype == k.dtype == v.dtype, "q, k, v must have the same dtype"
    assert num_heads % num_kv_heads == 0
    assert arch // 10 in (9, 10, 11), "paged KV only on sm90/sm100 here"
    align = 16 // v.element_size()
    assert head_dim % align == 0 and head_dim_v % align == 0
    if arch // 10 == 9:
        assert 8 <= head_dim <= 256 and 8 <= head_dim_v <= 256
        assert num_splits == 1, "SplitKV not supported on SM 9.0"
    else:
        assert (head_dim <= 128 and head_dim_v <= 128) or (head_dim, head_dim_v) in (
            (192, 128), (256, 256))
    fp8 = v.dtype in FP8  # no descales through this call: values as stored
    assert not fp8 or arch // 10 == 10, "FP8 is only supported on SM100"
    if learnable_sink is not None:
        assert learnable_sink.shape == (num_heads,)
        assert learnable_sink.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert max_seqlen_q is not None and max_seqlen_k is not None
    causal, local, left, right = _fa4_window(causal, *window_size)
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape[0], num_heads, head_dim_v, dtype=torch.float64)
    for b in range(batch):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        sq, sk = q1 - q0, int(seqused_k[b])
        assert sq <= max_seqlen_q and sk <= max_seqlen_k
        if sq == 0:
            continue
        pages = page_table[b, :-(-sk // page_size)].long()
        kk = k[pages].reshape(-1, num_kv_heads, head_dim)[:sk].double()
        vv = v[pages].reshape(-1, num_kv_heads, head_dim_v)[:sk].double()
        qq = q[q0:q1].double()
        kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        row = torch.arange(sq)[:, None] + sk - sq  # bottom-right alignment
        col = torch.arange(sk)[None, :]
        keep = torch.ones(sq, sk, dtype=torch.bool)
        if causal:
            keep &= col <= row
        if local:
            if left is not None:
                keep &= col >= row - left
            if right is not None:
                keep &= col <= row + right
        s = s.masked_fill(~keep, -math.inf)
        if learnable_sink is not None:
            sink = learnable_sink.double()[:, None, None].expand(num_heads, sq, 1)
            s = torch.cat([s, sink], -1)
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)[..., :sk]
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, vv)
    return out.to(torch.bfloat16 if fp8 else q.dtype), None


@pytest.fixture
def stand_in_fa4(monkeypatch):
    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        return _stand_in_varlen(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "flash_attn", _namespace("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute",
                        _module("flash_attn.cute", flash_attn_varlen_func=record))
    monkeypatch.setitem(STAND_IN_ARCH, "value", 90)
    flash_attn_jit.compiled.clear()
    yield calls
    flash_attn_jit.compiled.clear()


def _fa4_plan(batch, profile="sm90+fa4", **problem):
    caps = probe(simulate=profile)
    problem = Problem.make(num_q_heads=batch.q.shape[1], num_kv_heads=batch.cache.num_kv_heads,
                           head_size=batch.cache.head_size_qk,
                           head_size_v=batch.cache.head_size_v,
                           block_size=batch.cache.block_size,
                           query_len=max(batch.query_lens + [1]),
                           num_seqs=len(batch.seq_lens), **problem)
    plan = FlashAttn().plan(problem, caps)
    assert plan.params["interface"] == "fa4", plan
    return plan


def _run(batch, plan, **options):
    """The backend's ``run`` on CPU tensors through the stand-in: (out, expected)."""
    if options.get("sinks") == "rand":
        options = dict(options, sinks=torch.randn(batch.q.shape[1]) * 2)
    opts = normalize_options(batch.q, batch.cache, **options)
    out = torch.full((batch.q.shape[0], batch.q.shape[1], batch.cache.head_size_v),
                     float("nan"), dtype=opts.out_dtype)
    FlashAttn().run(batch.q, batch.cache, batch.metadata, opts, out, plan)
    q_ref = batch.q.float() * float(options.pop("q_scale")) if "q_scale" in options else batch.q
    expected = dense_attention(q_ref, batch.keys, batch.values, batch.query_lens, **options)
    return out, expected


OPTIONS = {
    "plain": {}, "window": dict(sliding_window=7), "softcap": dict(softcap=2.0),
    "sinks": dict(sinks="rand"), "non-causal": dict(causal=False),
    "non-causal-window": dict(causal=False, sliding_window=5),
    "window-1": dict(sliding_window=1),
    "all": dict(sliding_window=40, softcap=3.0, sinks="rand", scale=0.2),
}
SHAPES = {  # (query_lens, seq_lens): a sequence without queries, one without keys
    "varlen": ([3, 1, 0, 20, 0], [300, 41, 17, 20, 0]),
    "decode": ([1, 1, 1], [300, 41, 1]),
    "mixed": ([1, 37, 1], [129, 37, 64]),
}


@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("options", list(OPTIONS))
def test_fa4_argument_mapping_matches_our_semantics(stand_in_fa4, block_size, shape, options):
    query_lens, seq_lens = SHAPES[shape]
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=6, num_kv_heads=2,
                             head_size=32, block_size=block_size, dtype=torch.float16)
    out, expected = _run(batch, _fa4_plan(batch), **OPTIONS[options])
    assert relative_error(out, expected) < 2e-3
    assert len(stand_in_fa4) == 1
    call = stand_in_fa4[0]
    assert call["page_table"] is batch.metadata.block_table  # our table, in place
    assert call["seqused_k"] is batch.metadata.seq_lens and call["num_splits"] == 1
    sink = call["learnable_sink"]
    assert sink is None or not sink.requires_grad


def test_fa4_gets_tensors_that_need_no_grad(stand_in_fa4):
    batch = make_paged_batch([3, 1], [40, 9], num_q_heads=4, num_kv_heads=2, head_size=32,
                             block_size=16, dtype=torch.float16)
    sinks = torch.nn.Parameter(torch.randn(4))
    batch.q.requires_grad_(True)
    opts = normalize_options(batch.q, batch.cache, sinks=sinks)
    out = torch.empty(4, 4, 32, dtype=torch.float16)
    with torch.no_grad():
        FlashAttn().run(batch.q, batch.cache, batch.metadata, opts, out, _fa4_plan(batch))
    (call,) = stand_in_fa4
    assert not call["learnable_sink"].requires_grad
    assert call["learnable_sink"].data_ptr() == sinks.data_ptr()  # a view, not a copy


@pytest.mark.parametrize("layout", ["packed", "split"])
@pytest.mark.parametrize("gqa", [(4, 4), (6, 2), (5, 1)])
def test_fa4_maps_gqa_and_packed_layouts(stand_in_fa4, layout, gqa):
    batch = make_paged_batch([2, 1, 9], [300, 70, 9], num_q_heads=gqa[0], num_kv_heads=gqa[1],
                             head_size=64, block_size=16, dtype=torch.float16, layout=layout)
    assert batch.cache.key_cache.is_contiguous() == (layout == "split")
    out, expected = _run(batch, _fa4_plan(batch), sliding_window=50, sinks="rand")
    assert relative_error(out, expected) < 2e-3


@pytest.mark.parametrize("profile,sizes", [("sm90+fa4", (192, 128)), ("sm90+fa4", (64, 96)),
                                           ("sm100+fa4", (192, 128))])
def test_fa4_maps_differing_kv_head_sizes(stand_in_fa4, profile, sizes):
    stand_in_fa4_arch = 100 if profile.startswith("sm100") else 90
    STAND_IN_ARCH["value"] = stand_in_fa4_arch
    batch = make_paged_batch([2, 1], [40, 70], num_q_heads=4, num_kv_heads=2,
                             head_size=sizes[0], head_size_v=sizes[1], block_size=16,
                             dtype=torch.float16)
    assert batch.cache.packed  # K and V are views of one DiffKV tensor
    out, expected = _run(batch, _fa4_plan(batch, profile), sliding_window=30, softcap=4.0)
    assert out.shape[-1] == sizes[1] and relative_error(out, expected) < 2e-3


def test_fp8_stays_off_fa4_until_its_public_call_takes_descales(monkeypatch):
    """FA4's kernels run fp8 on sm100, but 4.0.0b36's flash_attn_varlen_func has no descale
    parameters (the stand-in has its exact signature): fp8 is refused with that reason,
    and FA4_PUBLIC_FP8 is the one switch a later release needs (with the mapping)."""
    import inspect

    from portattn.backends import flash_attn_rules

    assert not {"q_descale", "k_descale", "v_descale"} & set(
        inspect.signature(_stand_in_varlen).parameters)
    fp8 = Problem.make(dtype="float8_e4m3fn", kv_quant="fp8_per_tensor:e4m3fn",
                       out_dtype="bfloat16")
    caps = probe(simulate="sm100+fa4")
    assert FlashAttn().interface_for(fp8, caps) is None
    assert flash_attn_rules.FA4_NO_PUBLIC_FP8 in flash_attn_rules.fa4_reasons(fp8, caps)
    monkeypatch.setattr(flash_attn_rules, "FA4_PUBLIC_FP8", True)
    assert flash_attn_rules.fa4_reasons(fp8, caps) == []
    assert flash_attn_rules.fa4_reasons(fp8, probe(simulate="sm90+fa4")) != []


def test_the_mapping_test_catches_a_wrong_window(stand_in_fa4, monkeypatch):
    """FA2/FA3's non-causal window (w - 1, -1) means something else to FA4 (a window that
    ends one key before the query): the stand-in must tell."""
    batch = make_paged_batch([3, 20], [300, 20], num_q_heads=4, num_kv_heads=2, head_size=32,
                             block_size=16, dtype=torch.float16)
    plan = _fa4_plan(batch)
    out, expected = _run(batch, plan, causal=False, sliding_window=5)
    assert relative_error(out, expected) < 2e-3
    monkeypatch.setattr(flash_attn_calls, "fa4_window", flash_attn_calls.window_arg)
    out, expected = _run(batch, plan, causal=False, sliding_window=5)
    assert relative_error(out, expected) > 0.1


def test_fa4_window_mapping():
    def opts(**kw):
        batch = make_paged_batch([1], [4], head_size=32)
        return normalize_options(batch.q, batch.cache, **kw)
    assert flash_attn_calls.fa4_window(opts()) == (None, None)
    assert flash_attn_calls.fa4_window(opts(sliding_window=8)) == (7, 0)
    assert flash_attn_calls.fa4_window(opts(sliding_window=8, causal=False)) == (7, None)
    assert flash_attn_calls.fa4_window(opts(causal=False)) == (None, None)


# ================================================================ JIT bookkeeping


def _plain_values(value) -> bool:
    if isinstance(value, tuple):
        return all(_plain_values(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_explain_says_when_a_call_compiles(stand_in_fa4):
    batch = make_paged_batch([1, 5], [40, 70], num_q_heads=4, num_kv_heads=2, head_size=32,
                             block_size=16, dtype=torch.float16)
    plan = _fa4_plan(batch)
    backend = FlashAttn()

    def note(**options):
        opts = normalize_options(batch.q, batch.cache, **options)
        (text,) = backend.notes(None, plan, opts)
        return text

    assert "first call with this configuration in this process compiles" in note()
    _run(batch, plan)
    assert "already ran in this process" in note()
    assert "compiles" in note(softcap=3.0)  # the softcap value is compiled into FA4's kernel
    _run(batch, plan, softcap=3.0)
    assert "already ran" in note(softcap=3.0) and "compiles" in note(softcap=4.0)
    assert "compiles" in note(sinks=torch.zeros(4))
    assert len(flash_attn_jit.compiled) == 2
    assert all(_plain_values(c) for c in flash_attn_jit.compiled._seen)  # no tensors held


def test_decision_carries_the_compile_note(monkeypatch):
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    decision = with_notes(decide(Problem.make(query_len=4096, seq_len=4096, head_size=256),
                                 probe(simulate="sm90+fa4")))
    assert decision.backend == "flash_attn" and decision.plan.params["interface"] == "fa4"
    (text,) = decision.notes
    assert "compiles a kernel" in text and "disk cache is on" in text
    assert f"note: {text}" in str(decision) and decision.to_dict()["notes"] == [text]
    triton = with_notes(decide(Problem.make(), probe(simulate="sm90+fa4")))
    assert triton.backend == "triton_unified" and triton.notes == ()


def test_cli_explain_prints_the_compile_note(capsys):
    assert main(["explain", "--simulate", "sm90+fa4", "--query-len", "8192",
                 "--seq-len", "8192", "--head-size", "256"]) == 0
    text = capsys.readouterr().out
    assert "backend: flash_attn (auto)" in text and "note: FA4 JIT" in text


# ================================================================ routing and the report


@pytest.mark.parametrize("profile,kwargs,expected", [
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, head_size=256), ("flash_attn", "fa4")),
    ("sm90+fa4", dict(query_len=2048, seq_len=2048, num_seqs=4, head_size=64),
     ("flash_attn", "fa4")),
    ("sm90+fa4", dict(query_len=1025, seq_len=9000, num_seqs=64, head_size=96),
     ("flash_attn", "fa4")),
    # head 128 at block 16: the lead yields to our Gluon prefill (MEASURED_YIELDS)
    ("sm90+fa4", dict(query_len=8192, seq_len=8192), ("triton_unified", None)),
    ("sm90+fa4", dict(query_len=2048, seq_len=2048, num_seqs=4, dtype="float16"),
     ("triton_unified", None)),
    ("sm90+fa4", dict(query_len=1025, seq_len=9000, num_seqs=64), ("triton_unified", None)),
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, sinks=True), ("triton_unified", None)),
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, softcap=True), ("triton_unified", None)),
    # ... but not where it was not measured faster: windows, a combination, other blocks
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, sliding_window=True),
     ("flash_attn", "fa4")),
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, sinks=True, softcap=True),
     ("flash_attn", "fa4")),
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, block_size=32), ("flash_attn", "fa4")),
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, block_size=256), ("flash_attn", "fa4")),
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, causal=False), ("flash_attn", "fa4")),
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, num_q_heads=64), ("flash_attn", "fa4")),
    # a cache whose slots are not rows (K and V interleaved per block): no Gluon, no yield
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, kv_rows=False), ("flash_attn", "fa4")),
    ("sm90+fa4", dict(query_len=1024, seq_len=4096), ("triton_unified", None)),
    ("sm90+fa4", dict(num_seqs=32), ("triton_unified", None)),
    ("sm90+fa4", dict(query_len=4, num_seqs=32), ("triton_unified", None)),
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, alibi="linear"), ("triton_unified", None)),
    ("sm90+fa4", dict(query_len=8192, seq_len=8192, kv_quant="int8_per_token_head"),
     ("triton_unified", None)),
    ("sm90+fa4", dict(head_size=192, head_size_v=128, num_seqs=32), ("triton_diffkv", None)),
    ("sm90+fa4", dict(head_size=192, head_size_v=128, query_len=4096, seq_len=4096),
     ("flash_attn", "fa4")),
    ("sm100+fa4", dict(query_len=8192, seq_len=8192), ("flash_attn", "fa4")),
    ("sm120+fa4", dict(query_len=8192, seq_len=8192), ("triton_unified", None)),
    ("sm80+fa4", dict(query_len=8192, seq_len=8192), ("triton_unified", None)),
    ("sm90+fa2+fa3", dict(query_len=8192, seq_len=8192), ("triton_unified", None)),
    ("sm90+fa2+fa3+fa4", dict(query_len=8192, seq_len=8192, head_size=256),
     ("flash_attn", "fa4")),
    ("sm90+fa2+fa3+fa4", dict(query_len=8192, seq_len=8192), ("triton_unified", None)),
])
def test_routing_with_fa4(profile, kwargs, expected):
    decision = decide(Problem.make(**kwargs), probe(simulate=profile))
    assert (decision.backend, decision.plan.params.get("interface")) == expected, decision


def test_no_lead_when_the_interface_variable_excludes_fa4(monkeypatch):
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa3")
    long_prefill = Problem.make(query_len=8192, seq_len=8192, head_size=256)
    decision = decide(long_prefill, probe(simulate="sm90+fa3+fa4"))
    assert decision.backend == "triton_unified"  # FA3 serves, but only FA4 was measured
    assert dict(decision.considered)["flash_attn"] == ()


def test_decode_goes_to_fa4_only_when_triton_is_off(monkeypatch):
    monkeypatch.setenv("PORTATTN_TRITON", "0")
    decision = decide(Problem.make(num_seqs=32), probe(simulate="sm90+fa4"))
    assert decision.backend == "flash_attn" and decision.plan.params["interface"] == "fa4"


def test_priority_list_is_a_pure_function_of_its_arguments():
    caps = probe(simulate="sm90+fa4")
    default = priority_list(caps)
    assert default.index("triton_unified") < default.index("flash_attn")
    fa4 = frozenset({("flash_attn", "fa4")})
    assert priority_list(caps, "long-chunks") == default
    led = priority_list(caps, "long-chunks", fa4)
    assert led[:2] == ("flash_attn", "triton_unified") and sorted(led) == sorted(default)
    assert priority_list(caps, "decode", fa4) == default
    assert priority_list(caps, "long-chunks", frozenset({("flash_attn", "fa3")})) == default
    assert priority_list(probe(simulate="sm120+fa4"), "long-chunks", fa4) == default
    assert priority_list(caps, "long-chunks", fa4) == priority_list(caps, "long-chunks", fa4)


def test_problem_classes_and_measured_leads():
    assert problem_class(Problem.make()) == "decode"
    assert problem_class(Problem.make(query_len=4)) == "short-chunks"
    assert problem_class(Problem.make(query_len=LONG_CHUNK_BUCKET // 2)) == "short-chunks"
    assert problem_class(Problem.make(query_len=LONG_CHUNK_BUCKET // 2 + 1)) == "long-chunks"
    assert {(lead.arch, lead.problem_class) for lead in MEASURED_LEADS} == {
        ("sm90", "long-chunks"), ("sm100", "long-chunks")}
    assert all("TFLOP/s" in lead.evidence for lead in MEASURED_LEADS)
    assert leads_for("sm90", "decode") == () and leads_for("sm80", "long-chunks") == ()


def test_measured_yields_cover_exactly_the_measured_problems():
    (row,) = [r for r in MEASURED_YIELDS if (r.arch, r.problem_class, r.backend) ==
              ("sm90", "long-chunks", "flash_attn")]
    assert (row.ahead_of, row.plan_param, row.gqa_ratios, row.causal) == (
        "triton_unified", "gluon", (4,), True)
    assert "routing_bench" in row.evidence and "1x8192" in row.evidence

    def prefill(**kw):
        return Problem.make(query_len=8192, seq_len=8192, **kw)

    for kw in ({}, dict(sinks=True), dict(softcap=True), dict(dtype="float16")):
        assert row.covers(prefill(**kw)), kw
        assert yields_for("sm90", "long-chunks", "flash_attn", prefill(**kw)) == (row,)
    for kw in (dict(sliding_window=True), dict(sinks=True, softcap=True),
               dict(alibi="linear"), dict(head_size=64), dict(head_size=256),
               dict(head_size=192, head_size_v=128), dict(block_size=32), dict(causal=False),
               dict(num_q_heads=64), dict(num_q_heads=8)):
        assert not row.covers(prefill(**kw)), kw
    assert yields_for("sm100", "long-chunks", "flash_attn", prefill()) == ()
    assert yields_for("sm90", "short-chunks", "flash_attn", prefill()) == ()
    assert yields_for("sm90", "long-chunks", "triton_unified", prefill()) == ()
    # a made-up row: an exact feature set, not a subset
    sinks_only = MeasuredYield("sm90", "long-chunks", "flash_attn", "triton_unified",
                               ((128, 128),), (16,), "gluon", "test", (("sinks",),))
    assert sinks_only.covers(prefill(sinks=True)) and not sinks_only.covers(prefill())


def test_a_yielded_lead_is_explained():
    caps = probe(simulate="sm90+fa4")
    decision = with_notes(decide(Problem.make(query_len=8192, seq_len=8192), caps))
    assert decision.backend == "triton_unified" and "gluon" in decision.plan.params
    assert dict(decision.considered)["flash_attn"] == ()  # could serve: lower priority
    yielded = [n for n in decision.notes if "yields to triton_unified" in n]
    assert len(yielded) == 1 and "head 128, block 16, GQA 4, causal" in yielded[0]
    assert decision.plan.params["gluon"]["reads"] == "cache"
    text = str(decision)
    assert f"note: {yielded[0]}" in text
    assert "not chosen flash_attn: could serve, lower priority" in text
    assert decision.to_dict()["notes"] == list(decision.notes)
    # forcing a backend: no word on the automatic order
    forced = decide(Problem.make(query_len=8192, seq_len=8192), caps, "flash_attn")
    assert forced.backend == "flash_attn" and forced.notes == ()
    # where FA4 still leads, no yield note
    led = decide(Problem.make(query_len=8192, seq_len=8192, head_size=256), caps)
    assert led.backend == "flash_attn" and not any("yields" in n for n in led.notes)


def test_cli_explain_prints_the_yield(capsys):
    assert main(["explain", "--simulate", "sm90+fa4", "--query-len", "8192",
                 "--seq-len", "8192"]) == 0
    text = capsys.readouterr().out
    assert "backend: triton_unified (auto)" in text
    assert "note: flash_attn's measured lead for long-chunks on sm90 yields" in text


def test_the_lead_stays_where_our_plan_lacks_the_measured_kernel(monkeypatch):
    caps = probe(simulate="sm90+fa4")
    problem = Problem.make(query_len=8192, seq_len=8192)
    monkeypatch.setenv("PORTATTN_GLUON", "0")  # the staged unified kernel: FA4 measured ahead
    decision = decide(problem, caps)
    assert decision.backend == "flash_attn" and decision.notes == ()
    monkeypatch.setenv("PORTATTN_GLUON", "1")
    assert decide(problem, caps).backend == "triton_unified"
    # a backend whose plan raises: the lead stays (dispatch never fails on it)
    from portattn.backends.triton_unified import TritonUnified

    def broken(self, problem, caps):
        raise RuntimeError("planning bug")
    monkeypatch.setattr(TritonUnified, "plan", broken)
    assert _priorities_of(problem, caps)[0][0] == "flash_attn"


def _priorities_of(problem, caps):
    from portattn.dispatch import selector

    return selector._priorities(problem, caps)


def test_report_lists_fa4(capsys):
    table = backend_availability(probe(simulate="sm90+fa4"))
    assert table["flash_attn"]["available"] and "FA4" in table["flash_attn"]["summary"]
    assert not table["flash_attn_gather"]["available"]
    unusable = backend_availability(probe(simulate="sm120+fa4"))["flash_attn"]
    assert not unusable["available"] and any("this is sm120" in r for r in unusable["reasons"])
    assert main(["report", "--simulate", "sm90+fa4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["capabilities"]["flash_attn_interfaces"] == ["fa4"]
    assert data["capabilities"]["flash_attn_version"] == "4.0.0b36"
    routing = {row["problem"]: (row["backend"], row["variant"]) for row in data["routing"]}
    backend, variant = routing["prefill bf16 sliding window"]
    assert backend == "flash_attn" and variant.startswith("FA4 paged varlen")
    assert routing["prefill bf16 causal 1 x 8k"][0] == "triton_unified"  # a measured yield
    assert routing["decode bf16 32/8x128 b16 (32 x 8k)"][0] == "triton_unified"
    assert main(["report", "--simulate", "sm90+fa4"]) == 0
    assert "fa4" in capsys.readouterr().out


def test_plan_run_reads_no_lengths_from_the_device(stand_in_fa4, monkeypatch):
    """A plan made from metadata without hints reads the max lengths once, when it is
    made; its flash-attn runs take the plan's (flash-attn's max_seqlen arguments are host
    ints), not a device read per layer (session 42's audit: one per ``run``)."""
    import portattn
    from portattn.backends import flash_attn as flash_attn_backend
    from portattn.types import AttentionMetadata

    monkeypatch.setenv("PORTATTN_SIMULATE", "sm90+fa4")
    monkeypatch.setattr(flash_attn_backend, "machine_reasons", lambda problem, caps: [])
    batch = make_paged_batch([1, 4, 1], [300, 41, 7], num_q_heads=4, num_kv_heads=2,
                             head_size=32, block_size=16, dtype=torch.float16)
    given = batch.metadata
    metadata = AttentionMetadata(given.cu_seqlens_q, given.seq_lens, given.block_table)
    reads = []
    real_max_lengths = AttentionMetadata.max_lengths

    def counted(self):
        if self.max_seqlen_q is None or self.max_seqlen_k is None:
            reads.append(1)
        return real_max_lengths(self)

    monkeypatch.setattr(AttentionMetadata, "max_lengths", counted)
    plan = portattn.plan(metadata, num_q_heads=4, dtype=torch.float16, cache=batch.cache,
                         backend="flash_attn", validate=False)
    assert plan.backend == "flash_attn" and (plan.max_seqlen_q, plan.max_seqlen_k) == (4, 300)
    assert len(reads) == 1
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    for _ in range(3):
        out = torch.full_like(batch.q, float("nan"))
        plan.run(batch.q, batch.cache, out)
        assert relative_error(out, expected) < 2e-3
    assert len(reads) == 1, "plan.run read the max lengths from the metadata's tensors"
    assert [call["max_seqlen_k"] for call in stand_in_fa4] == [300] * 3
    assert plan.metadata is metadata  # the plan still names the caller's metadata


def test_fa4_in_another_site_directory_than_fa2_is_found(tmp_path, monkeypatch):
    """flash-attn >= 2.8.4 extends its package over sys.path so that FA4 (which installs
    ``flash_attn/cute`` only) may sit in another site directory: FA4 is present there
    before anything imports ``flash_attn`` (session 42's audit: it was missed)."""
    fa2_site, fa4_site = tmp_path / "a", tmp_path / "b"
    (fa2_site / "flash_attn").mkdir(parents=True)
    (fa2_site / "flash_attn" / "__init__.py").write_text(
        "from pkgutil import extend_path\n__path__ = extend_path(__path__, __name__)\n"
        "__version__ = '2.8.4'\n")
    (fa4_site / "flash_attn" / "cute").mkdir(parents=True)
    (fa4_site / "flash_attn" / "cute" / "__init__.py").write_text("")
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    # the machine's own flash-attn (a GPU machine with FA4 installed) must not answer
    others = [entry for entry in sys.path if not (Path(entry or ".") / "flash_attn").exists()]
    monkeypatch.setattr(sys, "path", [str(fa2_site), str(fa4_site)] + others)
    assert probe_mod._flash_attn_layout() == (True, True)
    (fa4_site / "flash_attn" / "cute" / "__init__.py").unlink()
    assert probe_mod._flash_attn_layout() == (True, False)

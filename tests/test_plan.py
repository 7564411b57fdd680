"""Plan once, run cheaply (:mod:`portattn.planning`) on the CPU.

* One plan serves every layer (distinct caches, distinct per-layer sinks), checked once,
  results against the float64 oracle under ``TRITON_INTERPRET=1``; ``attention`` does the
  same through its memo.
* No cache (nor metadata) is kept alive by a module-level memo once the caller drops it.
* Threads calling ``attention`` and ``plan.run`` at once.
* The custom op (torch.compile) reuses the plans of eager calls.
* Bad input: InputError naming the argument, from ``plan`` and from ``run``.
* Length hints: recorded, checked on request, bounded on the host for free; an understated
  ``max_seqlen_q`` never leaves stale rows (the kernel writes those rows NaN).
* The triton_unified runner's fallback when launches cannot be replayed.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import weakref

import pytest
import torch

import portattn
from portattn import AttentionMetadata, InputError, KVQuant, PagedKVCache, planning
from portattn.backends.base import Backend, Plan
from portattn.dispatch import registry
from portattn.testing import dense_attention, make_paged_batch, relative_error

F16, F32 = torch.float16, torch.float32
TOLERANCE = {F16: 3e-3, F32: 2e-5}
interp = pytest.mark.interpreter
SCALES = (1.0, -0.5, 1.5)  # layer l's K and V are layer 0's times SCALES[l]


def _layers(batch, count=3, seed=1):
    """Per layer: a cache with the structure of ``batch.cache`` (same blocks, scaled K/V),
    a fresh q and sinks, and the oracle's inputs."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(count):
        s = SCALES[i % len(SCALES)]
        cache = PagedKVCache(batch.cache.key_cache * s, batch.cache.value_cache * s)
        q = torch.randn(batch.q.shape, generator=gen).to(batch.q.dtype)
        sinks = torch.randn(batch.q.shape[1], generator=gen)
        layers.append((q, cache, sinks, [k * s for k in batch.keys],
                       [v * s for v in batch.values]))
    return layers


def _expected(batch, q, keys, values, **options):
    return dense_attention(q, keys, values, batch.query_lens, **options)


@pytest.fixture(autouse=True)
def fresh_plans():
    planning.clear()
    yield
    planning.clear()


CASES = {  # query lens, seq lens, group, environment
    "decode": ([1, 1], [21, 7], 2, {}),
    "decode-split": ([1, 2], [300, 9], 2, {"PORTATTN_UNIFIED_SPLIT": "1"}),
    "mixed": ([1, 20], [9, 33], 4, {}),
}


@interp
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("case", list(CASES))
def test_one_plan_serves_every_layer(case, dtype, monkeypatch):
    query_lens, seq_lens, group, env = CASES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    batch = make_paged_batch(query_lens, seq_lens, num_q_heads=2 * group, num_kv_heads=2,
                             head_size=32, dtype=dtype)
    plan = portattn.plan(batch.metadata, num_q_heads=2 * group, dtype=dtype,
                         cache=batch.cache, sinks=True, backend="triton_unified",
                         validate=False)
    assert plan.backend == "triton_unified"
    assert plan.variant.startswith({"decode": "decode-2d", "decode-split": "decode-3d",
                                    "mixed": "mixed"}[case])
    checked = planning.stats["checked"]
    for q, cache, sinks, keys, values in _layers(batch):
        out = torch.full_like(q, math.nan)
        assert plan.run(q, cache, out, sinks=sinks) is out
        expected = _expected(batch, q, keys, values, sinks=sinks)
        assert relative_error(out, expected) < TOLERANCE[dtype]
    assert planning.stats["checked"] == checked + 1  # the first layer only
    assert len(plan._accepted) == 1


@interp
def test_attention_checks_once_for_every_layer():
    batch = make_paged_batch([1, 3], [17, 12], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=F32)
    checked, made = planning.stats["checked"], planning.stats["bodies"]
    for q, cache, sinks, keys, values in _layers(batch, count=4):
        out = portattn.attention(q, cache, batch.metadata, sinks=sinks, sliding_window=5,
                                 backend="triton_unified", validate=False)
        expected = _expected(batch, q, keys, values, sinks=sinks, sliding_window=5)
        assert relative_error(out, expected) < TOLERANCE[F32]
    assert planning.stats["checked"] == checked + 1
    assert planning.stats["bodies"] == made + 1
    assert len(planning.memo) == 1


def test_a_body_decided_across_a_forget_is_not_kept(doubling, monkeypatch):
    """``probe(refresh=True)`` in another thread forgets bodies and memo entries while a
    call is deciding: that call is served by the body it made, but neither the body nor
    the call's memo entry is kept (they may come from the replaced capabilities); the
    next call decides again, and is then remembered."""
    from portattn.capabilities.cache import forget_decisions

    original, forgets = planning.decide, []

    def deciding_while_another_thread_forgets(*args, **kwargs):
        decision = original(*args, **kwargs)
        if not forgets:
            forgets.append(1)
            forget_decisions()  # as probe(refresh=True) in another thread
        return decision

    monkeypatch.setattr(planning, "decide", deciding_while_another_thread_forgets)
    batch = make_paged_batch([1, 2], [9, 12], num_q_heads=4, num_kv_heads=2, head_size=16,
                             dtype=F32)
    made = planning.stats["bodies"]
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="doubling",
                             validate=False)
    assert torch.equal(out, batch.q * 2) and forgets == [1]
    assert planning.cache_info()["bodies"] == 0 and len(planning.memo) == 0
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="doubling",
                             validate=False)
    assert torch.equal(out, batch.q * 2)
    assert planning.stats["bodies"] == made + 2  # decided again: nothing stale served
    assert planning.cache_info()["bodies"] == 1 and len(planning.memo) == 1


class Doubling(Backend):
    """Test double: out = 2 q (head sizes equal), so each caller can check its own result."""

    name = "doubling"
    summary = "test double"

    def why_not(self, problem, caps):
        return []

    def plan(self, problem, caps):
        return Plan(self.name, "x2")

    def run(self, q, cache, metadata, options, out, plan):
        out.copy_(q * 2)


@pytest.fixture
def doubling(monkeypatch):
    module = type(sys)("portattn_test_doubling")
    module.Doubling = Doubling
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry.BACKENDS, "doubling", f"{module.__name__}:Doubling")
    registry.reset()
    yield
    registry.reset()


def test_no_cache_or_metadata_is_kept_alive(doubling):
    batch = make_paged_batch([1, 1], [9, 5], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=F32)
    m = batch.metadata
    metadata = AttentionMetadata(m.cu_seqlens_q.clone(), m.seq_lens.clone(),
                                 m.block_table.clone(), m.max_seqlen_q, m.max_seqlen_k)
    caches = [PagedKVCache(batch.cache.key_cache.clone(), batch.cache.value_cache.clone())
              for _ in range(3)]
    refs = [weakref.ref(t) for c in caches for t in (c, c.key_cache, c.value_cache)]
    plan = portattn.plan(metadata, num_q_heads=4, dtype=F32, cache=caches[0],
                         backend="doubling", validate=False)
    for cache in caches:
        assert torch.equal(portattn.attention(batch.q, cache, metadata, backend="doubling",
                                              validate=False), batch.q * 2)
        assert torch.equal(plan.run(batch.q, cache), batch.q * 2)
    assert len(planning.memo) == 1
    reassigned = caches[0]  # a tensor replaced in a live cache is not kept either
    old_key = weakref.ref(reassigned.key_cache)
    reassigned.key_cache = reassigned.key_cache.clone()
    gc.collect()
    assert old_key() is None
    assert torch.equal(plan.run(batch.q, reassigned), batch.q * 2)
    del caches, cache, reassigned
    gc.collect()
    assert [r() for r in refs if r() is not None] == []
    # the plan holds its metadata; the memo forgets it once its tensors go
    meta_ref = weakref.ref(metadata.seq_lens)
    del metadata
    gc.collect()
    assert meta_ref() is not None and len(planning.memo) == 1
    del plan
    gc.collect()
    assert meta_ref() is None and len(planning.memo) == 0


@interp
def test_threads_share_plans(doubling):
    """Interpreted kernels in four threads (attention and plan.run, distinct caches), plus
    a stress of the memo with the test double in eight threads."""
    from thread_errors import errors_in_threads

    batch = make_paged_batch([1, 2], [13, 6], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=F32)
    layers = _layers(batch, count=4)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=F32, cache=batch.cache,
                         backend="triton_unified", validate=False)
    results: dict = {}

    def kernels(k):
        q, cache, _, keys, values = layers[k]
        for i in range(2):
            if (k + i) % 2:
                out = plan.run(q, cache)
            else:
                out = portattn.attention(q, cache, batch.metadata,
                                         backend="triton_unified", validate=False)
            results[k, i] = relative_error(out, _expected(batch, q, keys, values))

    assert not errors_in_threads(kernels, 4)
    assert len(results) == 8 and max(results.values()) < TOLERANCE[F32]

    metas = [make_paged_batch([1] * n, [5] * n, num_q_heads=4, num_kv_heads=2,
                              head_size=32, dtype=F32, seed=n).metadata for n in (1, 2, 3)]
    planning.memo.capacity = 2
    try:
        def stress(k):
            for i in range(300):
                meta = metas[(k + i) % 3]
                q = torch.randn(meta.seq_lens.shape[0], 4, 32)
                out = portattn.attention(q, batch.cache, meta, backend="doubling",
                                         validate=False)
                assert torch.equal(out, q * 2)

        assert not errors_in_threads(stress, 8)
        assert len(planning.memo) <= 2
    finally:
        planning.memo.capacity = planning.METADATA_CAPACITY


@interp
def test_custom_op_reuses_plans():
    batch = make_paged_batch([1, 2], [11, 6], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=F32)
    metadata = AttentionMetadata(*(getattr(batch.metadata, n) for n in
                                   ("cu_seqlens_q", "seq_lens", "block_table",
                                    "max_seqlen_q", "max_seqlen_k")))
    layers = _layers(batch, count=3)

    def model(qs, caches, sinks, metadata):
        return [portattn.attention(q * 1.0, c, metadata, sinks=s, backend="triton_unified",
                                   validate=False)
                for q, c, s in zip(qs, caches, sinks)]

    qs, caches, sinks = ([layer[i] for layer in layers] for i in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(3):
        outs = compiled(qs, caches, sinks, metadata)
        if step == 0:
            checked = planning.stats["checked"]
    assert planning.stats["checked"] == checked  # later steps: no checks, no planning
    for out, (q, _, s, keys, values) in zip(outs, layers):
        assert relative_error(out, _expected(batch, q, keys, values, sinks=s)) < 2e-5


@pytest.mark.parametrize("into_out", [False, True])
@pytest.mark.parametrize("dynamic", [True, None])
def test_plan_run_compiles_over_a_plan_per_step(dynamic, into_out):
    """A plan per step (token count and hints change) under torch.compile, symbolic shapes
    included: the traced checks compare the plan field by field (a dataclass compare of
    symbolic hints crashed Dynamo: session 41's audit). ``into_out``: ``run(q, cache,
    out)``, whose traced check of ``out`` ordered its strides, symbolic under
    ``dynamic=True`` (Dynamo: "sort with non-constant keys"; session 43's audit of the
    compile path); a bad ``out`` is still named (by the op's eager body)."""
    def step(plan, q, cache, out):
        return plan.run(q, cache, out)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for i in range(3):
        batch = make_paged_batch([1, 1 + i], [9 + i, 20 + i], num_q_heads=4, num_kv_heads=2,
                                 head_size=32, dtype=F32, seed=i)
        plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=F32, cache=batch.cache)
        out = torch.full_like(batch.q, float("nan")) if into_out else None
        got = compiled(plan, batch.q, batch.cache, out)
        assert out is None or got is out
        want = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
        assert relative_error(got, want) < 2e-5
    if into_out:
        overlapping = torch.empty(1, 4, 32).expand(batch.q.shape)  # every token one row
        torch._dynamo.reset()
        with pytest.raises(InputError, match="^out: expected a tensor whose elements cannot"):
            torch.compile(step, backend="aot_eager", dynamic=dynamic)(
                plan, batch.q, batch.cache, overlapping)
    torch._dynamo.reset()


def test_a_compiled_plan_run_decides_under_the_plans_environment(doubling, monkeypatch):
    """``PORTATTN_*`` variables are read when a plan is made: after PORTATTN_BACKEND
    changes, the compiled run keeps the plan's backend as the eager run does (it ran the
    new one: session 41's audit), while attention() follows the variable."""
    monkeypatch.delenv("PORTATTN_BACKEND", raising=False)
    batch = make_paged_batch([1, 3], [9, 20], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=F32)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=F32, cache=batch.cache)
    assert plan.backend == "torch_ref"

    def layer(q, cache):
        return plan.run(q, cache)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    want = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    assert relative_error(compiled(batch.q, batch.cache), want) < 2e-5
    monkeypatch.setenv("PORTATTN_BACKEND", "doubling")
    for run in (layer, compiled):
        assert relative_error(run(batch.q, batch.cache), want) < 2e-5
    assert torch.equal(portattn.attention(batch.q, batch.cache, batch.metadata), batch.q * 2)


# --------------------------------------------------------------------------- errors


@pytest.fixture
def small():
    return make_paged_batch([1, 2], [9, 6], num_q_heads=4, num_kv_heads=2, head_size=32,
                            dtype=F32)


def test_plan_names_bad_arguments(small):
    m = small.metadata
    cases = [
        (dict(num_q_heads=0, dtype=F32, cache=small.cache), "num_q_heads"),
        (dict(num_q_heads=4, dtype="fp32", cache=small.cache), "dtype"),
        (dict(num_q_heads=4, dtype=F32, cache=small.cache, block_size=16), "block_size"),
        (dict(num_q_heads=4, dtype=F32), "num_kv_heads"),
        (dict(num_q_heads=4, dtype=F32, num_kv_heads=2, head_size_qk=32), "block_size"),
        (dict(num_q_heads=4, dtype=F32, cache=small.cache, alibi="cubic"), "alibi"),
        # sqrt(p - k) needs causal: plan() has no alibi_sqrt (session 41's audit)
        (dict(num_q_heads=4, dtype=F32, cache=small.cache, alibi="sqrt", causal=False),
         "alibi"),
        (dict(num_q_heads=4, dtype=F32, cache=small.cache, sinks=1), "sinks"),
        (dict(num_q_heads=3, dtype=F32, cache=small.cache), "num_q_heads"),
        (dict(num_q_heads=3, dtype=F32, num_kv_heads=2, head_size_qk=32, block_size=16),
         "num_q_heads"),
        (dict(num_q_heads=4, dtype=F16, cache=small.cache), "cache"),
        (dict(num_q_heads=4, dtype=F32, cache=small.cache, sliding_window=0), "sliding_window"),
        (dict(num_q_heads=4, dtype=F32, cache=small.cache, kv_quant="fp8"), "kv_quant"),
        (dict(num_q_heads=4, dtype=F32, num_kv_heads=2, head_size_qk=32, block_size=16,
              kv_quant="fp8"), "kv_quant"),
        # checks of the stand-ins plan() builds name the argument that made them
        (dict(num_q_heads=4, dtype=torch.float64, cache=small.cache), "dtype"),
        (dict(num_q_heads=4, dtype=torch.float64, num_kv_heads=2, head_size_qk=32,
              block_size=16), "dtype"),
        (dict(num_q_heads=4, dtype=F32, num_kv_heads=2, head_size_qk=32, block_size=16,
              kv_dtype=torch.int8), "kv_dtype"),
        (dict(num_q_heads=4, dtype=F32, num_kv_heads=2, head_size_qk=32, block_size=16,
              kv_dtype=F16), "kv_dtype"),
        (dict(num_q_heads=4, dtype=F32, cache=small.cache, out_dtype=torch.int32),
         "out_dtype"),
    ]
    for kwargs, argument in cases:
        with pytest.raises(InputError) as info:
            portattn.plan(m, **kwargs)
        assert info.value.argument == argument, (kwargs, str(info.value))
    with pytest.raises(InputError, match="^metadata:"):
        portattn.plan("metadata", num_q_heads=4, dtype=F32, cache=small.cache)
    on_meta = AttentionMetadata(*(t.to("meta") for t in (m.cu_seqlens_q, m.seq_lens,
                                                          m.block_table)), 2, 9)
    with pytest.raises(InputError, match="^metadata.seq_lens: expected a tensor holding"):
        portattn.plan(on_meta, num_q_heads=4, dtype=F32, num_kv_heads=2, head_size_qk=32,
                      block_size=16)


def test_plan_names_a_template_changed_after_its_constructor(small):
    """A template cache whose attributes were reassigned after the constructor is checked
    by plan() as run() checks a layer's (``cache.<attribute>``): plan() raised IndexError
    for 3-D keys, AttributeError for a quant that is not a KVQuant, and planned block 8
    from keys of block 8 beside values of block 16 (found by the plan/run API audit)."""
    cases = [("key_cache", lambda c: c.key_cache[0], "cache.key_cache"),
             ("quant", lambda c: "fp8", "cache.quant"),
             ("key_cache", lambda c: c.key_cache[:, :8], "cache.value_cache")]
    for attribute, changed, argument in cases:
        template = PagedKVCache(small.cache.key_cache, small.cache.value_cache)
        setattr(template, attribute, changed(template))
        with pytest.raises(InputError) as info:
            portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=template)
        assert info.value.argument == argument, str(info.value)


def test_plan_from_a_description_equals_plan_from_a_template(small):
    a = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=small.cache)
    b = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, num_kv_heads=2,
                      head_size_qk=32, block_size=16)
    assert a.problem == b.problem and a._body is b._body  # one body, shared
    assert "triton_unified" in repr(a) or "torch_ref" in repr(a)


def test_run_names_arguments_that_do_not_fit_the_plan(small, doubling):
    plan = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=small.cache,
                         sinks=True, backend="doubling", validate=False)
    q, sinks = small.q, torch.zeros(4)
    other_blocks = PagedKVCache.allocate(8, 8, 2, 32, dtype=F32)
    cases = [
        (dict(q=q.half(), cache=small.cache, sinks=sinks), "q"),
        (dict(q=q[:, :2], cache=small.cache, sinks=sinks), "q"),
        (dict(q="q", cache=small.cache, sinks=sinks), "q"),
        (dict(q=q, cache=other_blocks, sinks=sinks), "cache"),
        (dict(q=q, cache=small.cache.key_cache, sinks=sinks), "cache"),
        (dict(q=q, cache=small.cache), "sinks"),
        (dict(q=q, cache=small.cache, sinks=torch.zeros(3)), "sinks"),
        (dict(q=q, cache=small.cache, sinks=sinks, alibi_slopes=torch.zeros(4)),
         "alibi_slopes"),
        (dict(q=q, cache=small.cache, sinks=sinks, out=torch.empty(3, 4, 32, dtype=F16)),
         "out"),
    ]
    other_heads = PagedKVCache.allocate(8, 8, 1, 32, dtype=F32)
    other_size = PagedKVCache.allocate(8, 8, 2, 64, dtype=F32)
    cases += [  # q fits the plan, the cache does not: the cache is named (session 41)
        (dict(q=q, cache=other_heads, sinks=sinks), "cache"),
        (dict(q=q, cache=other_size, sinks=sinks), "cache"),
    ]
    for kwargs, argument in cases:
        with pytest.raises(InputError) as info:
            plan.run(**kwargs)
        assert info.value.argument == argument, (kwargs, str(info.value))
    assert torch.equal(plan.run(q, small.cache, sinks=sinks), q * 2)
    flat_keys = PagedKVCache(small.cache.key_cache, small.cache.value_cache)
    flat_keys.key_cache = flat_keys.key_cache[0]  # reassigned after the constructor
    with pytest.raises(InputError, match="^cache.key_cache: expected a 4-D"):
        plan.run(q, flat_keys, sinks=sinks)
    for alibi in ("linear", "sqrt"):  # a planned ALiBi without its slopes names them
        planned = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=small.cache,
                                alibi=alibi, backend="doubling", validate=False)
        with pytest.raises(InputError, match=f"^alibi_slopes: expected ALiBi {alibi} "):
            planned.run(q, small.cache)


# --------------------------------------------------------------------------- hints


def _understated(batch, max_q, max_k):
    m = batch.metadata
    return AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table, max_q, max_k)


def test_plans_record_hints_and_check_them_on_request(small, doubling):
    plan = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=small.cache,
                         backend="doubling")
    assert (plan.max_seqlen_q, plan.max_seqlen_k) == (2, 9)
    lazy = AttentionMetadata(small.metadata.cu_seqlens_q, small.metadata.seq_lens,
                             small.metadata.block_table)  # no hints: read once, by plan()
    assert portattn.plan(lazy, num_q_heads=4, dtype=F32, cache=small.cache,
                         backend="doubling").max_seqlen_k == 9
    low = portattn.plan(_understated(small, 2, 8), num_q_heads=4, dtype=F32,
                        cache=small.cache, backend="doubling", validate=False)
    low.run(small.q, small.cache)  # not checked: the caller said so
    with pytest.raises(InputError, match="^metadata.max_seqlen_k"):
        low.run(small.q, small.cache, validate=True)


def test_hints_below_what_the_token_count_allows_are_refused_without_a_sync(small,
                                                                            doubling):
    # 3 query tokens in 2 sequences: some sequence has >= 2 queries and >= 2 keys
    for max_q, max_k, argument in ((1, 9, "metadata.max_seqlen_q"),
                                   (2, 1, "metadata.max_seqlen_k")):
        metadata = _understated(small, max_q, max_k)
        with pytest.raises(InputError) as info:
            portattn.attention(small.q, small.cache, metadata, backend="doubling",
                               validate=False)
        assert info.value.argument == argument
        plan = portattn.plan(metadata, num_q_heads=4, dtype=F32, cache=small.cache,
                             backend="doubling", validate=False)
        with pytest.raises(InputError) as info:
            plan.run(small.q, small.cache)
        assert info.value.argument == argument


@interp
def test_understated_max_seqlen_q_never_leaves_stale_rows():
    # group 4: decode tiles of 16 rows hold 4 queries; the second sequence has 6. The
    # host bound passes (7 tokens <= 2 sequences x 4), so only the kernel can tell.
    batch = make_paged_batch([1, 6], [10, 12], num_q_heads=8, num_kv_heads=2,
                             head_size=32, dtype=F32)
    metadata = _understated(batch, 4, 12)
    stale = torch.full_like(batch.q, 7.0)  # finite: the long sequence's NaN must be written
    out = portattn.attention(batch.q, batch.cache, metadata, out=stale,
                             backend="triton_unified", validate=False)
    assert torch.isnan(out[1:]).all(), "rows of the long sequence kept stale values"
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    assert relative_error(out[:1], expected[:1]) < 2e-5


@interp
def test_understated_max_seqlen_q_is_an_error_when_validating():
    batch = make_paged_batch([1, 6], [10, 12], num_q_heads=8, num_kv_heads=2,
                             head_size=32, dtype=F32)
    with pytest.raises(InputError, match="^metadata.max_seqlen_q"):
        portattn.attention(batch.q, batch.cache, _understated(batch, 4, 12),
                           backend="triton_unified", validate=True)


# --------------------------------------------------------------------------- runner


@interp
def test_runner_falls_back_when_launches_cannot_be_replayed(caplog):
    """Under the interpreter nothing compiled exists: forcing replay on records the call,
    finds it unusable (once, logged) and keeps the normal path, with correct results."""
    batch = make_paged_batch([1, 1], [15, 4], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=F32)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=F32, cache=batch.cache,
                         backend="triton_unified", validate=False)
    runner = plan._body.runner
    assert not runner.replay  # CPU: the plain path
    runner.replay = True
    caplog.set_level(logging.WARNING, logger="portattn")
    for q, cache, _, keys, values in _layers(batch, count=3):
        out = plan.run(q, cache)
        assert relative_error(out, _expected(batch, q, keys, values)) < TOLERANCE[F32]
    slot = next(iter(plan._accepted.values()))
    assert slot.reason and "cannot be counted" in slot.reason
    assert sum("go through Triton's JIT" in r.message for r in caplog.records) == 1


def test_staged_prefills_share_one_bounded_buffer_per_stream_and_thread(monkeypatch):
    """A staged prefill's workspace (sized per call) comes from one buffer per (GPU,
    stream, thread), shared by every runner and grown to the largest call, up to
    ``STAGING_KEEP_BYTES``; larger calls get a buffer of their own each time; other
    streams and other threads (whose launches may interleave with this thread's on one
    stream) get other buffers; ``planning.clear`` drops them."""
    import threading

    from portattn.backends import unified_runner as ur

    planning.clear()
    monkeypatch.setattr(ur, "STAGING_KEEP_BYTES", 4096 * 4)
    dev = torch.device("cpu")
    small = ur.staging_buffer(dev, 1, 1000)
    seen_by_thread: list = []
    worker = threading.Thread(
        target=lambda: seen_by_thread.append(ur.staging_buffer(dev, 1, 1000)))
    worker.start()
    worker.join()
    assert seen_by_thread[0].data_ptr() != small.data_ptr()
    seen_by_thread.clear()
    assert small.numel() >= 1000 and small.dtype == torch.float32
    assert ur.staging_buffer(dev, 1, 800) is small  # reused by a smaller call
    grown = ur.staging_buffer(dev, 1, 3000)
    assert grown is not small and grown.numel() >= 3000
    assert ur.staging_buffer(dev, 1, 1000) is grown
    other_stream = ur.staging_buffer(dev, 2, 1000)
    assert other_stream.data_ptr() != grown.data_ptr()
    big = ur.staging_buffer(dev, 1, 5000)  # above the cap: a fresh one, not kept
    assert big.numel() >= 5000 and ur.staging_buffer(dev, 1, 5000) is not big
    assert ur.staging_buffer(dev, 1, 1000) is grown
    held = weakref.ref(grown)
    del grown, small, other_stream, big
    planning.clear()
    gc.collect()
    assert held() is None


def test_every_workspace_starts_with_zeroed_merge_tickets(monkeypatch):
    """Workspaces (a runner's split-KV ones, the shared staging buffers, grown ones, the
    per-call ones above the cap) begin with ``launch.MERGE_TICKETS`` int32 tickets at
    zero, which split launches merging in the kernel count on, and hold the data asked
    for after them."""
    from portattn.backends import unified_runner as ur
    from portattn.kernels import launch

    planning.clear()
    monkeypatch.setattr(ur, "STAGING_KEEP_BYTES", 4096 * 4)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(
        float("nan")))  # no zeros by luck
    dev = torch.device("cpu")
    spaces = [ur.staging_buffer(dev, 1, 1000), ur.staging_buffer(dev, 1, 3000),
              ur.staging_buffer(dev, 1, 5000), ur.Workspaces().take("k", 700, dev)]
    for ws, data in zip(spaces, (1000, 3000, 5000, 700)):
        assert launch.has_room(ws, data) and not launch.has_room(ws, ws.numel())
        assert not ws[:launch.MERGE_TICKETS].view(torch.int32).any()
    planning.clear()


@interp  # forces triton_unified on CPU tensors
def test_split_workspaces_are_per_stream_and_thread(monkeypatch):
    """A runner's split-KV workspace is shared by one thread's calls on one stream (its
    kernel and merge are queued back to back) and never by two threads, whose launches
    may interleave on a shared stream."""
    import threading

    monkeypatch.setenv("PORTATTN_UNIFIED_SPLIT", "1")
    planning.clear()
    batch = make_paged_batch([1, 2], [300, 9], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=torch.float16)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float16,
                         cache=batch.cache, backend="triton_unified", validate=False)
    runner = plan._body.runner
    assert runner.workspace_size and not runner.workspace_per_call
    mine = runner._workspace_on(7, 3)
    assert runner._workspace_on(7, 3) is mine
    assert runner._workspace_on(8, 3) is not mine
    theirs: list = []
    worker = threading.Thread(target=lambda: theirs.append(runner._workspace_on(7, 3)))
    worker.start()
    worker.join()
    assert theirs[0].data_ptr() != mine.data_ptr()
    assert runner._workspace_on(7, 3) is mine


def test_a_plan_takes_its_templates_slot_layout_and_serves_either():
    """``Problem.kv_rows`` comes from the template cache (the stand-in is an expanded
    vector); a layer whose cache has the other layout is served, not refused (the launch
    checks its tensors and stages where the Gluon prefill cannot read rows)."""
    batch = make_paged_batch([3, 1], [20, 9], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=torch.float32)
    blocks = batch.cache.key_cache.shape[0]
    packed = PagedKVCache.allocate(blocks, 16, 2, 32, dtype=torch.float32, layout="packed")
    packed.key_cache.copy_(batch.cache.key_cache)
    packed.value_cache.copy_(batch.cache.value_cache)
    planned = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float32,
                            cache=packed)
    assert planned.problem.kv_rows is False
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float32,
                         cache=batch.cache)
    assert plan.problem.kv_rows is True
    described = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float32,
                              num_kv_heads=2, head_size_qk=32, block_size=16)
    assert described.problem.kv_rows is True
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    for p in (plan, planned, described):
        for cache in (batch.cache, packed):
            assert relative_error(p.run(batch.q, cache), expected) < 1e-5


# --------------------------------------------------------------------------- audit findings
def test_a_plan_allocates_its_planned_output_dtype(small):
    m = small.metadata
    want = dense_attention(small.q, small.keys, small.values, small.query_lens)
    for out_dtype, tol in ((torch.float16, 3e-3), (torch.bfloat16, 1e-2)):
        plan = portattn.plan(m, num_q_heads=4, dtype=F32, cache=small.cache,
                             out_dtype=out_dtype)
        out = plan.run(small.q, small.cache)
        assert out.dtype == out_dtype
        assert relative_error(out, want) < tol
        with pytest.raises(InputError, match="^output_scale: expected None for the planned"):
            plan.run(small.q, small.cache, output_scale=1.0)
    plan = portattn.plan(m, num_q_heads=4, dtype=F32, cache=small.cache,
                         out_dtype=torch.float8_e5m2)
    out = plan.run(small.q, small.cache, output_scale=0.5)
    assert out.dtype == torch.float8_e5m2
    # out = result / output_scale at e5m2 precision (2 mantissa bits: up to 1/8 per value)
    assert relative_error(out.float(), want / 0.5) < 0.1


def test_a_plan_serves_packed_and_split_caches_alike():
    """Whether K and V are views of one tensor is no backend's decision: a plan made
    from either layout runs on the other."""
    split = make_paged_batch([1, 2], [9, 6], num_q_heads=4, num_kv_heads=2, head_size=32,
                             dtype=F32)
    packed = make_paged_batch([1, 2], [9, 6], num_q_heads=4, num_kv_heads=2, head_size=32,
                              dtype=F32, layout="diffkv")
    assert packed.cache.packed and not split.cache.packed
    for template, batch in ((split, packed), (packed, split)):
        plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=F32, cache=template.cache)
        out = plan.run(batch.q, batch.cache)
        want = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
        assert relative_error(out, want) < 2e-5
    described = portattn.plan(packed.metadata, num_q_heads=4, dtype=F32, num_kv_heads=2,
                              head_size_qk=32, block_size=16)
    assert relative_error(described.run(packed.q, packed.cache),
                          dense_attention(packed.q, packed.keys, packed.values,
                                          packed.query_lens)) < 2e-5


def test_a_described_plan_takes_kv_dtype_with_its_quant(small):
    common = dict(num_q_heads=4, dtype=F32, num_kv_heads=2, head_size_qk=32, block_size=16)
    plan = portattn.plan(small.metadata, kv_dtype=torch.float8_e5m2,
                         kv_quant=KVQuant.fp8_per_tensor(1.0, 1.0), **common)
    assert plan.problem.kv_dtype == torch.float8_e5m2
    with pytest.raises(InputError, match="^kv_dtype: expected None or torch.int8"):
        portattn.plan(small.metadata, kv_dtype=torch.float16,
                      kv_quant=KVQuant.int8_per_token_head(), **common)


def test_a_used_cache_still_pickles(small):
    import io
    import pickle

    portattn.attention(small.q, small.cache, small.metadata)
    plan = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=small.cache)
    plan.run(small.q, small.cache)
    copy = pickle.loads(pickle.dumps(small.cache))
    assert torch.equal(copy.key_cache.view(torch.int32), small.cache.key_cache.view(torch.int32))
    buffer = io.BytesIO()
    torch.save(small.cache, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    out = portattn.attention(small.q, loaded, small.metadata)
    assert torch.equal(out, portattn.attention(small.q, small.cache, small.metadata))


def test_plan_run_under_torch_compile_is_one_graph(small):
    """``run`` becomes the custom op while Dynamo traces (the plan's options, backend and
    hints): no graph break, the eager numbers."""
    plan = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=small.cache,
                         sinks=True)
    sinks = torch.randn(4)

    def layer(q, cache, sinks):
        return plan.run(q * 1.0, cache, sinks=sinks)

    eager = layer(small.q, small.cache, sinks)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(small.q, small.cache, sinks)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()
    bodies = len(planning.bodies.entries)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(small.q, small.cache, sinks), eager)
    assert len(planning.bodies.entries) == bodies  # the op found the plan's body


def test_plan_run_into_out_under_torch_compile_is_one_graph(small):
    """``run(q, cache, out)`` while Dynamo traces: the check that ``out`` shares no
    element with q reads no address of a fake tensor (no graph break; the op's eager body
    checks the real tensors); the eager numbers land in ``out``."""
    plan = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=small.cache)

    def layer(q, cache, out):
        return plan.run(q * 1.0, cache, out)

    eager = layer(small.q, small.cache, torch.empty_like(small.q))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(small.q, small.cache, torch.empty_like(small.q))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()
    out = torch.full_like(small.q, float("nan"))
    torch.compile(layer, fullgraph=True, backend="aot_eager")(small.q, small.cache, out)
    assert torch.equal(out, eager)


def test_plan_run_with_a_cpu_scale_tensor_under_torch_compile(small):
    """A CPU tensor ``output_scale`` (the one a CPU call takes) while Dynamo traces: the
    eager check reads its value, which a fake tensor does not have (Dynamo raised a
    data-dependent guard error under fullgraph); the op's eager body checks it. Found by
    session 43's audit of the compile path."""
    plan = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=small.cache,
                         out_dtype=torch.float8_e4m3fn)

    def layer(q, cache, output_scale):
        return plan.run(q, cache, output_scale=output_scale)

    scale = torch.tensor(0.5)
    eager = layer(small.q, small.cache, scale)
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(small.q, small.cache,
                                                                     scale)
    assert got.dtype == torch.float8_e4m3fn and torch.equal(got.float(), eager.float())
    want = dense_attention(small.q, small.keys, small.values, small.query_lens)
    # out = result / output_scale at e4m3 precision (3 mantissa bits: up to 1/16 per value)
    assert relative_error(got.float(), want / 0.5) < 0.07
    # and the value is still checked: by the op's eager body, as eagerly
    with pytest.raises(InputError, match="^output_scale: expected a finite positive"):
        torch.compile(layer, backend="aot_eager")(small.q, small.cache, torch.tensor(-1.0))
    torch._dynamo.reset()


def test_a_traced_run_is_checked_against_its_plan(small):
    """While Dynamo traces, a call that does not fit the plan raises as it does eagerly
    (a plan with sinks run without them; an out of another dtype). Under fullgraph
    Dynamo reports any raise as its own error; without it the InputError comes through."""
    plan = portattn.plan(small.metadata, num_q_heads=4, dtype=F32, cache=small.cache,
                         sinks=True)
    cases = [(lambda q, c: plan.run(q * 1.0, c), "sinks"),
             (lambda q, c: plan.run(q * 1.0, c, torch.empty(3, 4, 32, dtype=torch.bfloat16),
                                    sinks=torch.zeros(4)), "out")]
    for layer, name in cases:
        torch._dynamo.reset()
        with pytest.raises(InputError) as info:
            torch.compile(layer, backend="eager")(small.q, small.cache)
        assert info.value.argument == name


def test_results_carry_no_gradient(small):
    q = small.q.clone().requires_grad_(True)
    assert not portattn.attention(q, small.cache, small.metadata).requires_grad


def test_plan_run_names_bad_metadata_values_as_attention_does(small):
    """With value checks on, the metadata's values are checked before the free hint
    bounds, whose message can only guess: both entry points name the same argument."""
    m = small.metadata
    q = torch.cat([small.q, small.q, small.q[:1]])  # 7 tokens for a batch of 3
    for metadata, name in ((m, "metadata.cu_seqlens_q"),
                           (AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table,
                                              m.max_seqlen_q, 2), "metadata.max_seqlen_k")):
        plan = portattn.plan(metadata, num_q_heads=4, dtype=F32, cache=small.cache)
        call_q = q if name.endswith("cu_seqlens_q") else small.q
        with pytest.raises(InputError) as planned:
            plan.run(call_q, small.cache, validate=True)
        with pytest.raises(InputError) as direct:
            portattn.attention(call_q, small.cache, metadata, validate=True)
        assert planned.value.argument == direct.value.argument == name

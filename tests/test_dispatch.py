"""The dispatcher: forced backends, error texts, the decision cache, explain, the lazy
registry, and the custom op under torch.compile."""

import copy
import json
import pickle

import pytest
import torch

import portattn
from portattn import InputError, UnsupportedError, planning
from portattn.backends.base import Backend, Plan
from portattn.capabilities import probe
from portattn.dispatch import Problem, decide, decision_cache, registry
from portattn.dispatch.selector import forced_backend
from portattn.testing import dense_attention, make_paged_batch, relative_error
from thread_errors import errors_in_threads


class PickyBackend(Backend):
    """Serves fp32 only; records how often it is asked and run."""

    name = "picky"
    summary = "test double"
    calls = 0

    def why_not(self, problem, caps):
        type(self).calls += 1
        return [] if problem.q_dtype == torch.float32 else ["picky serves float32 only"]

    def plan(self, problem, caps):
        return Plan(self.name, "only", {"seen_q_len": problem.max_seqlen_q})

    def run(self, q, cache, metadata, options, out, plan):
        out.fill_(42.0)


@pytest.fixture
def with_picky(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "picky", f"{__name__}:PickyBackend")
    monkeypatch.setitem(registry.BACKENDS, "broken", "portattn.no_such_module:Nothing")
    registry.reset()
    decision_cache.clear()
    PickyBackend.calls = 0
    yield
    registry.reset()
    decision_cache.clear()


@pytest.fixture
def batch():
    return make_paged_batch([2, 1], [9, 30], num_q_heads=4, num_kv_heads=2, head_size=32,
                            dtype=torch.float32)


def test_forced_backend_by_argument_and_environment(with_picky, batch, monkeypatch):
    out = portattn.attention(batch.q, batch.cache, batch.metadata, backend="picky")
    assert (out == 42.0).all()
    monkeypatch.setenv("PORTATTN_BACKEND", "picky")
    out = portattn.attention(batch.q, batch.cache, batch.metadata)
    assert (out == 42.0).all()
    decision = portattn.explain(batch.q, batch.cache, batch.metadata)
    assert (decision.backend, decision.source) == ("picky", "environment")
    # the argument wins over the environment
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, backend="torch_ref")
    assert (decision.backend, decision.source) == ("torch_ref", "argument")


def test_forced_backend_that_cannot_serve_raises_with_its_reasons(with_picky):
    batch = make_paged_batch([1], [5], num_q_heads=2, num_kv_heads=1, head_size=32,
                             dtype=torch.float16)
    with pytest.raises(UnsupportedError) as info:
        portattn.attention(batch.q, batch.cache, batch.metadata, backend="picky")
    assert info.value.reasons == {"picky": ["picky serves float32 only"]}
    assert "backend 'picky' (requested through argument) cannot serve" in str(info.value)
    assert "picky serves float32 only" in str(info.value)


def test_unknown_backend_is_named(with_picky, batch):
    """An InputError naming ``backend`` (README: bad values raise InputError) that is also
    an UnsupportedError, so handlers written for either catch it."""
    for error in (UnsupportedError, InputError):
        with pytest.raises(error, match=r"^backend: expected auto or a registered backend "
                                        r"\(.*torch_ref.*\), got 'nope'"):
            portattn.attention(batch.q, batch.cache, batch.metadata, backend="nope")


def test_an_unknown_backend_error_has_the_reasons_of_an_unsupported_error(batch):
    """A handler written for UnsupportedError reads ``reasons``: an unknown backend name
    has none (it lost the attribute when InputError stopped chaining __init__, session
    43's reread)."""
    with pytest.raises(UnsupportedError) as info:
        portattn.attention(batch.q, batch.cache, batch.metadata, backend="nope")
    assert info.value.reasons == {}


def test_unknown_backend_errors_survive_pickling(batch):
    """Raised in a worker process, they reach the parent whole (their class took three
    arguments and could not be rebuilt from its message: session 41's review)."""
    import copy
    import pickle

    with pytest.raises(InputError) as info:
        portattn.attention(batch.q, batch.cache, batch.metadata, backend="nope")
    for clone in (pickle.loads(pickle.dumps(info.value)), copy.copy(info.value)):
        assert type(clone) is type(info.value) and str(clone) == str(info.value)
        assert clone.argument == "backend" and isinstance(clone, UnsupportedError)
    plain = pickle.loads(pickle.dumps(InputError("q", "a tensor", "a list")))
    assert str(plain) == "q: expected a tensor, got a list" and plain.argument == "q"


def test_backend_auto_is_automatic_routing(batch, monkeypatch):
    monkeypatch.setenv("PORTATTN_BACKEND", "torch_ref")
    for auto in ("auto", "AUTO"):
        decision = portattn.explain(batch.q, batch.cache, batch.metadata, backend=auto)
        assert decision.source == "auto"


def test_backend_names_match_without_regard_to_case(batch, monkeypatch):
    assert portattn.explain(batch.q, batch.cache, batch.metadata,
                            backend="Torch_Ref").backend == "torch_ref"
    monkeypatch.setenv("PORTATTN_BACKEND", "TORCH_REF")
    assert portattn.explain(batch.q, batch.cache, batch.metadata).backend == "torch_ref"
    from portattn import settings

    assert settings.BACKEND.problem() is None  # the report does not flag it either


def test_import_failure_becomes_a_reason(with_picky, batch):
    decision = portattn.explain(batch.q, batch.cache, batch.metadata)
    reasons = decision.rejected["broken"]
    assert reasons == ["could not import portattn.no_such_module: ModuleNotFoundError: No "
                       "module named 'portattn.no_such_module'"]
    with pytest.raises(UnsupportedError, match="could not import portattn.no_such_module"):
        portattn.attention(batch.q, batch.cache, batch.metadata, backend="broken")


def test_nothing_fits_lists_every_backend(monkeypatch, with_picky):
    monkeypatch.setattr(registry, "BACKENDS", {"picky": registry.BACKENDS["picky"],
                                               "broken": registry.BACKENDS["broken"]})
    problem = Problem.make(device_type="cpu", dtype="float16")
    caps = probe(simulate="cpu")
    with pytest.raises(UnsupportedError) as info:
        decide(problem, caps)
    assert set(info.value.reasons) == {"picky", "broken"}
    assert "no backend can serve this call on cpu" in str(info.value)


def test_decisions_are_cached_per_problem(with_picky, batch):
    caps = probe()
    problem = Problem.make(device_type="cpu", dtype="float32")
    first = decide(problem, caps, "picky")
    asked = PickyBackend.calls
    for _ in range(5):
        assert decide(problem, caps, "picky") is first
    assert PickyBackend.calls == asked  # no new why_not: a dict lookup
    # lengths that grow within one power-of-two bucket reuse the decision
    a = Problem.make(device_type="cpu", dtype="float32", seq_len=5000)
    b = Problem.make(device_type="cpu", dtype="float32", seq_len=8000)
    assert a == b and hash(a) == hash(b)
    c = Problem.make(device_type="cpu", dtype="float32", seq_len=9000)
    assert c != a


def test_decision_cache_is_bounded_and_thread_safe(with_picky):
    caps = probe()
    old = decision_cache.capacity
    decision_cache.capacity = 8
    try:
        def worker(offset):
            for i in range(40):
                decide(Problem.make(device_type="cpu", dtype="float32",
                                    num_q_heads=8, num_kv_heads=1 << (i % 4),
                                    seq_len=1 << (offset + i % 7)), caps)

        assert not errors_in_threads(worker, 4)
        assert len(decision_cache) <= 8
    finally:
        decision_cache.capacity = old


def test_a_decision_made_across_a_clear_is_not_stored(with_picky, monkeypatch):
    """Another thread clears the decisions (a kernel failure recorded, a probe refresh)
    while one is being made: it answers its caller but is not stored, so no later call
    reuses what was decided from the replaced state; the next decision is stored."""
    from portattn.dispatch import selector

    original, clears = selector._decide, []

    def deciding_while_another_thread_clears(*args, **kwargs):
        decision = original(*args, **kwargs)
        if not clears:
            clears.append(1)
            decision_cache.clear()
        return decision

    monkeypatch.setattr(selector, "_decide", deciding_while_another_thread_clears)
    problem = Problem.make(device_type="cpu", dtype="float32", num_q_heads=8,
                           num_kv_heads=2, seq_len=64)
    first = decide(problem, probe(), "picky")
    assert first.backend == "picky" and clears == [1] and len(decision_cache) == 0
    assert decide(problem, probe(), "picky") == first and len(decision_cache) == 1


def test_explain_lists_every_backend_with_reasons(with_picky, batch):
    decision = portattn.explain(batch.q, batch.cache, batch.metadata)
    names = [name for name, _ in decision.considered]
    assert set(names) >= {"torch_ref", "picky", "broken"}
    text = str(decision)
    assert f"backend: {decision.backend} (auto)" in text
    assert "rejected broken:" in text
    assert "not chosen picky: could serve, lower priority" in text
    forced = portattn.explain(batch.q, batch.cache, batch.metadata, backend="picky")
    assert forced.backend == "picky" != decision.backend  # the automatic choice passed over
    assert f"not chosen {decision.backend}: could serve; picky was forced (argument)" \
        in str(forced)
    assert "lower priority" not in str(forced)
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["backend"] == decision.backend
    assert data["problem"]["q_dtype"] == "float32"


def test_auto_selection_never_picks_unlisted_backends(with_picky, batch):
    # "picky" could serve but is in no priority list: only forcing reaches it
    out = portattn.attention(batch.q, batch.cache, batch.metadata)
    assert not (out == 42.0).all()


def test_forced_backend_parsing(monkeypatch):
    monkeypatch.delenv("PORTATTN_BACKEND", raising=False)
    assert forced_backend(None) == (None, "auto")
    monkeypatch.setenv("PORTATTN_BACKEND", "auto")
    assert forced_backend(None) == (None, "auto")
    monkeypatch.setenv("PORTATTN_BACKEND", "torch_ref")
    assert forced_backend(None) == ("torch_ref", "environment")
    assert forced_backend("x") == ("x", "argument")


def test_unknown_backend_in_the_environment_names_the_variable(batch, monkeypatch):
    monkeypatch.setenv("PORTATTN_BACKEND", "nope")
    with pytest.raises(InputError, match="^PORTATTN_BACKEND: expected auto or a registered "
                                         "backend .*, got 'nope'"):
        portattn.explain(batch.q, batch.cache, batch.metadata)


def test_custom_op_under_torch_compile_fullgraph(batch):
    sinks = torch.randn(4)

    def layer(x, cache, metadata, sinks):
        q = x * 1.0
        return portattn.attention(q, cache, metadata, sinks=sinks, sliding_window=5) * 2

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(batch.q, batch.cache, batch.metadata, sinks)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens,
                               sinks=sinks, sliding_window=5) * 2
    assert relative_error(out, expected) < 1e-5
    assert hasattr(torch.ops.portattn, "paged_attention")


def _eager_and_compiled_errors(q, cache, metadata, **options):
    """The errors of one bad call made eagerly and under torch.compile. Without fullgraph
    (under it Dynamo reports any raise as its own error) the compiled call must raise the
    eager error, whether the traced code or the op's eager body raises it."""
    def layer(q, cache, metadata):
        return portattn.attention(q, cache, metadata, **options)

    with pytest.raises(InputError) as eager:
        layer(q, cache, metadata)
    torch._dynamo.reset()
    with pytest.raises(InputError) as compiled:
        torch.compile(layer, backend="eager")(q, cache, metadata)
    torch._dynamo.reset()
    return eager.value, compiled.value


@pytest.mark.parametrize("backend", [3, ""])
def test_a_compiled_call_takes_backend_as_an_eager_one(batch, backend):
    """``backend`` under torch.compile: a non-str is named (it reached the op's str schema:
    Dynamo's error), and "" is an unknown name as it is eagerly (the op read "" as no
    backend and routed automatically). Found by session 43's audit of the compile path."""
    eager, compiled = _eager_and_compiled_errors(batch.q, batch.cache, batch.metadata,
                                                 backend=backend)
    assert compiled.argument == "backend" and type(compiled) is type(eager)
    assert str(compiled) == str(eager)


_F8Q = dict(dtype=torch.float16, q_dtype=torch.float8_e4m3fn,
            quant=portattn.KVQuant.fp8_per_tensor(0.02, 0.03))
#: bad calls the traced path let through to the op: (argument, batch options, call
#: changes); a Python scale became a tensor unchecked (True: 1.0) and a tensor one was
#: reshaped and cast (float16 accepted, two elements: Dynamo's error); a non-tensor out or
#: a cache of the wrong type reached the op's schema or an attribute (Dynamo's error)
_BAD_COMPILED_CALLS = {
    "q_scale bool": ("q_scale", _F8Q, dict(q_scale=True)),
    "output_scale bool": ("output_scale", {}, dict(output_scale=True)),
    "output_scale float16": ("output_scale", {},
                             dict(output_scale=torch.tensor([0.5], dtype=torch.float16))),
    "output_scale of two": ("output_scale", {}, dict(output_scale=torch.tensor([0.5, 0.5]))),
    "out not a tensor": ("out", {}, dict(out=3)),
    "cache a tuple": ("cache", {}, dict(cache=lambda c: (c.key_cache, c.value_cache))),
}


@pytest.mark.parametrize("case", sorted(_BAD_COMPILED_CALLS))
def test_a_compiled_call_is_checked_as_an_eager_one(case):
    """The traced path runs attention()'s host checks (structure, options, out) before it
    builds the op's arguments, so a bad call is the eager InputError naming the argument,
    never a Dynamo error or a call that runs. Found by session 43's audit of the compile
    path."""
    argument, made, changes = _BAD_COMPILED_CALLS[case]
    batch = make_paged_batch([2, 1], [9, 30], num_q_heads=4, num_kv_heads=2, head_size=32,
                             **{"dtype": torch.float32, **made})
    options = {"q_scale": 0.5} if "q_dtype" in made else {}
    options.update(changes)
    cache = options.pop("cache", lambda c: c)(batch.cache)
    eager, compiled = _eager_and_compiled_errors(batch.q, cache, batch.metadata, **options)
    assert compiled.argument == argument and str(compiled) == str(eager)


def test_fast_path_skips_checks_only_for_identical_calls(batch, monkeypatch):
    import portattn.api as api

    prepared = []
    real_prepare = api._prepare

    def counting_prepare(*args, **kwargs):
        prepared.append(1)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(api, "_prepare", counting_prepare)
    monkeypatch.delenv("PORTATTN_VALIDATE", raising=False)
    planning.clear()
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    for _ in range(3):  # checked once, then served from the memo
        out = portattn.attention(batch.q, batch.cache, batch.metadata, validate=False)
        assert relative_error(out, expected) < 1e-5
    assert len(prepared) == 1
    portattn.attention(batch.q, batch.cache, batch.metadata, validate=False, softcap=3.0)
    portattn.attention(batch.q[:, :2], batch.cache, batch.metadata, validate=False)  # GQA 1
    assert len(prepared) == 3
    monkeypatch.setenv("PORTATTN_BACKEND", "torch_ref")  # a decision variable changed
    portattn.attention(batch.q, batch.cache, batch.metadata, validate=False)
    assert len(prepared) == 4
    # CPU metadata is value-checked on every call unless validation is turned off
    monkeypatch.delenv("PORTATTN_BACKEND")
    portattn.attention(batch.q, batch.cache, batch.metadata)
    portattn.attention(batch.q, batch.cache, batch.metadata)
    assert len(prepared) == 6
    monkeypatch.setenv("PORTATTN_VALIDATE", "0")
    portattn.attention(batch.q, batch.cache, batch.metadata)
    portattn.attention(batch.q, batch.cache, batch.metadata)
    assert len(prepared) == 7
    # bad input still raises: a wrong-shaped out is a different key, checked in full
    with pytest.raises(portattn.InputError, match="^out:"):
        portattn.attention(batch.q, batch.cache, batch.metadata, validate=False,
                           out=torch.empty(3, 4, 16))


def test_compiled_calls_reuse_the_eager_plans(batch, monkeypatch):
    """The custom op rebuilds cache and metadata objects per call; the memo keys on
    structure and the metadata's tensors, so compiled calls skip the checks too."""
    import portattn.api as api

    prepared = []
    real_prepare = api._prepare
    monkeypatch.setattr(api, "_prepare",
                        lambda *a, **k: prepared.append(1) or real_prepare(*a, **k))
    monkeypatch.setenv("PORTATTN_VALIDATE", "0")
    planning.clear()

    def layer(x, cache, metadata):
        return portattn.attention(x, cache, metadata)

    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    out = torch.empty_like(batch.q)  # the op always passes an out: so does this call
    eager = portattn.attention(batch.q, batch.cache, batch.metadata, out=out).clone()
    assert len(prepared) == 1
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        out = compiled(batch.q, batch.cache, batch.metadata)
        assert relative_error(out, expected) < 1e-5 and torch.equal(out, eager)
    assert len(prepared) == 1
    assert len(planning.memo) == 1


def test_memo_put_is_thread_safe_and_bounded(batch):
    from portattn.planning import _MetadataMemo

    memo = _MetadataMemo(capacity=4)
    metas = [portattn.AttentionMetadata(batch.metadata.cu_seqlens_q.clone(),
                                        batch.metadata.seq_lens.clone(),
                                        batch.metadata.block_table.clone(), 2, 30)
             for _ in range(8)]

    def worker(offset):
        for i in range(500):
            memo.put(metas[(offset + i) % 8], i % 70, i)

    assert not errors_in_threads(worker, 8)
    assert len(memo) <= 4
    assert all(len(calls) <= planning.CALLS_PER_ENTRY for calls, _ in memo.entries.values())


def test_memo_sees_a_reassigned_cache_tensor(batch, monkeypatch):
    monkeypatch.setenv("PORTATTN_VALIDATE", "0")
    portattn.attention(batch.q, batch.cache, batch.metadata)
    batch.cache.key_cache = batch.cache.key_cache[..., :16]  # now the wrong head size
    with pytest.raises(portattn.InputError, match="^q: expected head size 16"):
        portattn.attention(batch.q, batch.cache, batch.metadata)
    monkeypatch.setenv("PORTATTN_VALIDATE", " 1")  # odd spelling: the full path decides
    from portattn.settings import decision_environment
    assert not planning._memo_allowed(batch.q, batch.cache, batch.metadata, None,
                                      decision_environment())


def _counting_prepare(monkeypatch) -> list:
    """Counts the full checks of ``attention`` (api._prepare)."""
    import portattn.api as api

    prepared: list = []
    real_prepare = api._prepare
    monkeypatch.setattr(api, "_prepare",
                        lambda *a, **k: prepared.append(1) or real_prepare(*a, **k))
    return prepared


@pytest.mark.parametrize("bad", [
    {"causal": 1}, {"alibi_sqrt": 0}, {"sliding_window": 4.0}, {"softcap": True},
    {"causal": [1]}, {"out": [1]}, {"sinks": [0.0] * 4}])
def test_memo_hit_still_rejects_bad_options(batch, monkeypatch, bad):
    """Options equal to accepted ones (same hash, ==) but of a type the checks refuse,
    unhashable ones, and non-tensors where a tensor belongs: InputError naming them, even
    with an accepted call of the same structure in the memo."""
    prepared = _counting_prepare(monkeypatch)
    planning.clear()
    good = {"sliding_window": 4, "softcap": 1.0}  # causal=True, alibi_sqrt=False
    for _ in range(2):
        portattn.attention(batch.q, batch.cache, batch.metadata, validate=False, **good)
    assert len(prepared) == 1  # the second call was served from the memo
    (name, _), = bad.items()
    with pytest.raises(portattn.InputError, match=f"^{name}:"):
        portattn.attention(batch.q, batch.cache, batch.metadata, validate=False,
                           **{**good, **bad})


def test_memo_entries_that_leave_hold_nothing(batch, monkeypatch):
    """The metadata object keeps its memo entry's calls (found without computing a token);
    an entry that leaves the memo (capacity, clear) is emptied, so no plan stays reachable
    from the object and its next call is checked again. Copies of the metadata carry no
    plans (deepcopy, pickle)."""
    prepared = _counting_prepare(monkeypatch)
    planning.clear()
    monkeypatch.setattr(planning.memo, "capacity", 1)
    m = batch.metadata
    other = portattn.AttentionMetadata(m.cu_seqlens_q.clone(), m.seq_lens.clone(),
                                       m.block_table.clone(), m.max_seqlen_q, m.max_seqlen_k)
    for _ in range(2):
        portattn.attention(batch.q, batch.cache, m, validate=False)
    assert len(prepared) == 1
    kept = m.__dict__[planning._CALLS_ATTR]
    assert len(kept) == 1
    for copied in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert len(copied.__dict__[planning._CALLS_ATTR]) == 0
    portattn.attention(batch.q, batch.cache, other, validate=False)  # evicts m's entry
    assert len(prepared) == 2 and len(planning.memo) == 1 and len(kept) == 0
    portattn.attention(batch.q, batch.cache, m, validate=False)
    assert len(prepared) == 3
    planning.clear()
    assert len(m.__dict__[planning._CALLS_ATTR]) == 0


@pytest.mark.parametrize("head_size_v", [32, 16])
def test_allocated_out_is_contiguous_with_the_result_shape(monkeypatch, head_size_v):
    """``attention`` and ``plan.run`` allocate a contiguous ``[num_tokens, num_q_heads,
    head_size_v]`` result (like q where the shapes agree, DiffKV otherwise), also for a q
    that is a strided view of a fused qkv or a dense q with permuted strides; on the
    checked call and on memo hits alike."""
    monkeypatch.setenv("PORTATTN_VALIDATE", "0")
    planning.clear()
    batch = make_paged_batch([2, 1], [9, 30], num_q_heads=4, num_kv_heads=2, head_size=32,
                             head_size_v=head_size_v, dtype=torch.float32)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens)
    fused = torch.cat([batch.q, torch.zeros_like(batch.q)], dim=1)[:, :4]
    permuted = batch.q.transpose(0, 1).contiguous().transpose(0, 1)
    plan = portattn.plan(batch.metadata, num_q_heads=4, dtype=torch.float32,
                         cache=batch.cache)
    for q in (batch.q, fused, permuted):
        for _ in range(2):
            for out in (portattn.attention(q, batch.cache, batch.metadata),
                        plan.run(q, batch.cache)):
                assert out.shape == (3, 4, head_size_v) and out.dtype == torch.float32
                assert out.is_contiguous()
                assert relative_error(out, expected) < 1e-5


def test_memo_hit_still_rejects_a_hint_of_the_wrong_type(batch, monkeypatch):
    """A metadata object rebuilt around the same tensors with a hint equal to the
    accepted one but of a refused type (30.0 == 30) is checked, not served from the memo."""
    prepared = _counting_prepare(monkeypatch)
    planning.clear()
    m = batch.metadata
    same = portattn.AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table,
                                      m.max_seqlen_q, m.max_seqlen_k)
    for metadata in (m, same):
        portattn.attention(batch.q, batch.cache, metadata, validate=False)
    assert len(prepared) == 1  # the rebuilt object found the entry of its tensors
    floated = portattn.AttentionMetadata(m.cu_seqlens_q, m.seq_lens, m.block_table,
                                         m.max_seqlen_q, float(m.max_seqlen_k))
    with pytest.raises(portattn.InputError, match="^metadata.max_seqlen_k:"):
        portattn.attention(batch.q, batch.cache, floated, validate=False)

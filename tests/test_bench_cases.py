"""The bench's quantized cases build the caches their names say (CPU; no timing)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from portattn.bench.cases import Case, build_inputs, case_flops, default_cases
from portattn.bench.report import plain_case_name


def _case(name):
    by_name = {c.name: c for c in default_cases(shrink=512)}
    return by_name[name]


def _inputs(case, dtype=torch.float16):
    """The case's inputs, small (4 / 2 heads of 16, block 16), on the CPU."""
    return build_inputs(case, num_q_heads=4, num_kv_heads=2, head_size=16, block_size=16,
                        dtype=dtype, device="cpu")


@pytest.mark.parametrize("name, mode, fp8", [
    ("decode-32x8192-fp8", "fp8_per_tensor", torch.float8_e4m3fn),
    ("decode-32x8192-fp8e5m2", "fp8_per_tensor", torch.float8_e5m2),
    ("decode-128x8192-fp8e5m2pth", "fp8_per_token_head", torch.float8_e5m2),
    ("decode-32x8192-fp8pth", "fp8_per_token_head", torch.float8_e4m3fn),
])
def test_fp8_cases_store_the_format_their_name_says(name, mode, fp8):
    inp = _inputs(_case(name), torch.bfloat16)
    cache = inp.cache
    assert cache.key_cache.dtype == fp8 and cache.value_cache.dtype == fp8
    assert cache.quant.mode == mode and cache.quant.fp8_dtype == fp8
    # random, non-zero codes (the bench times reads of real data, not of zeros)
    assert cache.key_cache.float().abs().sum() > 0


def test_every_e5m2_case_has_the_plain_case_it_is_compared_with():
    names = {c.name for c in default_cases()}
    e5m2 = [c for c in default_cases() if c.fp8_format == "e5m2"]
    assert e5m2 and all(plain_case_name(c.name) in names for c in e5m2)


@pytest.mark.parametrize("name", ["decode-32x8192", "decode-32x8192-fp8",
                                  "decode-32x8192-fp8e5m2", "decode-32x8192-int8pth",
                                  "decode-128x8192-fp8e5m2pth"])
def test_cache_dtype_is_what_build_inputs_stores(name):
    from portattn.bench.cases import cache_dtype

    case = _case(name)
    for dtype in (torch.bfloat16, torch.float16):
        inp = _inputs(case, dtype)
        assert cache_dtype(case, dtype) == inp.cache.key_cache.dtype == \
            inp.cache.value_cache.dtype
    with pytest.raises(ValueError, match="unknown kv_quant 'int4'"):
        cache_dtype(dataclasses.replace(case, kv_quant="int4"), torch.bfloat16)


@pytest.mark.parametrize("arch, bits", [("sm80", "e4m3fn"), ("sm86", "e4m3fn"),
                                        ("sm90", None)])
def test_the_sweep_times_and_prewarms_the_backends_byte_decode(arch, bits):
    """An fp8 cache on a GPU without fp8 conversions is decoded from its bytes (the plan's
    ``kv_bits``): every config the sweep times carries it, as the prewarm must compile
    it (the prewarm built its list without it once: it compiled configs never timed)."""
    from portattn.bench.sweep import sweep_configs, timed_configs
    from portattn.capabilities import probe
    from portattn.kernels.heuristics import Shape, quant_mode

    caps = probe(simulate=arch)
    case = _case("decode-32x8192-fp8")
    shape = Shape(32, 8, 128, 1, 1, max(case.seq_lens), case.num_seqs, caps.sm_count,
                  caps.arch, None, quant_mode(case.kv_quant))
    configs = timed_configs(case, shape, torch.bfloat16, "cuda", caps)
    plain = sweep_configs(case, shape)
    assert len(configs) == len(plain) > 0
    assert all(c.get("kv_bits") == bits for c in configs)
    assert all({k: v for k, v in c.items() if k != "kv_bits"} == p
               for c, p in zip(configs, plain))
    bf16 = timed_configs(_case("decode-32x8192"), shape, torch.bfloat16, "cuda", caps)
    assert all("kv_bits" not in c for c in bf16)


def test_the_sweep_keeps_the_plans_tile_over_several_heads():
    """An fp8 decode planned over 4 kv heads per program (sm90, GQA 4, 32 x 8192): the
    sweep times that tile (its register cap, 8 segments among its options) and the
    per-head paired tile it replaced, with the per-head segment options."""
    from portattn.bench.sweep import sweep_configs
    from portattn.kernels.heuristics import Shape, plan_launch, quant_mode

    case = _case("decode-32x8192-fp8")
    shape = Shape(32, 8, 128, 1, 1, max(case.seq_lens), case.num_seqs, 132, "sm90", None,
                  quant_mode(case.kv_quant))
    assert plan_launch(shape)["short"]["tile_heads"] == 4
    shorts = [c["short"] for c in sweep_configs(case, shape)]
    four = [c for c in shorts if c.get("tile_heads") == 4]
    per_head = [c for c in shorts if "tile_heads" not in c]
    assert {(c["block_m"], c["block_q"]) for c in four} == {(16, 1)}
    assert {(c["block_m"], c["block_q"]) for c in per_head} == {(16, 4)}
    capped = {c["segments"] for c in four if c.get("maxnreg") == 128 and c["block_n"] == 128}
    assert 8 in capped and max(capped) == 8   # 64 head groups: at most 4 per SM
    assert {c["segments"] for c in per_head} == {1, 2}  # 256 programs: at most 4 per SM
    assert all(c.get("maxnreg") == 128 for c in per_head)


def test_ours_is_the_triton_backend_of_the_cases_head_sizes():
    """The bench's kernel for ours: DiffKV's exactly for the cases with their own V head
    size; forced on a GPU only (auto routing on this CPU)."""
    from portattn.bench.peers import our_backend, triton_backend

    for case in default_cases(shrink=512):
        inp = _inputs(case)
        want = "triton_diffkv" if case.head_size_v is not None else "triton_unified"
        assert triton_backend(inp.cache) == want, case.name
        assert our_backend(inp) is None


def test_the_prewarm_compiles_the_configs_the_sweep_times(monkeypatch):
    """``compile_only`` (the prewarm) goes through :func:`timed_configs` itself: on an sm80
    every config it compiles for an fp8 case carries the byte decode the sweep times (the
    test above checks ``timed_configs`` only; the prewarm once built its own list)."""
    import argparse

    from portattn.bench import sweep
    from portattn.capabilities import probe
    from portattn.kernels import launch
    caps = probe(simulate="sm80")
    case = _case("decode-32x8192-fp8")
    args = argparse.Namespace(dtype="bf16", num_q_heads=8, num_kv_heads=2, head_size=32,
                              block_size=16, sweep=True, device="cuda")
    built = []

    def build_on_cpu(case, **kwargs):  # the configs depend on the device's name only
        inp = build_inputs(case, **dict(kwargs, device="cpu"))
        built.append(inp)
        return inp

    compiled = []
    monkeypatch.setattr(sweep, "build_inputs", build_on_cpu)
    monkeypatch.setattr(sweep, "ours", lambda inp: lambda: None)
    monkeypatch.setattr(launch, "launch_unified",
                        lambda q, cache, metadata, options, out, params: compiled.append(params))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    assert sweep.compile_only([case], args, caps, 0, 1) == 0
    shape = sweep.inputs_shape(case, built[0], caps)  # the shape run_sweep times
    timed = sweep.timed_configs(case, shape, torch.bfloat16, "cuda", caps)
    assert timed and all(c.get("kv_bits") == "e4m3fn" for c in timed)
    assert compiled == timed


def test_ours_is_forced_to_the_triton_backend_on_a_gpu():
    """On a GPU the bench times our Triton kernels whatever the routing would pick."""
    from types import SimpleNamespace

    from portattn.bench.peers import our_backend

    for case in (_case("decode-32x8192"), _case("decode-32x8192-diffkv")):
        inp = _inputs(case)
        on_gpu = SimpleNamespace(q=SimpleNamespace(is_cuda=True), cache=inp.cache)
        want = "triton_diffkv" if case.head_size_v is not None else "triton_unified"
        assert our_backend(on_gpu) == want


# --------------------------------------------------------------------------- SDPA peer
def _paged_kv_float64(inp, b, seq_len):
    """K, V of sequence ``b`` (``[seq_len, Hkv, D]``, float64) read token by token through
    the block table: the oracle's own gather."""
    bs = inp.cache.block_size
    rows = [int(inp.metadata.block_table[b, t // bs]) for t in range(seq_len)]
    return [torch.stack([data[r, t % bs] for t, r in enumerate(rows)]).double()
            for data in (inp.cache.key_cache, inp.cache.value_cache)]


def _bottom_right_oracle(q, k, v):
    """Our semantics in float64: the ``q_len`` queries are the sequence's last tokens and
    query i sees key j iff j <= seq_len - q_len + i; q head h reads kv head h // group."""
    q_len, num_q_heads, head_size = q.shape
    seq_len, num_kv_heads = k.shape[:2]
    group = num_q_heads // num_kv_heads
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / head_size ** 0.5
    hidden = torch.arange(seq_len)[None] > seq_len - q_len + torch.arange(q_len)[:, None]
    probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v), int((~hidden).sum())


def _spy_sdpa(monkeypatch):
    """Record (q, k, v, kwargs, output) of every outermost SDPA call. A CausalBias mask
    goes to its ``_dispatch`` as SDPA would send it (its ``__torch_function__`` only knows
    the real function), which calls SDPA again inside."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import CausalBias

    real, calls, depth = F.scaled_dot_product_attention, [], [0]

    def spy(q, k, v, **kw):
        depth[0] += 1
        try:
            bias = isinstance(kw.get("attn_mask"), CausalBias)
            out = CausalBias._dispatch(q, k, v, **kw) if bias else real(q, k, v, **kw)
        finally:
            depth[0] -= 1
        if not depth[0]:
            calls.append((q, k, v, kw, out))
        return out
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def _pairs_computed(kw, q_len, seq_len):
    """Query-key pairs an SDPA call form attends (SDPA's is_causal is top-left)."""
    mask = kw.get("attn_mask")
    if mask is None:
        if kw.get("is_causal"):
            return sum(min(i + 1, seq_len) for i in range(q_len))
        return q_len * seq_len
    dense = mask._materialize() if hasattr(mask, "_materialize") else mask
    return int(dense.expand(q_len, seq_len).sum())


@pytest.mark.parametrize("case", [
    Case("chunk", "mixed", [20, 1, 1], [53, 30, 30]),   # chunked prefill + decodes
    Case("spec", "spec", [4, 4], [19, 19]),              # spec-decode: 4 over 19
], ids=lambda c: c.name)
def test_the_sdpa_peer_runs_a_chunk_bottom_right_causal(case, monkeypatch):
    """The SDPA peer's timed call on a chunk over a longer context (1 < q_len < seq_len)
    computes our bottom-right causal attention (it ran non-causal once: another result,
    and 11% more work on mixed-2048+63x4096), attending exactly the pairs ours does."""
    from portattn.bench.peers import sdpa

    inp = _inputs(case, torch.float32)
    calls = _spy_sdpa(monkeypatch)
    fn, notes = sdpa(case, inp, "MATH")  # SDPBackend.MATH: this CPU's exact backend
    calls.clear()  # the setup's trial calls
    fn()
    b = next(i for i, (ql, sl) in enumerate(zip(case.query_lens, case.seq_lens)) if ql < sl)
    ql, sl = case.query_lens[b], case.seq_lens[b]
    q4, k4, _, kw, out = next(c for c in calls if c[0].shape[-2] == ql and c[1].shape[-2] == sl)
    start = sum(case.query_lens[:b])
    want, pairs = _bottom_right_oracle(inp.q[start:start + ql], *_paged_kv_float64(inp, b, sl))
    torch.testing.assert_close(out[0].transpose(0, 1).double(), want, rtol=1e-5, atol=1e-5)
    assert _pairs_computed(kw, ql, sl) == pairs == \
        case_flops(Case("part", case.kind, [ql], [sl]), 1, 1) / 4
    assert f"q {ql} over {sl} keys run with causal_lower_right" in notes


@pytest.mark.parametrize("refused, form, note", [
    ("nothing", "causal_lower_right", "q 20 over 53 keys run with causal_lower_right"),
    ("any mask", "non-causal", "q 20 over 53 keys run non-causal (1.22x the work)"),
])
def test_the_sdpa_peer_takes_the_next_form_a_backend_refuses(monkeypatch, refused, form,
                                                              note):
    """A backend that runs causal_lower_right (flash's lower-right causal kernel) takes
    it; one without a kernel for it (a RuntimeError at the setup's trial call) gets the
    non-causal call, noted with its real work (53 * 20 pairs over ours' 33 * 20 + 20 *
    21 / 2)."""
    from torch.nn.attention.bias import CausalBias

    from portattn.bench import peers

    real = peers._trial_call

    def refusing(part, backend, kw):
        mask = kw.get("attn_mask")
        if mask is not None and (refused == "any mask" or not isinstance(mask, CausalBias)):
            raise RuntimeError("No available kernel. Aborting execution.")
        return real(part, backend, kw)
    monkeypatch.setattr(peers, "_trial_call", refusing)
    case = Case("chunk", "mixed", [20, 1], [53, 30])
    calls = _spy_sdpa(monkeypatch)
    inp = _inputs(case, torch.float32)
    fn, notes = peers.sdpa(case, inp, "MATH")
    calls.clear()
    fn()
    kw, out = next(c[3:] for c in calls if c[0].shape[-2] == 20)
    want, _ = _bottom_right_oracle(inp.q[:20], *_paged_kv_float64(inp, 0, 53))
    exact = torch.allclose(out[0].transpose(0, 1).double(), want, rtol=1e-5, atol=1e-5)
    assert exact == (form == "causal_lower_right")
    chosen = "causal_lower_right" if isinstance(kw.get("attn_mask"), CausalBias) else \
        "non-causal" if kw == {"is_causal": False, "enable_gqa": True} else kw
    assert chosen == form and notes == [note]
    assert _pairs_computed(kw, 20, 53) == (33 * 20 + 20 * 21 // 2 if form != "non-causal"
                                          else 53 * 20)


@pytest.mark.parametrize("case", [Case("chunk", "mixed", [20, 1, 1], [53, 30, 30]),
                                  Case("prefill", "prefill", [21, 9], [21, 9])],
                         ids=lambda c: c.name)
def test_the_sdpa_peer_reports_its_error_against_ours(case):
    """With ``check``, the SDPA peer's setup compares its output with ours on the case
    (every part back in token order): the relative error, in the dict and the notes."""
    from portattn.bench.peers import sdpa

    check: dict = {}
    _, notes = sdpa(case, _inputs(case, torch.float32), "MATH", check)
    assert 0 <= check["rel_error"] < 1e-5
    assert notes[-1] == f"output vs ours: relative error {check['rel_error']:.2e}"


def _cpu_args(**kw):
    """The bench's arguments for a small CPU run (4 / 2 heads of 16, block 16, fp32)."""
    import argparse

    return argparse.Namespace(**{"dtype": "fp32", "num_q_heads": 4, "num_kv_heads": 2,
                                 "head_size": 16, "block_size": 16, "device": "cpu",
                                 "no_peers": True, "sweep": False, "graph_timer": None, **kw})


def test_the_mixed_cases_parts_run_on_the_backend_ours_runs_on(monkeypatch):
    """The mixed case's separate parts are timed through the backend ours is forced to
    (they went through auto routing: FA4 could time the chunk against our Triton kernel),
    and the result says each part's backend. A stand-in forces ``torch_ref`` here as
    ``our_backend`` forces our Triton kernels on a GPU."""
    import portattn
    from portattn.bench import runner

    passed = []
    real = portattn.attention

    def spy(*args, **kw):
        passed.append(kw.get("backend"))
        return real(*args, **kw)
    monkeypatch.setattr(portattn, "attention", spy)
    monkeypatch.setattr(runner, "our_backend", lambda inp: "torch_ref")
    case = Case("mixed", "mixed", [20, 1, 1], [53, 30, 30])
    timed = runner._separate_parts(case, _cpu_args(), lambda fn: (fn(), 1.5)[1],
                                   torch.float32)
    assert passed == ["torch_ref", "torch_ref"]  # the chunk, then the decodes
    assert timed == (3.0, ["torch_ref", "torch_ref"])
    result = runner.run_case(case, _cpu_args(), lambda fn: (fn(), 1.0)[1], None, {})
    assert result["separate_parts_backends"] == ["torch_ref", "torch_ref"]


@pytest.mark.parametrize("shrink", [2048, 4096, 1 << 20])
def test_a_large_shrink_keeps_the_mixed_case_mixed(shrink):
    """``--shrink`` of 2048 or more made the mixed chunk 1 query: a decode, so the
    separate parts' chunk part was empty and build_inputs crashed on it. The chunk keeps
    >= 2 queries (over its context plus itself) and both parts run."""
    from portattn.bench import runner

    mixed = next(c for c in default_cases(shrink) if c.kind == "mixed")
    chunk = mixed.query_lens[0]
    assert chunk >= 2 and set(mixed.query_lens[1:]) == {1}
    assert mixed.seq_lens[0] == max(1, 8192 // shrink) + chunk
    total, backends = runner._separate_parts(mixed, _cpu_args(), lambda fn: (fn(), 1.0)[1],
                                             torch.float32)
    assert total == 2.0 and len(backends) == 2


@pytest.mark.parametrize("shrink", [2048, 4096, 8192, 1 << 20])
def test_a_large_shrink_keeps_every_case_valid(shrink):
    """Every shrunk case has at least as many keys as queries per sequence (spec-decode's
    4 queries had 2 keys at --shrink 2048, an input error that ended the run)."""
    import portattn

    for case in default_cases(shrink):
        assert all(sl >= ql for ql, sl in zip(case.query_lens, case.seq_lens)), case.name
        if case.kind in ("mixed", "spec"):
            inp = _inputs(case)
            portattn.explain(inp.q, inp.cache, inp.metadata)  # raises on bad lengths


def test_the_sdpa_peer_keeps_its_plain_call_where_the_work_is_equal(monkeypatch):
    """Spec-decode's 4 queries over 400 keys: the non-causal call does 1.004x ours' work,
    within NEAR_EQUAL_WORK, so the peer keeps its plain kernel (noted), not a mask."""
    from portattn.bench import peers

    case = Case("spec", "spec", [4, 4], [400, 400])
    calls = _spy_sdpa(monkeypatch)
    fn, notes = peers.sdpa(case, _inputs(case, torch.float32), "MATH")
    calls.clear()
    fn()
    (call,) = calls
    assert call[3] == {"is_causal": False, "enable_gqa": True}
    ratio = 4 * 400 / (4 * 396 + 10)
    assert ratio <= peers.NEAR_EQUAL_WORK
    assert notes == [f"q 4 over 400 keys run non-causal ({ratio:.2f}x the work)"]


def test_cudnn_runs_a_chunk_non_causal_with_its_work_noted(monkeypatch):
    """cuDNN has no lower-right causal kernel in SDPA: a mask (boolean or
    causal_lower_right's) runs its dense-mask kernel, exact but another class of kernel
    (1.63x our time on the H100's mixed case, against 0.99x non-causal). Its chunk takes
    the non-causal call alone, noted with the real work ratio; no mask is tried."""
    from portattn.bench import peers

    tried = []

    def trial(part, backend, kw):
        tried.append(kw)
        return torch.zeros(part.q.shape[0], part.q.shape[1], part.q_len, part.v.shape[-1])
    monkeypatch.setattr(peers, "_trial_call", trial)
    case = Case("chunk", "mixed", [20, 1], [53, 30])
    _, notes = peers.sdpa(case, _inputs(case, torch.float32), "CUDNN_ATTENTION")
    assert all("attn_mask" not in kw for kw in tried)
    ratio = 20 * 53 / (33 * 20 + 20 * 21 // 2)
    assert notes == [f"q 20 over 53 keys run non-causal ({ratio:.2f}x the work)"]

"""GPU tier: the flash_attn backend through FA4 (``flash_attn.cute``, pip ``flash-attn-4``)
against the dense float64 oracle; skipped, with the reason, where FA4 is not installed or
the GPU has no FA4 paged kernels (sm90 and sm100 do).

FA4 compiles a kernel for each new configuration (about 4 s on an H200), so the grid is
kept small and meant to run in a few processes (``PORTATTN_TEST_SHARD=i/n``, as
ci/gpu_fa4.sh does). Outputs are poisoned with NaN before every call. The caches of
``make_paged_batch`` are NaN-poisoned too; the slots past ``seq_len`` in each sequence's
last block get a large finite value instead, because FA4 loads whole pages where a page is
one key tile (its documented precondition, README "FlashAttention-4"): a kernel that mixed
those slots into a result would still be caught by the comparison.
"""

import pytest
import torch

import portattn
from graph_replay import check_graph_replay_without_syncs
from portattn.testing import dense_attention, make_paged_batch, relative_error
from portattn.types import KVQuant

pytestmark = [pytest.mark.gpu, pytest.mark.flash_attn]

try:
    import flash_attn.cute  # noqa: F401
except Exception as exc:  # not installed, or installed without its CUDA libraries
    pytest.skip(f"FA4 (flash_attn.cute, pip install flash-attn-4) does not import: "
                f"{type(exc).__name__}: {exc}", allow_module_level=True)
if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] not in (9, 10, 11):
    pytest.skip(f"FA4 has paged kernels on sm90 and sm100 only; this GPU is "
                f"sm{''.join(map(str, torch.cuda.get_device_capability()))}",
                allow_module_level=True)

TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
TAIL_VALUE = 64.0
SHAPES = {  # (query_lens, seq_lens)
    "decode": ([1] * 5, [1, 77, 300, 1024, 2500]),
    "prefill": ([300, 64, 1000], [300, 100, 1700]),
    # a chunk, decodes, a sequence without queries, and a one-key sequence
    "mixed": ([1, 200, 1, 0, 33], [700, 200, 1, 5, 900]),
}


@pytest.fixture(autouse=True)
def _fa4_interface(monkeypatch):
    """This file tests FA4 even where FA2 or FA3 is installed too."""
    monkeypatch.setenv("PORTATTN_FLASH_ATTN_INTERFACE", "fa4")


def _batch(query_lens, seq_lens, **kwargs):
    kwargs.setdefault("device", "cuda")
    batch = make_paged_batch(query_lens, seq_lens, **kwargs)
    cache, size = batch.cache, batch.cache.block_size
    table = batch.metadata.block_table.cpu()
    for b, n in enumerate(seq_lens):
        if n % size:  # the unused slots of the sequence's last block: finite
            block = int(table[b, n // size])
            for data in (cache.key_cache, cache.value_cache):
                data[block, n % size:] = TAIL_VALUE
    return batch


def _check_fa4_plan(batch, **options):
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, backend="flash_attn",
                                **options)
    assert decision.plan.params.get("interface") == "fa4", decision


def _run_and_compare(batch, tol, **options):
    _check_fa4_plan(batch, **options)
    out = torch.full((batch.q.shape[0], batch.q.shape[1], batch.cache.head_size_v),
                     float("nan"), dtype=torch.bfloat16 if batch.q.dtype not in TOL
                     else batch.q.dtype, device="cuda")
    portattn.attention(batch.q, batch.cache, batch.metadata, backend="flash_attn", out=out,
                       **options)
    q_scale = options.pop("q_scale", None)
    q_ref = batch.q if q_scale is None else batch.q.float() * q_scale
    expected = dense_attention(q_ref, batch.keys, batch.values, batch.query_lens, **options)
    error = relative_error(out, expected)
    assert error < tol, error
    return out


@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_fa4_matches_dense(block_size, head_size, kind):
    heads = (32, 8) if head_size == 128 else (8, 2)
    dtype = torch.float16 if head_size == 64 else torch.bfloat16
    query_lens, seq_lens = SHAPES[kind]
    batch = _batch(query_lens, seq_lens, num_q_heads=heads[0], num_kv_heads=heads[1],
                   head_size=head_size, block_size=block_size, dtype=dtype,
                   seed=head_size + block_size)
    _run_and_compare(batch, TOL[dtype])


def _options(name, num_q_heads):
    g = torch.Generator(device="cpu").manual_seed(7)
    sinks = (torch.randn(num_q_heads, generator=g) * 2).cuda()
    return {
        "window": dict(sliding_window=97),
        "softcap": dict(softcap=20.0),
        "sinks": dict(sinks=sinks),
        "non-causal": dict(causal=False),
        "non-causal-window": dict(causal=False, sliding_window=57),
        "all": dict(sliding_window=300, softcap=15.0, sinks=sinks, scale=0.05),
    }[name]


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("feature", ["window", "softcap", "sinks", "non-causal",
                                     "non-causal-window", "all"])
def test_fa4_features(block_size, feature):
    batch = _batch(*SHAPES["mixed"], num_q_heads=32, num_kv_heads=8, head_size=128,
                   block_size=block_size, dtype=torch.bfloat16, seed=block_size)
    _run_and_compare(batch, TOL[torch.bfloat16], **_options(feature, 32))


@pytest.mark.parametrize("gqa", [(8, 8), (12, 4), (10, 2), (16, 1)])
def test_fa4_gqa_ratios(gqa):
    batch = _batch([1, 7, 33], [500, 40, 33], num_q_heads=gqa[0], num_kv_heads=gqa[1],
                   head_size=128, block_size=16, dtype=torch.bfloat16)
    _run_and_compare(batch, TOL[torch.bfloat16])


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_fa4_diffkv_192_128(block_size, kind):
    batch = _batch(*SHAPES[kind], num_q_heads=16, num_kv_heads=2, head_size=192,
                   head_size_v=128, block_size=block_size, dtype=torch.bfloat16)
    assert batch.cache.packed  # K and V are views of one [.., 192 + 128] tensor
    out = _run_and_compare(batch, TOL[torch.bfloat16], sliding_window=400)
    assert out.shape[-1] == 128


def test_fa4_diffkv_other_sizes():
    """FA4's sm90 rule allows any Q/K and V sizes in 8..256 (sm100: 192/128 only): one more
    pair than 192/128 checks that claim."""
    sizes = (128, 64) if torch.cuda.get_device_capability()[0] == 9 else (192, 128)
    batch = _batch(*SHAPES["mixed"], num_q_heads=8, num_kv_heads=2, head_size=sizes[0],
                   head_size_v=sizes[1], block_size=16, dtype=torch.bfloat16)
    out = _run_and_compare(batch, TOL[torch.bfloat16])
    assert out.shape[-1] == sizes[1]


@pytest.mark.parametrize("layout,block_size", [("packed", 16), ("split", 1)])
def test_fa4_packed_layout_and_block_size_one(layout, block_size):
    batch = _batch([1, 40, 1], [300, 90, 17], num_q_heads=8, num_kv_heads=2, head_size=128,
                   block_size=block_size, dtype=torch.bfloat16, layout=layout)
    _run_and_compare(batch, TOL[torch.bfloat16], sliding_window=64)


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_fa4_fp8_q_and_kv(kind):
    """fp8 goes to FA4 only where its public call takes descales (FA4_PUBLIC_FP8, False
    in 4.0.0b36) on sm100; elsewhere portattn must refuse it with the reason."""
    from portattn.backends.flash_attn_rules import FA4_NO_PUBLIC_FP8, FA4_PUBLIC_FP8

    query_lens, seq_lens = SHAPES[kind]
    batch = _batch(query_lens, seq_lens, num_q_heads=32, num_kv_heads=8, head_size=128,
                   block_size=16, dtype=torch.bfloat16,
                   quant=KVQuant.fp8_per_tensor(0.05, 0.03))
    batch.q = (batch.q.float() / 0.04).to(torch.float8_e4m3fn)
    if FA4_PUBLIC_FP8 and torch.cuda.get_device_capability()[0] == 10:
        out = _run_and_compare(batch, 3e-2, q_scale=0.04)
        assert out.dtype == torch.bfloat16
    else:
        decision = portattn.explain(batch.q, batch.cache, batch.metadata, q_scale=0.04)
        reasons = decision.rejected["flash_attn"]
        expected = FA4_NO_PUBLIC_FP8 if not FA4_PUBLIC_FP8 else "runs fp8 only on sm100"
        assert any(expected in r for r in reasons), reasons


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("query_len", [1, 3])  # decode, then spec-decode rows (varlen both)
def test_fa4_in_a_cuda_graph_without_syncs(block_size, query_len):
    seq_lens = [300, 1000, 64, 2000]
    batch = _batch([query_len] * 4, [n + 4 for n in seq_lens], num_q_heads=8,
                   num_kv_heads=2, head_size=128, block_size=block_size,
                   dtype=torch.bfloat16, seed=5)
    check_graph_replay_without_syncs(batch, seq_lens, query_len, "flash_attn", steps=3,
                                     tolerance=TOL[torch.bfloat16])


def test_fa4_under_torch_compile():
    batch = _batch([1, 1, 5], [300, 1000, 64], num_q_heads=8, num_kv_heads=2, head_size=128,
                   block_size=16, dtype=torch.bfloat16, seed=2)

    def layer(x, cache, metadata):
        return portattn.attention(x * 1.0, cache, metadata, backend="flash_attn") + 1

    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(batch.q, batch.cache, batch.metadata)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens) + 1
    assert relative_error(out, expected) < TOL[torch.bfloat16]


def test_explain_says_when_the_first_call_compiles():
    batch = _batch([1, 9], [100, 9], num_q_heads=8, num_kv_heads=2, head_size=128,
                   block_size=16, dtype=torch.bfloat16)
    options = dict(softcap=7.25)  # a softcap value no other test uses: a new configuration
    (note,) = portattn.explain(batch.q, batch.cache, batch.metadata, backend="flash_attn",
                               **options).notes
    assert "compiles a kernel" in note
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens,
                               **options)
    for _ in range(2):  # compiles, then reuses the compiled kernel: the same result
        out = torch.full_like(batch.q, float("nan"))
        portattn.attention(batch.q, batch.cache, batch.metadata, backend="flash_attn",
                           out=out, **options)
        assert relative_error(out, expected) < TOL[torch.bfloat16]
    (note,) = portattn.explain(batch.q, batch.cache, batch.metadata, backend="flash_attn",
                               **options).notes
    assert "already ran in this process" in note


def test_auto_routing_on_this_gpu(monkeypatch):
    monkeypatch.delenv("PORTATTN_FLASH_ATTN_INTERFACE")
    caps = portattn.probe()
    assert "fa4" in caps.flash_attn_interfaces and caps.flash_attn.ok, caps.flash_attn
    # FA4 leads long chunks (MEASURED_LEADS) at head 256 ...
    prefill = make_paged_batch([2048], [2048], num_q_heads=16, num_kv_heads=4, head_size=256,
                               block_size=16, dtype=torch.bfloat16, device="cuda",
                               poison=False)
    decision = portattn.explain(prefill.q, prefill.cache, prefill.metadata)
    assert decision.backend == "flash_attn" and decision.plan.params["interface"] == "fa4"
    # ... and yields at head 128, block 16, where our Gluon prefill runs (MEASURED_YIELDS)
    prefill = make_paged_batch([2048], [2048], num_q_heads=32, num_kv_heads=8, head_size=128,
                               block_size=16, dtype=torch.bfloat16, device="cuda",
                               poison=False)
    decision = portattn.explain(prefill.q, prefill.cache, prefill.metadata)
    ours = portattn.explain(prefill.q, prefill.cache, prefill.metadata,
                            backend="triton_unified")
    if ours.plan.params.get("gluon"):
        assert decision.backend == "triton_unified", decision
        assert any("yields to triton_unified" in note for note in decision.notes), decision
    else:  # a Triton without Gluon's Hopper warp specialization: the lead stays
        assert decision.backend == "flash_attn", decision
    decode = make_paged_batch([1] * 4, [300] * 4, num_q_heads=32, num_kv_heads=8,
                              head_size=128, block_size=16, dtype=torch.bfloat16,
                              device="cuda", poison=False)
    decision = portattn.explain(decode.q, decode.cache, decode.metadata)
    expected = "triton_unified" if caps.triton_kernels.ok else "flash_attn"
    assert decision.backend == expected, decision


@pytest.mark.parametrize("features, yields", [
    (dict(sinks=True), True),
    (dict(softcap=30.0), True),
    (dict(sliding_window=1024), False),  # FA4 was faster with windows: not in the row
    (dict(layout="packed"), False),  # K and V interleaved per block: not TMA rows
], ids=["sinks", "softcap", "window", "packed-cache"])
def test_the_yield_covers_what_was_measured(monkeypatch, features, yields):
    """MEASURED_YIELDS' row on this GPU: FA4's long-chunk lead yields to our Gluon prefill
    with sinks or a softcap, and keeps it with a sliding window or a cache whose slots
    are not rows (the launch would stage it)."""
    monkeypatch.delenv("PORTATTN_FLASH_ATTN_INTERFACE", raising=False)
    caps = portattn.probe()
    if not ("fa4" in caps.flash_attn_interfaces and caps.flash_attn.ok):
        pytest.skip(f"FA4 is not usable here: {caps.flash_attn}")
    options = dict(features)
    layout = options.pop("layout", "split")
    batch = make_paged_batch([2048], [2048], num_q_heads=32, num_kv_heads=8, head_size=128,
                             block_size=16, dtype=torch.bfloat16, device="cuda",
                             layout=layout, poison=False)
    if options.pop("sinks", False):
        options["sinks"] = torch.randn(32, device="cuda", dtype=torch.float32)
    ours = portattn.explain(batch.q, batch.cache, batch.metadata, backend="triton_unified",
                            **options)
    if yields and not ours.plan.params.get("gluon"):
        pytest.skip(f"this Triton plans no Gluon prefill here: {ours.plan.params}")
    decision = portattn.explain(batch.q, batch.cache, batch.metadata, **options)
    noted = any("yields to triton_unified" in note for note in decision.notes)
    if yields:
        assert decision.backend == "triton_unified" and noted, decision
    else:
        assert decision.backend == "flash_attn" and not noted, decision
    out = portattn.attention(batch.q, batch.cache, batch.metadata, **options)
    expected = dense_attention(batch.q, batch.keys, batch.values, batch.query_lens,
                               **options)
    assert relative_error(out, expected) < TOL[torch.bfloat16]

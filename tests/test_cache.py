"""PagedKVCache construction, layouts and writes (every quant mode round-trips)."""

import pytest
import torch

from indexing import take
from portattn import InputError, KVQuant, PagedKVCache
from portattn.testing import dequantize_as_specified, quantize_as_specified

NUM_BLOCKS, BLOCK, HEADS, D = 6, 16, 3, 40


def _random_tokens(n, d=D, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, HEADS, d, generator=g) * scale


def _read_back(cache, which, slots):
    data = cache.key_cache if which == "k" else cache.value_cache
    scales = cache.k_scale_cache if which == "k" else cache.v_scale_cache
    blocks, offsets = slots // cache.block_size, slots % cache.block_size
    stored = take(data, blocks, offsets)
    return dequantize_as_specified(stored, cache.quant, which, None if scales is None else
                                   scales[blocks, offsets])


QUANTS = [KVQuant.fp8_per_tensor(0.04, torch.tensor([0.05])),
          KVQuant.fp8_per_tensor(0.5, 0.25, torch.float8_e5m2),
          KVQuant.int8_per_token_head(), KVQuant.fp8_per_token_head(),
          KVQuant.fp8_per_token_head(torch.float8_e5m2)]


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.key)
def test_write_stores_what_the_definitions_say(quant):
    """Codes and scales, bit for bit, against DESIGN.md's definitions restated in
    portattn.testing (not portattn.quant, which write itself uses)."""
    cache = PagedKVCache.allocate(NUM_BLOCKS, BLOCK, HEADS, D, quant=quant)
    key, value = _random_tokens(30, scale=40.0), _random_tokens(30, seed=6, scale=0.01)
    key[3, 1] = 0.0  # an all-zero token-head: scale 1
    slots = torch.arange(30) * 3 % (NUM_BLOCKS * BLOCK)
    cache.write(key, value, slots)
    blocks, offsets = slots // BLOCK, slots % BLOCK
    for which, src, data, scale_cache in (("k", key, cache.key_cache, cache.k_scale_cache),
                                          ("v", value, cache.value_cache, cache.v_scale_cache)):
        stored, scales = quantize_as_specified(src, quant, which, data.dtype)
        assert torch.equal(take(data, blocks, offsets).view(torch.uint8),
                           stored.view(torch.uint8))
        if scales is None:
            assert scale_cache is None
        else:
            assert torch.equal(scale_cache[blocks, offsets], scales)
            if which == "k":
                assert scales[3, 1] == 1.0 and (stored[3, 1].float() == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["split", "packed", "diffkv"])
def test_unquantized_write_is_exact(dtype, layout):
    cache = PagedKVCache.allocate(NUM_BLOCKS, BLOCK, HEADS, D, dtype=dtype, layout=layout,
                                  head_size_v=D if layout != "diffkv" else 24)
    key = _random_tokens(20).to(dtype)
    value = _random_tokens(20, cache.head_size_v, seed=1).to(dtype)
    slots = torch.randperm(NUM_BLOCKS * BLOCK, generator=torch.Generator().manual_seed(2))[:20]
    cache.write(key, value, slots)
    assert torch.equal(_read_back(cache, "k", slots), key.float())
    assert torch.equal(_read_back(cache, "v", slots), value.float())


def test_packed_layouts_are_views_of_one_tensor():
    cache = PagedKVCache.allocate(NUM_BLOCKS, BLOCK, HEADS, D, layout="packed")
    assert cache.key_cache.data_ptr() != cache.value_cache.data_ptr()
    assert cache.key_cache.untyped_storage().data_ptr() == \
        cache.value_cache.untyped_storage().data_ptr()
    kv = torch.randn(NUM_BLOCKS, BLOCK, HEADS, 64 + 48)
    diff = PagedKVCache.from_packed(kv, 64)
    assert (diff.head_size_qk, diff.head_size_v) == (64, 48)
    assert torch.equal(diff.value_cache, kv[..., 64:])
    # [num_blocks, block_size, H, 2*D] with K and V interleaved per head
    both = torch.randn(NUM_BLOCKS, BLOCK, HEADS, 2 * D)
    split = PagedKVCache(both[..., :D], both[..., D:])
    assert split.key_cache.stride() == both.stride()


def test_skip_slots_leave_cache_untouched():
    cache = PagedKVCache.allocate(NUM_BLOCKS, BLOCK, HEADS, D, dtype=torch.float32)
    cache.key_cache.fill_(7.0)
    cache.value_cache.fill_(7.0)
    key, value = _random_tokens(4), _random_tokens(4, seed=3)
    slots = torch.tensor([-1, 5, -1, 17])
    cache.write(key, value, slots)
    assert torch.equal(cache.key_cache[0, 5], key[1])
    assert torch.equal(cache.key_cache[1, 1], key[3])
    written = torch.zeros(NUM_BLOCKS, BLOCK, dtype=torch.bool)
    written[0, 5] = written[1, 1] = True
    assert (cache.key_cache[~written] == 7.0).all()


@pytest.mark.parametrize("quant,rel_bound", [
    (KVQuant.int8_per_token_head(), 0.5 / 127),                       # half a step of absmax
    (KVQuant.fp8_per_token_head(), 2.0 ** -4),                        # e4m3: 3 mantissa bits
    (KVQuant.fp8_per_token_head(torch.float8_e5m2), 2.0 ** -3),       # e5m2: 2 mantissa bits
])
def test_per_token_head_round_trip(quant, rel_bound):
    cache = PagedKVCache.allocate(NUM_BLOCKS, BLOCK, HEADS, D, quant=quant)
    assert cache.key_cache.dtype == quant.storage_dtype
    assert cache.k_scale_cache.shape == (NUM_BLOCKS, BLOCK, HEADS)
    key, value = _random_tokens(30), _random_tokens(30, seed=4)
    slots = torch.arange(30) * 3 % (NUM_BLOCKS * BLOCK)
    cache.write(key, value, slots)
    for which, src in (("k", key), ("v", value)):
        back = _read_back(cache, which, slots)
        absmax = src.abs().amax(dim=-1, keepdim=True)
        err = (back - src).abs()
        if quant.mode == "int8_per_token_head":
            assert (err <= absmax * rel_bound * 1.0001).all()
        else:  # relative to each value, plus the subnormal floor scaled to absmax
            floor = absmax * 2.0 ** -9
            assert (err <= src.abs() * rel_bound + floor).all()
        assert err.max() > 0  # it really quantized


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_per_tensor_round_trip(dtype):
    quant = KVQuant.fp8_per_tensor(0.04, torch.tensor([0.05]), dtype)  # no clamping
    cache = PagedKVCache.allocate(NUM_BLOCKS, BLOCK, HEADS, D, quant=quant)
    key, value = _random_tokens(25), _random_tokens(25, seed=5)
    slots = torch.arange(25)
    cache.write(key, value, slots)
    rel = 2.0 ** -4 if dtype == torch.float8_e4m3fn else 2.0 ** -3
    for which, src, scale in (("k", key, 0.04), ("v", value, 0.05)):
        back = _read_back(cache, which, slots)
        assert ((back - src).abs() <= src.abs() * rel + scale * 2.0 ** -9 * 16).all()


def test_fp8_per_tensor_clamps_out_of_range_values():
    quant = KVQuant.fp8_per_tensor(1.0, 1.0)
    cache = PagedKVCache.allocate(2, BLOCK, 1, 8, quant=quant)
    big = torch.full((1, 1, 8), 1e6)
    cache.write(big, -big, torch.tensor([0]))
    assert torch.isfinite(cache.key_cache.float()).all()
    assert cache.key_cache[0, 0].float().max() == 448.0
    assert cache.value_cache[0, 0].float().min() == -448.0


def test_all_zero_token_head_dequantizes_to_zero():
    cache = PagedKVCache.allocate(2, BLOCK, HEADS, D, quant=KVQuant.int8_per_token_head())
    zeros = torch.zeros(1, HEADS, D)
    cache.write(zeros, zeros, torch.tensor([3]))
    assert torch.equal(_read_back(cache, "k", torch.tensor([3])), zeros)


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.key)
def test_a_nan_in_a_token_head_reads_back_as_nan(quant):
    """A NaN never becomes a finite code: fp8 stores NaN, and a per-token-head scale is
    NaN for a token-head holding one (an int8 code cannot be NaN). The other token-heads
    are stored as the definitions say."""
    cache = PagedKVCache.allocate(NUM_BLOCKS, BLOCK, HEADS, D, quant=quant)
    key, value = _random_tokens(4), _random_tokens(4, seed=2)
    key[1, 2, 5] = float("nan")
    slots = torch.tensor([3, 17, 40, 41])
    cache.write(key, value, slots)
    back = _read_back(cache, "k", slots)
    assert torch.isnan(back[1, 2, 5])
    if cache.k_scale_cache is not None:
        assert torch.isnan(back[1, 2]).all()
    finite = torch.ones(4, HEADS, dtype=torch.bool)
    finite[1, 2] = False
    want, _ = quantize_as_specified(key[finite], quant, "k", cache.key_cache.dtype)
    data = take(cache.key_cache, slots // BLOCK, slots % BLOCK)
    assert torch.equal(take(data, finite).view(torch.uint8), want.view(torch.uint8))
    assert torch.isfinite(_read_back(cache, "v", slots)).all()


# ---------------------------------------------------------------- input errors


def test_cache_constructor_errors():
    k = torch.zeros(4, 16, 2, 32, dtype=torch.float16)
    with pytest.raises(InputError, match="value_cache"):
        PagedKVCache(k, torch.zeros(4, 16, 3, 32, dtype=torch.float16))
    with pytest.raises(InputError, match="value_cache.*dtype"):
        PagedKVCache(k, torch.zeros(4, 16, 2, 32, dtype=torch.float32))
    with pytest.raises(InputError, match="key_cache.*contiguous last"):
        PagedKVCache(torch.zeros(4, 16, 32, 2).transpose(2, 3), k)
    with pytest.raises(InputError, match="key_cache.*4-D"):
        PagedKVCache(torch.zeros(4, 16, 32), k)
    with pytest.raises(InputError, match="key_cache.*int8"):
        PagedKVCache(k, k, KVQuant.int8_per_token_head())
    with pytest.raises(InputError, match="key_cache.*float16, bfloat16 or float32"):
        PagedKVCache(k.to(torch.int8), k.to(torch.int8))
    with pytest.raises(InputError, match="k_scale_cache"):
        PagedKVCache(k.to(torch.int8), k.to(torch.int8), KVQuant.int8_per_token_head(),
                     k_scale_cache=torch.zeros(4, 16, 3))
    with pytest.raises(InputError, match="head_size_qk"):
        PagedKVCache.from_packed(torch.zeros(4, 16, 2, 64), 64)
    with pytest.raises(InputError, match="layout"):
        PagedKVCache.allocate(2, 16, 2, 32, layout="weird")


def test_kvquant_errors():
    with pytest.raises(InputError, match="KVQuant.k_scale"):
        KVQuant.fp8_per_tensor(None, 1.0)
    with pytest.raises(InputError, match="KVQuant.v_scale"):
        KVQuant.fp8_per_tensor(1.0, -2.0)
    with pytest.raises(InputError, match="KVQuant.k_scale"):
        KVQuant.fp8_per_tensor(torch.ones(2), 1.0)
    with pytest.raises(InputError, match="KVQuant.fp8_dtype"):
        KVQuant.fp8_per_token_head(torch.float16)
    with pytest.raises(InputError, match="KVQuant.mode"):
        KVQuant("int4")


def _aliased_caches():
    packed = torch.zeros(NUM_BLOCKS, BLOCK, HEADS, D)
    scales = torch.zeros(NUM_BLOCKS, BLOCK, HEADS)
    codes = torch.zeros(NUM_BLOCKS, BLOCK, HEADS, D, dtype=torch.int8)
    int8 = KVQuant.int8_per_token_head()
    return {
        "value_cache": lambda: PagedKVCache(packed, packed),
        "key_cache": lambda: PagedKVCache(packed[:1, :1].expand(NUM_BLOCKS, BLOCK, HEADS, D),
                                          packed.clone()),
        "v_scale_cache": lambda: PagedKVCache(codes, codes.clone(), int8,
                                              k_scale_cache=scales, v_scale_cache=scales),
        "k_scale_cache": lambda: PagedKVCache(
            codes, codes.clone(), int8, k_scale_cache=scales[:1].expand_as(scales),
            v_scale_cache=scales.clone()),
    }


@pytest.mark.parametrize("name", ["value_cache", "key_cache", "v_scale_cache",
                                  "k_scale_cache"])
def test_write_refuses_caches_whose_elements_share_memory(name):
    """V over K, an expanded cache, one scale cache for both, an expanded scale cache:
    each store would overwrite another (wrong numbers, session 40's audit). Attention
    reads them; ``write`` names the tensor and stores nothing."""
    cache = _aliased_caches()[name]()
    before = [t.clone() for t in (cache.key_cache, cache.value_cache)]
    key = _random_tokens(4)
    with pytest.raises(InputError, match=f"^cache.{name}: expected "):
        cache.write(key, key.clone(), torch.arange(4))
    assert all(torch.equal(a, b) for a, b in zip(before, (cache.key_cache, cache.value_cache)))


@pytest.mark.parametrize("layout", ["packed", "diffkv"])
def test_write_takes_packed_layouts_whose_views_interleave(layout):
    """K and V views of one tensor interleave without sharing an element: written, and
    each reads back what was stored."""
    cache = PagedKVCache.allocate(NUM_BLOCKS, BLOCK, HEADS, D, dtype=torch.float32,
                                  head_size_v=D // 2 if layout == "diffkv" else None,
                                  layout=layout)
    key, value = _random_tokens(5), _random_tokens(5, d=cache.head_size_v, seed=1)
    slots = torch.tensor([3, 17, 40, 41, 95])
    cache.write(key, value, slots)
    assert torch.equal(_read_back(cache, "k", slots), key)
    assert torch.equal(_read_back(cache, "v", slots), value)


def test_write_errors():
    cache = PagedKVCache.allocate(2, BLOCK, HEADS, D)
    key = torch.zeros(3, HEADS, D, dtype=torch.float16)
    with pytest.raises(InputError, match=r"^key: expected a tensor \[num_tokens, 3, 40\]"):
        cache.write(key[:, :2], key, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(InputError, match="value: expected 3 tokens"):
        cache.write(key, key[:2], torch.zeros(3, dtype=torch.int64))
    with pytest.raises(InputError, match="slot_mapping"):
        cache.write(key, key, torch.zeros(3, dtype=torch.float32))
    with pytest.raises(InputError, match=r"slot_mapping: expected slots in \[-1, 31\]"):
        cache.write(key, key, torch.tensor([0, 1, 32]))
    with pytest.raises(InputError, match="slot_mapping"):
        cache.write(key, key, torch.tensor([0, -2, 1]))
    before = cache.key_cache.clone()
    with pytest.raises(InputError, match=r"slot_mapping: expected distinct slots .*"
                                         r"got slot 7 2 times"):
        cache.write(key.normal_(), key, torch.tensor([7, 3, 7]))
    assert torch.equal(cache.key_cache, before)  # refused before anything is stored
    cache.write(key, key, torch.tensor([-1, 5, -1]))  # -1 may repeat


@pytest.mark.parametrize("quant", QUANTS[2:], ids=lambda q: q.key)
def test_a_token_head_too_small_for_a_scale_reads_back_as_zeros(quant):
    """absmax / max underflows to 0 in float32 (e4m3 below about 3.1e-43, e5m2 4e-41, int8
    8.9e-44): scale 1 and zero codes, as for an all-zero token-head, never the NaN codes of
    0 / 0 that made whole attention rows NaN (session 41's audit)."""
    cache = PagedKVCache.allocate(2, BLOCK, HEADS, D, quant=quant)
    key, value = _random_tokens(2), _random_tokens(2, seed=1)
    key[1, 0] = 0.0
    key[1, 0, 4] = 1e-44
    slots = torch.tensor([5, 6])
    cache.write(key, value, slots)
    assert cache.k_scale_cache[0, 6, 0] == 1.0
    back = _read_back(cache, "k", slots)
    assert torch.equal(back[1, 0], torch.zeros(D))
    want, _ = quantize_as_specified(key, quant, "k", cache.key_cache.dtype)
    assert torch.equal(take(cache.key_cache, slots // BLOCK, slots % BLOCK).view(torch.uint8),
                       want.view(torch.uint8))


def test_write_checks_reassigned_attributes_before_storing():
    """An attribute reassigned after the constructor to something it would refuse is
    named by ``write``'s InputError, and nothing is stored (session 41's audit: an int8
    cache's key_cache reassigned to fp16 took codes as values; a smaller value_cache or
    scale cache failed half-way with an IndexError)."""
    int8 = KVQuant.int8_per_token_head()
    key, value = _random_tokens(2), _random_tokens(2, seed=1)
    slots = torch.tensor([1, 30])
    edits = [
        ("key_cache", lambda c: c.__dict__.update(key_cache=c.key_cache.to(torch.float16),
                                                  value_cache=c.value_cache.to(torch.float16))),
        ("value_cache", lambda c: setattr(c, "value_cache", c.value_cache[:1])),
        ("k_scale_cache", lambda c: setattr(c, "k_scale_cache", c.k_scale_cache[:1])),
        ("quant", lambda c: setattr(c, "quant", "int8")),
        # the argument checks read these: they must not fail first (IndexError, or key
        # blamed for the cache's fault: session 41's review)
        ("value_cache", lambda c: setattr(c, "value_cache", c.value_cache[0])),
        ("key_cache", lambda c: setattr(c, "key_cache", None)),
    ]
    for name, edit in edits:
        cache = PagedKVCache.allocate(2, BLOCK, HEADS, D, quant=int8)
        cache.write(key, value, slots)  # checked and remembered
        stores = [t for t in (cache.key_cache, cache.value_cache, cache.k_scale_cache)]
        before = [t.clone() for t in stores]
        edit(cache)
        with pytest.raises(InputError, match=f"^cache.{name}: expected "):
            cache.write(key * 2, value * 2, slots)
        assert all(torch.equal(a, b) for a, b in zip(before, stores))  # nothing stored


def test_a_reassigned_quant_without_a_format_takes_the_caches():
    """``KVQuant.fp8_per_tensor`` with no ``dtype`` leaves the fp8 format to the cache
    tensors it is given to: the constructor adopted it, a reassigned ``cache.quant`` was
    refused as a mismatch of ``cache.key_cache`` (e4m3fn expected; the quant audit)."""
    cache = PagedKVCache.allocate(2, BLOCK, HEADS, D, dtype=torch.float8_e5m2,
                                  quant=KVQuant.fp8_per_tensor(1.0, 1.0))
    cache.quant = KVQuant.fp8_per_tensor(2.0, 0.5)
    key, value = _random_tokens(2), _random_tokens(2, seed=1)
    slots = torch.tensor([4, 21])
    cache.write(key, value, slots)
    assert cache.quant.fp8_dtype == torch.float8_e5m2
    want_k = (key.float() / 2.0).to(torch.float8_e5m2)
    want_v = (value.float() / 0.5).to(torch.float8_e5m2)
    blocks, offsets = slots // BLOCK, slots % BLOCK
    for stored, want in ((cache.key_cache, want_k), (cache.value_cache, want_v)):
        assert torch.equal(take(stored, blocks, offsets).view(torch.uint8),
                           want.view(torch.uint8))
    cache.quant = KVQuant.fp8_per_tensor(1.0, 1.0, torch.float8_e4m3fn)  # named: a mismatch
    with pytest.raises(InputError, match="^cache.key_cache: expected dtype torch.float8_e4m3fn"):
        cache.write(key, value, slots)


def test_write_refuses_sources_that_are_views_of_the_cache():
    """``key`` / ``value`` sharing memory with a tensor the write stores into: the GPU
    kernel's stores would race with its reads (the interpreter moved slots 0..2 to 1..3
    as [1, 1, 1] where PyTorch gives [1, 2, 3]: session 41's audit)."""
    cache = PagedKVCache.allocate(2, BLOCK, HEADS, D, dtype=torch.float32, layout="packed")
    cache.key_cache[0, :3] = torch.arange(1.0, 4.0)[:, None, None]
    with pytest.raises(InputError, match="^key: expected a tensor apart from the cache's "
                                         "key_cache"):
        cache.write(cache.key_cache[0, 0:3], torch.zeros(3, HEADS, D), torch.arange(1, 4))
    with pytest.raises(InputError, match="^value: expected .* apart from the cache's "
                                         "key_cache"):
        cache.write(torch.zeros(3, HEADS, D), cache.key_cache[1, 0:3], torch.arange(1, 4))
    copy = cache.key_cache[0, 0:3].clone()
    cache.write(copy, copy, torch.arange(1, 4))
    assert torch.equal(cache.key_cache[0, 1:4, 0, 0], torch.tensor([1.0, 2.0, 3.0]))


def test_write_refuses_sparse_tensors():
    cache = PagedKVCache.allocate(2, BLOCK, HEADS, D)
    key = torch.zeros(3, HEADS, D, dtype=torch.float16)
    slots = torch.arange(3)
    with pytest.raises(InputError, match="^key: expected a dense"):
        cache.write(key.to_sparse(), key, slots)
    with pytest.raises(InputError, match="^slot_mapping: expected a dense"):
        cache.write(key, key, slots.to_sparse())


def test_sparse_scales_and_scale_caches_are_named():
    """A sparse (or MKL-DNN) one-element scale, or scale cache of the right shape and
    dtype, is no dense tensor the kernels can read: named when given (quant audit: the
    scale raised a RuntimeError from reshape, the scale caches passed the constructor and
    crashed attention and write in torch's indexing)."""
    import portattn
    from portattn import AttentionMetadata

    with pytest.raises(InputError, match="^KVQuant.v_scale: expected .* float32 tensor"):
        KVQuant.fp8_per_tensor(0.5, torch.tensor([0.5]).to_sparse())
    codes = torch.zeros(NUM_BLOCKS, BLOCK, HEADS, D, dtype=torch.int8)
    scales = torch.ones(NUM_BLOCKS, BLOCK, HEADS)
    for layout in (scales.to_sparse(), scales.to_mkldnn()):
        with pytest.raises(InputError, match="^v_scale_cache: expected a float32 tensor .*"
                           f"layout {layout.layout}$"):
            PagedKVCache(codes, codes.clone(), KVQuant.int8_per_token_head(),
                         v_scale_cache=layout)
    cache = PagedKVCache(codes, codes.clone(), KVQuant.int8_per_token_head())
    cache.k_scale_cache = scales.to_sparse()  # reassigned: checked again by each call
    q = torch.zeros(1, HEADS, D)
    metadata = AttentionMetadata.from_lengths([1], [3], [[0]])
    with pytest.raises(InputError, match="^cache.k_scale_cache: expected a float32 tensor"):
        portattn.attention(q, cache, metadata, backend="torch_ref")
    with pytest.raises(InputError, match="^cache.k_scale_cache: expected a float32 tensor"):
        cache.write(q, q, torch.tensor([0]))
    cache.k_scale_cache = scales
    with pytest.raises(InputError, match="^q_scale: expected .* float32 tensor"):
        portattn.attention(q.to(torch.float8_e4m3fn), cache, metadata,
                           q_scale=torch.tensor([1.0]).to_sparse())


def test_write_stores_values_without_autograd_history():
    """K / V straight from a projection that records gradients: the cache gets their
    values only (no graph growing by one node per write, holding every earlier step's
    activations)."""
    projection = torch.nn.Linear(D, HEADS * D)
    cache = PagedKVCache.allocate(2, BLOCK, HEADS, D, dtype=torch.float32,
                                  quant=KVQuant.int8_per_token_head())
    plain = PagedKVCache.allocate(2, BLOCK, HEADS, D, dtype=torch.float32)
    x = torch.randn(2, D)
    key = projection(x).view(2, HEADS, D)
    assert key.requires_grad
    for c in (cache, plain):
        c.write(key, key, torch.tensor([3, 4]))
        for t in (c.key_cache, c.value_cache, c.k_scale_cache, c.v_scale_cache):
            assert t is None or (not t.requires_grad and t.grad_fn is None)
    assert torch.equal(plain.key_cache[0, 3:5], key.detach())


def test_a_write_traced_by_torch_compile_leaves_the_eager_checks_whole():
    """Tracing sees fake tensors (no addresses): it must not leave a remembered "checked"
    behind, or a later eager write of a view of the cache would pass unchecked (session
    41's review)."""
    cache = PagedKVCache.allocate(2, BLOCK, HEADS, D, dtype=torch.float32)

    def step(k, v, slots):
        cache.write(k, v, slots)

    torch._dynamo.reset()
    key = _random_tokens(3)
    torch.compile(step, backend="eager")(key, key, torch.arange(3))
    assert torch.equal(cache.key_cache[0, :3], key)
    with pytest.raises(InputError, match="^key: expected a tensor apart from the cache's"):
        cache.write(cache.key_cache[0, 0:3], torch.zeros(3, HEADS, D), torch.arange(1, 4))

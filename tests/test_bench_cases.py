"""The bench's quantized cases build the caches their names say (CPU; no timing)."""

from __future__ import annotations

import pytest
import torch

from portattn.bench.cases import build_inputs, default_cases
from portattn.bench.report import plain_case_name


def _case(name):
    by_name = {c.name: c for c in default_cases(shrink=512)}
    return by_name[name]


@pytest.mark.parametrize("name, mode, fp8", [
    ("decode-32x8192-fp8", "fp8_per_tensor", torch.float8_e4m3fn),
    ("decode-32x8192-fp8e5m2", "fp8_per_tensor", torch.float8_e5m2),
    ("decode-128x8192-fp8e5m2pth", "fp8_per_token_head", torch.float8_e5m2),
    ("decode-32x8192-fp8pth", "fp8_per_token_head", torch.float8_e4m3fn),
])
def test_fp8_cases_store_the_format_their_name_says(name, mode, fp8):
    inp = build_inputs(_case(name), num_q_heads=4, num_kv_heads=2, head_size=16,
                       block_size=16, dtype=torch.bfloat16, device="cpu")
    cache = inp.cache
    assert cache.key_cache.dtype == fp8 and cache.value_cache.dtype == fp8
    assert cache.quant.mode == mode and cache.quant.fp8_dtype == fp8
    # random, non-zero codes (the bench times reads of real data, not of zeros)
    assert cache.key_cache.float().abs().sum() > 0


def test_every_e5m2_case_has_the_plain_case_it_is_compared_with():
    names = {c.name for c in default_cases()}
    e5m2 = [c for c in default_cases() if c.fp8_format == "e5m2"]
    assert e5m2 and all(plain_case_name(c.name) in names for c in e5m2)

"""Indexing that works for every dtype on the torch releases the tests run on."""

from __future__ import annotations

import torch

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def take(t: torch.Tensor, *index) -> torch.Tensor:
    """``t[index]``; an fp8 tensor is indexed as its bytes, which are its values (torch
    2.9's CPU indexing has no fp8 kernel; 2.13's has)."""
    if t.dtype in FP8:
        return t.view(torch.uint8)[index].view(t.dtype)
    return t[index]

"""``portattn.overlap``: whether views share an element, against the addresses each
element's bytes occupy, enumerated here (an oracle that knows nothing of strides' rules)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from portattn.overlap import overlaps_itself, share_elements


def _addresses(t: torch.Tensor) -> set[int]:
    found: set[int] = set()
    for index in itertools.product(*(range(n) for n in t.shape)):
        start = t.data_ptr() + sum(i * s for i, s in zip(index, t.stride())) * t.element_size()
        found.update(range(start, start + t.element_size()))
    return found


def _shared(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(_addresses(a) & _addresses(b))


def _view_pairs():
    kv = torch.zeros(3, 2, 4, 2, 5)
    fused = torch.zeros(3, 4, 2, 12)
    flat = torch.zeros(40)
    rows = flat.view(4, 10)
    pairs = [(kv[:, 0], kv[:, 1]), (kv[:, 0], kv[:, 0]), (kv[:, 0, :2], kv[:, 0, 1:3]),
             (fused[..., :5], fused[..., 5:]), (fused[..., :6], fused[..., 5:]),
             (flat[:10], flat[10:20]), (flat[:10], flat[5:15]),
             (rows[:, :3], rows[:, 3:6]), (rows[:, :3], rows[:, 2:6]),
             (torch.zeros(3, 4), torch.zeros(3, 4))]
    rng = random.Random(0)
    grid = torch.zeros(4, 5, 6)
    wide = grid.view(4, 30)
    for _ in range(60):
        def cut(n):
            lo = rng.randrange(0, n // 2)
            return slice(lo, rng.randrange(lo + 1, n + 1))
        pairs.append((grid[cut(4), :, cut(6)], grid[cut(4), :, cut(6)]))
        pairs.append((wide[:, cut(30)], wide[:, cut(30)]))
    return pairs


PAIRS = _view_pairs()


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_share_elements_agrees_with_the_addresses(pair):
    a, b = PAIRS[pair]
    truth = _shared(a, b)
    assert share_elements(a, b) == truth
    assert share_elements(b, a) == truth


def test_memory_shared_through_another_storage_object_is_seen():
    """Two storage objects over one buffer (DLPack, NumPy views): judged by address."""
    np = pytest.importorskip("numpy")
    x = torch.zeros(64)
    through_dlpack = torch.from_dlpack(x[8:40])
    assert share_elements(x[:16], through_dlpack)
    assert not share_elements(x[:8], through_dlpack)
    a = np.zeros(64, dtype=np.float32)
    assert share_elements(torch.from_numpy(a)[:16], torch.from_numpy(a[8:]))
    assert not share_elements(torch.from_numpy(a)[:8], torch.from_numpy(a[8:]))


def test_views_of_different_strides_are_judged_by_their_ranges():
    """Interleaved views with different strides get the safe answer (True) when their
    address ranges meet, False when they do not."""
    x = torch.zeros(64)
    assert share_elements(x[0:32:2], x[1:33:4])  # ranges meet: conservative
    assert not share_elements(x[:16], x[16:48:2])


def test_overlaps_itself():
    x = torch.zeros(4, 6)
    assert overlaps_itself(x[:1].expand(4, 6))
    assert overlaps_itself(torch.zeros(10).as_strided((3, 4), (2, 1)))
    assert not overlaps_itself(x)
    assert not overlaps_itself(x[:, ::2])
    assert not overlaps_itself(x.t())

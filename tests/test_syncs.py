"""fastnft.testing.syncs.SyncCounter counts each host-sync kind, and nothing that does not sync."""

from __future__ import annotations

import torch

from fastnft.testing.syncs import SyncCounter


def test_each_sync_kind_is_counted():
    x = torch.arange(6.0)
    m = x > 2
    with SyncCounter() as s:
        x.nonzero()
        torch.nonzero(m)
        torch.where(m)
        torch.unique(torch.tensor([1, 1, 2]))
        x[m]
        x[m] = 0.0
        x[:, None][m, 0]
        x.sum().item()
        x.tolist()
        bool(m.any())
        int(x.max())
        float(x.max())
        list(range(torch.tensor(2)))
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long))
    assert s.counts == {"nonzero": 3, "unique": 1, "mask_index": 3, "item": 1, "tolist": 1, "bool": 1,
                        "int": 2, "float": 1, "repeat_interleave": 1}, s.report()
    assert s.total == 14
    assert "test_syncs.py" in s.report()


def test_sync_free_ops_are_not_counted():
    x = torch.randn(4, 3)
    idx = torch.tensor([0, 2])
    with SyncCounter() as s:
        y = torch.where(x > 0, x, 0.0)  # three-argument where: no sync
        y = y[idx] + x[1:3]  # integer-tensor and slice indexing
        y = torch.repeat_interleave(y, 2, dim=0)  # int repeats: the size is known
        torch.cumsum(y, 0).max()
    assert s.total == 0, s.report()
    s.reset()
    assert s.total == 0 and not s.sites
    with s:
        with s.pause():
            x.nonzero()
        x.nonzero()
    assert s.counts == {"nonzero": 1}

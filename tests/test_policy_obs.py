"""Batched observation helpers: tensors and dicts (frames, state, instructions) index and concatenate alike."""

from __future__ import annotations

import pytest
import torch

from fastnft.policies.obs import obs_batch_size, obs_cat, obs_index, obs_to


def _dict_obs(B: int, base: int) -> dict:
    return {"observation.images.cam": torch.arange(base, base + B)[:, None, None].expand(B, 2, 3).clone(),
            "observation.state": torch.arange(base, base + B, dtype=torch.float32)[:, None],
            "task": "pick up the cube"}


def test_dict_index_and_cat_keep_rows_aligned():
    a, b = _dict_obs(3, 0), _dict_obs(2, 10)
    cat = obs_cat([a, b])
    assert obs_batch_size(cat) == 5 and cat["task"] == ["pick up the cube"] * 5
    assert cat["observation.state"][:, 0].tolist() == [0, 1, 2, 10, 11]
    sub = obs_index(cat, torch.tensor([4, 0]))
    assert sub["observation.state"][:, 0].tolist() == [11, 0] and sub["observation.images.cam"][0, 0, 0] == 11
    keep = torch.tensor([True, False, True, False, True])
    sub2 = obs_index(cat, keep)
    assert sub2["observation.state"][:, 0].tolist() == [0, 2, 11] and len(sub2["task"]) == 3
    mixed = obs_cat([obs_index(a, torch.tensor([1])), dict(_dict_obs(1, 20), task=["open the drawer"])])
    assert mixed["task"] == ["pick up the cube", "open the drawer"]


def test_tensor_obs_and_errors():
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(obs_cat([obs_index(x, torch.tensor([2])), x[:1]]), torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    assert obs_to(_dict_obs(2, 0), "cpu")["task"] == "pick up the cube"
    with pytest.raises(ValueError, match="different keys"):
        obs_cat([_dict_obs(1, 0), {"observation.state": torch.zeros(1, 1)}])
    with pytest.raises(ValueError, match="no batched value"):
        obs_batch_size({"task": "x"})

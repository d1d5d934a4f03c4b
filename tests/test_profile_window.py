"""``--profile-steps a:b`` (issue 7, part 8): cudaProfilerStart before iteration a, Stop after b-1, never iteration 0."""

import pytest
import torch

from fastnft.profiling import ProfileWindow


def _drive(window, iterations):
    for it in range(iterations):
        window.before(it)
        window.after(it)
    window.close()


def test_window_calls_profiler_start_and_stop_around_a_to_b(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    w = ProfileWindow("2:4")
    _drive(w, 6)
    assert w.profiled == [2, 3] and calls == ["sync", "start", "sync", "stop"]


def test_window_closes_at_the_end_of_training_and_is_a_no_op_without_cuda():
    w = ProfileWindow("3:10")
    _drive(w, 5)
    assert w.profiled == [3, 4] and not w.active
    none = ProfileWindow(None)
    _drive(none, 3)
    assert none.profiled == []


@pytest.mark.parametrize("spec", ["0:3", "3:3", "a:b", "2", "1:2:3"])
def test_bad_specs_name_the_fix(spec):
    with pytest.raises(ValueError, match="profile-steps"):
        ProfileWindow(spec)

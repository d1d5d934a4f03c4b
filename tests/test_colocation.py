"""Co-location helpers: the EGL device of a rank's GPU, pinned non-blocking frame copies.
Wiring them into the LIBERO workers is left to the env rewrite (docs/gpu.md, section 5)."""

import pytest
import torch

from fastnft.devices import PinnedStager, egl_device_id


def test_egl_device_id_is_the_physical_index_of_the_ranks_visible_gpu():
    assert egl_device_id("cpu") is None
    assert egl_device_id("cuda:1", visible="") == "1"  # all GPUs visible: CUDA's index
    assert egl_device_id("cuda:1", visible="4,6") == "6"  # the rank sees physical GPUs 4 and 6
    assert egl_device_id("cuda", visible="3") == "3"
    assert egl_device_id("cuda:0", visible="GPU-1a2b") is None  # UUIDs: leave MuJoCo's default
    assert egl_device_id("cuda:2", visible="0,1") is None  # out of range: no guess


def test_pinned_stager_on_cpu_is_a_plain_copy():
    st = PinnedStager("cpu")
    x = torch.randint(0, 256, (2, 8, 6, 3), dtype=torch.uint8)
    assert torch.equal(st.stage("cam", x), x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and async copies need a CUDA GPU")
def test_pinned_stager_reuses_its_buffer_without_overwriting_a_frame_in_flight():
    st = PinnedStager("cuda:0")
    frames = [torch.randint(0, 256, (64, 224, 224, 3), dtype=torch.uint8) for _ in range(3)]
    outs = [st.stage("cam", f) for f in frames]
    torch.cuda.synchronize()
    assert all(torch.equal(o.cpu(), f) for o, f in zip(outs, frames, strict=True))
    assert len(st._bufs) == 1 and st._bufs[("cam", (64, 224, 224, 3), torch.uint8)][0].is_pinned()


def test_libero_workers_render_on_the_ranks_gpu(monkeypatch):
    """A LIBERO env on a CUDA host starts its workers with MUJOCO_EGL_DEVICE_ID = the rank's physical GPU."""
    import fastnft.envs.libero as libero_mod
    from fastnft.config import EnvConfig

    class Started(Exception):
        pass

    seen = {}

    def pool(*args, env=None, **kwargs):
        seen.update(env)
        raise Started

    monkeypatch.setattr(libero_mod, "WorkerPool", pool)
    monkeypatch.setattr(libero_mod, "suite_tasks", lambda suite: [])
    monkeypatch.setattr(libero_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID", raising=False)
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    cfg = EnvConfig(task="libero_object", obs_mode="state")
    with pytest.raises(Started):
        libero_mod.LiberoVectorEnv(cfg, num_envs=1)
    assert seen["MUJOCO_EGL_DEVICE_ID"] == "5" and seen["MUJOCO_GL"] == "egl"
    seen.clear()
    monkeypatch.setenv("MUJOCO_EGL_DEVICE_ID", "0")  # the user's choice wins
    with pytest.raises(Started):
        libero_mod.LiberoVectorEnv(cfg, num_envs=1)
    assert seen["MUJOCO_EGL_DEVICE_ID"] == "0"

"""One LIBERO env in its own process: the worker that :class:`fastnft.envs.libero.LiberoVectorEnv` starts per env.

Run as a script by path (``python .../libero_worker.py``), never imported through the ``fastnft`` package: a
package import would pull in torch (~180 MiB per process) through ``fastnft.envs``. It imports only numpy,
robosuite and LIBERO's env code. The parent has already checked every file LIBERO opens against the upstream
manifest and points ``LIBERO_CONFIG_PATH`` at a private config whose folders hold only verified files.

Protocol: pickled ``(command, kwargs)`` tuples on stdin, pickled ``("ok", result)`` or ``("error", traceback)`` on
the original stdout; everything LIBERO and robosuite print goes to stderr. Commands:

* ``reset(bddl, init_state, cameras, image_size, settle_steps)``: build the sim if the task (BDDL file) or the
  camera set changed, else reuse it (a soft reset); apply the flattened ``[time, qpos, qvel]`` init state with
  ``set_init_state``; run ``settle_steps`` no-op steps with the gripper open (the protocol's 15). Returns the
  observation.
* ``step(action)``: one 20 Hz OSC_POSE step with a ``[7]`` float action in ``[-1, 1]``; returns
  ``(obs, reward, success)``; success is LIBERO's BDDL goal check (the same test as its ``done``).
* ``get_state()`` / ``object_positions()`` / ``place_object(name, pos)`` / ``raw_frames()``: the flattened sim
  state, the world positions of the task's objects, teleporting one object (free joint), and the unrotated frames,
  for tests and diagnostics.
* ``close()``.

Observation: ``{"state": [8] float32, <camera>: [H, W, 3] uint8}`` with state ``eef_pos (3) + axis-angle of
eef_quat (3) + gripper_qpos (2)`` (openpi's and RLinf's LIBERO state) and frames rotated 180 degrees (MuJoCo's
offscreen buffer is upside down; openpi, RLinf and lerobot flip both axes).
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import traceback

# Python puts this script's folder first on sys.path, where fastnft's libero.py would shadow the libero package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np

CAMERA_NAMES = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}
"""fastnft's camera name -> LIBERO's (robosuite's) camera name."""

_NOOP = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # gripper -1 = open


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """``[4]`` quaternion ``(x, y, z, w)`` (robosuite's order) -> ``[3]`` axis-angle (robosuite's
    ``quat2axisangle``: zero vector for the identity)."""
    q = np.asarray(quat, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    den = math.sqrt(max(1.0 - w * w, 0.0))
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * math.acos(w) / den


class Worker:
    """The sim of one env; built lazily on the first reset, rebuilt only when the task or cameras change."""

    def __init__(self) -> None:
        self.env = None
        self.key: tuple | None = None
        self.cameras: tuple[str, ...] = ()

    def _build(self, bddl: str, cameras: tuple[str, ...], image_size: int) -> None:
        from libero.libero.envs.env_wrapper import ControlEnv, OffScreenRenderEnv

        if self.env is not None:
            self.env.close()
            self.env = None
        kw = {"bddl_file_name": bddl, "horizon": 100_000, "ignore_done": True, "hard_reset": False,
              "render_gpu_device_id": int(os.environ.get("MUJOCO_EGL_DEVICE_ID", "-1"))}
        if cameras:
            self.env = OffScreenRenderEnv(camera_names=[CAMERA_NAMES[c] for c in cameras],
                                          camera_heights=image_size, camera_widths=image_size, **kw)
        else:  # no renderer at all: state observations need no GL context
            self.env = ControlEnv(use_camera_obs=False, has_offscreen_renderer=False, camera_names=[], **kw)
        self.cameras = cameras

    def _obs(self, raw: dict) -> dict:
        state = np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]),
                                raw["robot0_gripper_qpos"]]).astype(np.float32)
        out = {"state": state}
        for c in self.cameras:
            out[c] = np.ascontiguousarray(raw[f"{CAMERA_NAMES[c]}_image"][::-1, ::-1]).astype(np.uint8, copy=False)
        return out

    def reset(self, bddl: str, init_state: np.ndarray, cameras: tuple[str, ...] = (), image_size: int = 256,
              settle_steps: int = 15) -> dict:
        key = (bddl, tuple(cameras), int(image_size))
        if self.env is None or key != self.key:
            self._build(bddl, tuple(cameras), int(image_size))
            self.key = key
        self.env.reset()
        raw = self.env.set_init_state(np.asarray(init_state, dtype=np.float64))
        for _ in range(settle_steps):
            raw, _, _, _ = self.env.step(_NOOP)
        return self._obs(raw)

    def step(self, action: np.ndarray) -> tuple[dict, float, bool]:
        raw, reward, done, _ = self.env.step(np.asarray(action, dtype=np.float64).reshape(7))
        return self._obs(raw), float(reward), bool(done)

    def raw_frames(self) -> dict[str, np.ndarray]:
        """The cameras' frames as MuJoCo renders them (not rotated), re-rendered at the current state."""
        raw = self.env.env._get_observations(force_update=True)
        return {c: np.array(raw[f"{CAMERA_NAMES[c]}_image"]) for c in self.cameras}

    def get_state(self) -> np.ndarray:
        return np.asarray(self.env.get_sim_state(), dtype=np.float64)

    def object_positions(self) -> dict[str, np.ndarray]:
        env = self.env.env
        out = {}
        for name in {**env.objects_dict, **env.fixtures_dict}:
            out[name] = np.array(env.sim.data.body_xpos[env.obj_body_id[name]], dtype=np.float64)
        return out

    def place_object(self, name: str, pos: np.ndarray) -> dict:
        env = self.env.env
        obj = env.objects_dict[name]
        quat = np.array(env.sim.data.get_joint_qpos(obj.joints[-1])[3:7])
        env.sim.data.set_joint_qpos(obj.joints[-1], np.concatenate([np.asarray(pos, dtype=np.float64), quat]))
        env.sim.data.set_joint_qvel(obj.joints[-1], np.zeros(6))
        env.sim.forward()
        return self.object_positions()

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


def main() -> None:
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # LIBERO and robosuite print to stdout; keep the protocol channel clean
    sys.stdout = sys.stderr
    proto_in = sys.stdin.buffer
    worker = Worker()
    while True:
        try:
            cmd, kwargs = pickle.load(proto_in)
        except EOFError:  # the parent went away
            break
        try:
            result = getattr(worker, cmd)(**kwargs)
            reply = ("ok", result)
        except Exception:  # noqa: BLE001 - sent to the parent, which raises it there
            reply = ("error", traceback.format_exc())
        pickle.dump(reply, proto_out, protocol=pickle.HIGHEST_PROTOCOL)
        proto_out.flush()
        if cmd == "close":
            break


if __name__ == "__main__":
    main()

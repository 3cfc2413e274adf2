"""The worker-process side of a MetaDrive environment: one offline ``MetaDriveEnv`` serving pipe requests.

:func:`serve_metadrive` is the generic loop (network refused, asset download disabled, replies
``("ok", payload)`` or ``("error", traceback)``); :func:`_worker_main` is the driving worker of
:class:`~drivepriv.envs.metadrive.env.MetaDriveProxyEnv` (reset, step, render, truth). Keep
light: no torch, no drivepriv imports beyond this package's own.
"""

from __future__ import annotations

import math
import os
import traceback
from typing import Any, Callable

import numpy as np

from drivepriv.envs.metadrive.guard import NetworkForbiddenError, _forbid_network


def serve_metadrive(conn: Any, config: dict[str, Any], handle: Callable[[Any, str, Any], Any], ready: Callable[[Any], Any] = lambda env: None) -> None:
    """Run one offline MetaDriveEnv in this (worker) process and answer ``(command, argument)``
    requests on ``conn`` until ``close`` or EOF.

    The network is refused and MetaDrive's asset download disabled before the engine starts.
    Replies are ``("ok", payload)`` or ``("error", text)``: first ``ready(env)`` once the env
    exists, then ``handle(env, command, argument)`` per request (``NotImplemented`` for an
    unknown command). The env is closed whatever happens."""
    os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    env = None
    try:
        import warnings

        warnings.filterwarnings("ignore")
        _forbid_network()
        from metadrive.engine.base_engine import BaseEngine

        BaseEngine.try_pull_asset = staticmethod(lambda: None)  # never download assets
        import metadrive.engine.base_engine as base_engine_module

        def no_pull(*args: Any, **kwargs: Any) -> None:  # belt and braces
            raise NetworkForbiddenError("drivepriv never downloads MetaDrive's assets")

        base_engine_module.pull_asset = no_pull
        from metadrive.envs.metadrive_env import MetaDriveEnv

        env = MetaDriveEnv(config)
        conn.send(("ok", ready(env)))
    except BaseException:  # noqa: BLE001  (reported to the parent)
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            try:
                cmd, arg = conn.recv()
            except (EOFError, OSError):
                break  # the parent is gone
            try:
                if cmd == "close":
                    conn.send(("ok", None))
                    break
                payload = handle(env, cmd, arg)
                if payload is NotImplemented:
                    conn.send(("error", f"unknown worker command {cmd!r}"))
                else:
                    conn.send(("ok", payload))
            except (EOFError, OSError, BrokenPipeError):
                break
            except BaseException:  # noqa: BLE001
                conn.send(("error", traceback.format_exc()))
    finally:
        try:
            env.close()
        except Exception:  # noqa: BLE001
            pass
        conn.close()


def _handle(env: Any, cmd: str, arg: Any) -> Any:
    """The driving worker's commands: reset, step, render, truth, network_check."""
    if cmd == "reset":
        obs, info = env.reset(seed=arg)
        return np.asarray(obs, np.float32), _plain_info(info)
    if cmd == "step":
        obs, reward, terminated, truncated, info = env.step(arg)
        return np.asarray(obs, np.float32), float(reward), bool(terminated), bool(truncated), _plain_info(info)
    if cmd == "render":
        return np.ascontiguousarray(env.render(mode="topdown", window=False, **arg), dtype=np.uint8)
    if cmd == "truth":
        return _vehicle_truth(env)
    if cmd == "network_check":  # for tests: is the network guard active here?
        try:
            import urllib.request

            urllib.request.urlretrieve("https://example.invalid/x", "/dev/null")
            return "allowed"
        except NetworkForbiddenError:
            return "forbidden"
    return NotImplemented


def _worker_main(conn: Any, config: dict[str, Any]) -> None:
    """Run one MetaDriveEnv and serve ``(command, argument)`` requests until ``close`` or EOF."""
    serve_metadrive(conn, config, _handle, ready=lambda env: (env.observation_space, env.action_space))


def _plain_info(info: dict[str, Any]) -> dict[str, Any]:
    """MetaDrive's info with numpy scalars made plain Python values (picklable, comparable)."""
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, (tuple, list)):
            v = [x.item() if isinstance(x, np.generic) else x for x in v]
        out[k] = v
    return out


def _vehicle_truth(env: Any) -> dict[str, float]:
    """The ego vehicle's true state, for checking the codec (speed, heading difference, lane offset)."""
    v = env.agent
    lane = v.navigation.current_ref_lanes[-1]
    lane_heading = lane.heading_theta_at(lane.local_coordinates(v.position)[0])
    _, lateral_m = v.lane.local_coordinates(v.position)
    return {
        "speed_mps": float(v.speed_km_h) / 3.6,
        "heading_diff_rad": float((v.heading_theta - lane_heading + math.pi) % (2 * math.pi) - math.pi),
        "lane_offset_left_m": -float(lateral_m),
        "steering": float(v.steering),
        "border_left_m": float(v.dist_to_left_side),
        "border_right_m": float(v.dist_to_right_side),
        "x_m": float(v.position[0]),
        "y_m": float(v.position[1]),
        "heading_rad": float(v.heading_theta),
    }

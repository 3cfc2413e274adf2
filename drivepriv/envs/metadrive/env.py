"""The proxy environment: a gymnasium ``Env`` whose offline MetaDriveEnv runs in its own worker process.

Several can exist in one process (MetaDrive allows one engine per process); the worker side
is :mod:`drivepriv.envs.metadrive.worker`, the pipe client :mod:`drivepriv.envs.metadrive.client`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from drivepriv.config import EnvConfig
from drivepriv.envs.metadrive.client import WorkerClient
from drivepriv.envs.metadrive.config import scenario_for_seed, validate_metadrive_config
from drivepriv.envs.metadrive.worker import _worker_main
from drivepriv.errors import ConfigError

log = logging.getLogger(__name__)

#: MetaDrive's info flags that end an episode as a crash (or leaving the road).
CRASH_FLAGS = ("crash_vehicle", "crash_object", "crash_building", "crash_human", "out_of_road")
#: Default top-down frame size (pixels) and scale (pixels per metre) for ``render()``.
TOPDOWN_SIZE_PX = (400, 400)
TOPDOWN_SCALING_PX_PER_M = 5.0


class MetaDriveProxyEnv(gym.Env):
    """A gymnasium environment whose MetaDriveEnv lives in its own worker process.

    ``reset(seed=s)`` accepts any non-negative integer and plays scenario
    ``start_seed + s % num_scenarios``; ``reset()`` without a seed plays the next scenario.
    ``step`` truncates after ``max_episode_steps`` policy steps (0: MetaDrive's own
    ``horizon``) and sets ``info["crashed"]`` when the episode ended in a crash or off the road.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, config: dict[str, Any], max_episode_steps: int = 0, render_mode: str | None = None,
                 topdown_size_px: tuple[int, int] = TOPDOWN_SIZE_PX, topdown_scaling: float = TOPDOWN_SCALING_PX_PER_M,
                 wait: bool = True):
        if render_mode not in (None, "rgb_array"):
            raise ConfigError(f"render_mode: MetaDrive supports 'rgb_array' (top-down frames) or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.max_episode_steps = int(max_episode_steps)
        self.start_seed = int(config.get("start_seed", 0))
        self.num_scenarios = int(config.get("num_scenarios", 1))
        self._topdown = {"screen_size": tuple(int(s) for s in topdown_size_px), "scaling": float(topdown_scaling),
                         "film_size": (4000, 4000), "target_agent_heading_up": False}
        self._scenario: int | None = None
        self._steps = 0
        self._worker = WorkerClient(_worker_main, (dict(config),), name="drivepriv-metadrive")
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the worker's MetaDriveEnv (done by the constructor unless ``wait=False``)."""
        if hasattr(self, "observation_space") and "observation_space" in self.__dict__:
            return
        try:
            self.observation_space, self.action_space = self._worker.recv("start")
        except BaseException:
            self.close()
            raise
        log.debug("MetaDrive worker pid %s started", self._worker.pid)

    @property
    def pid(self) -> int | None:
        """Process id of the worker (None before start)."""
        return self._worker.pid

    # -- gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._scenario = scenario_for_seed(int(seed), self.start_seed, self.num_scenarios)
        elif self._scenario is None:
            self._scenario = self.start_seed
        else:  # next scenario, deterministically
            self._scenario = self.start_seed + (self._scenario - self.start_seed + 1) % self.num_scenarios
        self._steps = 0
        obs, info = self._worker.call("reset", self._scenario)
        info["scenario"] = self._scenario
        return obs, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        act = np.clip(np.asarray(action, dtype=np.float32).reshape(self.action_space.shape), -1.0, 1.0)
        obs, reward, terminated, truncated, info = self._worker.call("step", act)
        self._steps += 1
        if self.max_episode_steps > 0 and self._steps >= self.max_episode_steps and not terminated:
            truncated = True
        info["crashed"] = bool(terminated and any(bool(info.get(k, False)) for k in CRASH_FLAGS))
        info["scenario"] = self._scenario
        return obs, reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        """The simulator's own top-down frame, (H, W, 3) RGB uint8 (``render_mode="rgb_array"`` only)."""
        if self.render_mode != "rgb_array":
            return None
        return self._worker.call("render", self._topdown)

    def vehicle_truth(self) -> dict[str, float]:
        """The ego vehicle's true state in physical units (for tests and codec checks)."""
        return self._worker.call("truth")

    def close(self) -> None:
        """Stop the worker process (idempotent; also done on garbage collection and at exit)."""
        if getattr(self, "_worker", None) is not None:
            self._worker.close()


def make_metadrive_env(cfg: EnvConfig, render_mode: str | None = None) -> gym.Env:
    """Create an offline MetaDrive environment in its own worker process (unseeded: call ``reset(seed=...)``).

    Several can exist at once in one process. ``cfg.config`` holds MetaDrive's own keys
    (``map``, ``traffic_density``, ``num_scenarios``, ``horizon`` ...), checked against
    ``MetaDriveEnv.default_config()``; keys that need MetaDrive's 3D assets are refused.
    """
    config = validate_metadrive_config(cfg)
    config.setdefault("log_level", logging.WARNING)
    return MetaDriveProxyEnv(config, max_episode_steps=cfg.max_episode_steps, render_mode=render_mode)


def make_metadrive_envs(cfgs: Sequence[EnvConfig], render_mode: str | None = None) -> list[gym.Env]:
    """Create several environments, starting all workers before waiting for any (one per client).

    Each worker takes about 2 s to spawn, import MetaDrive and build its env; starting them
    together overlaps that time on a multi-core machine.
    """
    envs: list[MetaDriveProxyEnv] = []
    try:
        for cfg in cfgs:
            config = validate_metadrive_config(cfg)
            config.setdefault("log_level", logging.WARNING)
            envs.append(MetaDriveProxyEnv(config, max_episode_steps=cfg.max_episode_steps, render_mode=render_mode, wait=False))
        for env in envs:
            env.wait_ready()
    except BaseException:
        for env in envs:
            env.close()
        raise
    return list(envs)

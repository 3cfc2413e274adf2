"""highway-env backend: build a scenario's environment with a Kinematics observation we can decode."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np

os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")  # "dummy" renders all-black frames
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402

from drivepriv.config import EnvConfig  # noqa: E402
from drivepriv.envs.codec import ObservationCodec  # noqa: E402
from drivepriv.envs.vector import VectorCodec, VectorFeature  # noqa: E402
from drivepriv.errors import ConfigError, did_you_mean  # noqa: E402

log = logging.getLogger(__name__)

# Keys drivepriv itself sets; a scenario changes them through env.observation instead.
_MANAGED_KEYS = ("observation",)


def _import_highway_env() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import highway_env  # noqa: F401  (registers the environments)


def observation_config(cfg: EnvConfig) -> dict[str, Any]:
    """The highway-env observation configuration for a scenario."""
    obs = cfg.observation
    return {
        "type": "Kinematics",
        "vehicles_count": obs.vehicles_count,
        "features": list(obs.features),
        "features_range": {k: list(v) for k, v in obs.features_range.items()},
        "absolute": False,
        "normalize": True,
        "clip": True,
        "order": "sorted",
        "see_behind": obs.see_behind,
        "include_obstacles": obs.include_obstacles,
    }


#: highway-env's KinematicsGoal scales (parking): x, y in 100 m, vx, vy in 5 m/s, headings unscaled.
_GOAL_FEATURES = (("x", "m", 100.0), ("y", "m", 100.0), ("vx", "m/s", 5.0), ("vy", "m/s", 5.0), ("cos_h", "", 1.0), ("sin_h", "", 1.0))


def goal_codec() -> VectorCodec:
    """The flattened KinematicsGoal observation: achieved goal, desired goal, observation (the
    order of gymnasium's sorted Dict keys), each x, y, vx, vy, cos_h, sin_h."""
    feats = []
    for part in ("achieved", "desired", "ego"):
        for name, unit, scale in _GOAL_FEATURES:
            group = f"{part}_{'position' if name in ('x', 'y') else 'velocity' if name in ('vx', 'vy') else 'heading'}"
            feats.append(VectorFeature(f"{part}_{name}", unit, scale, group=group))
    return VectorCodec(tuple(feats))


def make_codec(cfg: EnvConfig) -> ObservationCodec | VectorCodec:
    obs = cfg.observation
    if obs.type == "KinematicsGoal":
        return goal_codec()
    return ObservationCodec(
        features=tuple(obs.features),
        vehicles_count=obs.vehicles_count,
        ranges={k: (float(v[0]), float(v[1])) for k, v in obs.features_range.items()},
    )


def make_env(cfg: EnvConfig, render_mode: str | None = None) -> gym.Env:
    """Create the scenario's environment (unseeded: call ``reset(seed=...)``).

    Unknown highway-env configuration keys fail with a did-you-mean instead of being ignored.
    """
    _import_highway_env()
    if cfg.id not in gym.registry:
        known = sorted(k for k in gym.registry if k.split("-")[0] in _highway_ids())
        raise ConfigError(f"env.id: unknown environment '{cfg.id}'.{did_you_mean(cfg.id, known)} Known: {', '.join(known)}.")
    entry = gym.registry[cfg.id]
    env_cls = gym.envs.registration.load_env_creator(entry.entry_point)
    defaults = env_cls.default_config()
    for key in cfg.config:
        if key in _MANAGED_KEYS:
            raise ConfigError(f"env.config.{key}: set the observation through env.observation, not env.config")
        if key not in defaults:
            raise ConfigError(
                f"env.config: unknown highway-env key '{key}' for {cfg.id}.{did_you_mean(key, defaults)} "
                f"Known keys: {', '.join(sorted(defaults))}."
            )
    goal = cfg.observation.type == "KinematicsGoal"
    if goal and defaults.get("observation", {}).get("type") != "KinematicsGoal":
        raise ConfigError(f"env.observation.type: KinematicsGoal is the goal observation of parking-v0, not of {cfg.id}")
    config = dict(cfg.config) if goal else {**cfg.config, "observation": observation_config(cfg)}
    kwargs: dict[str, Any] = {"config": config, "render_mode": render_mode}
    if cfg.max_episode_steps:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v0 ids are marked out of date; they still work
        env = gym.make(cfg.id, **kwargs)
    if goal:
        return gym.wrappers.FlattenObservation(env)
    return FastKinematics(env)


class FastKinematics(gym.Wrapper):
    """highway-env's Kinematics observation, computed without pandas: the same numbers, bit for
    bit (tests/envs/test_highway_obs.py). highway-env builds a DataFrame per step and normalises it
    column by column; in the default merge run that was 40 % of every environment step (with
    this, a merge step is 1.37 times as fast). The environment re-creates its observation type at each reset,
    so the fast one is put in place after each reset (the reset's own observation comes from
    highway-env's code)."""

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        u = self.env.unwrapped
        fast = _fast_kinematics_class()
        if type(getattr(u, "observation_type", None)) is fast.__base__:  # highway-env's KinematicObservation
            u.observation_type.__class__ = fast
        return out


_FAST_CLASS: type | None = None


def _fast_kinematics_class() -> type:
    """``KinematicObservation`` with a numpy ``observe`` (the class is built once, on first use,
    so that importing this module does not import highway-env)."""
    global _FAST_CLASS
    if _FAST_CLASS is None:
        from highway_env.envs.common.observation import KinematicObservation

        class FastKinematicObservation(KinematicObservation):
            def observe(self) -> np.ndarray:
                if not self.env.road or not self.features_range:  # highway-env's own default ranges
                    return super().observe()
                ego = self.observer_vehicle
                rows = [ego.to_dict()]
                close = self.env.road.close_objects_to(
                    ego,
                    self.env.PERCEPTION_DISTANCE,
                    count=self.vehicles_count - 1,
                    see_behind=self.see_behind,
                    sort=self.order == "sorted",
                    vehicles_only=not self.include_obstacles,
                )
                if close:
                    origin = ego if not self.absolute else None
                    rows += [v.to_dict(origin, observe_intentions=self.observe_intentions) for v in close[-self.vehicles_count + 1 :]]
                obs = np.array([[r[f] for f in self.features] for r in rows], dtype=np.float64)
                if self.normalize:
                    for f, (lo, hi) in self.features_range.items():
                        if f in self.features:
                            j = self.features.index(f)
                            obs[:, j] = -1 + (obs[:, j] - lo) * 2 / (hi - lo)  # highway_env.utils.lmap to [-1, 1]
                            if self.clip:
                                obs[:, j] = np.clip(obs[:, j], -1, 1)
                if len(obs) < self.vehicles_count:
                    obs = np.concatenate([obs, np.zeros((self.vehicles_count - len(obs), len(self.features)))])
                if self.order == "shuffled":
                    self.env.np_random.shuffle(obs[1:])
                return obs.astype(np.float32)

        FastKinematicObservation.__module__ = __name__
        FastKinematicObservation.__qualname__ = "FastKinematicObservation"
        _FAST_CLASS = FastKinematicObservation
    return _FAST_CLASS


def __getattr__(name: str):
    if name == "FastKinematicObservation":  # pickled environments (client snapshots) name it
        return _fast_kinematics_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _highway_ids() -> set[str]:
    return {k.split("-")[0] for k, v in gym.registry.items() if "highway_env" in str(v.entry_point)}


def action_names(env: gym.Env) -> tuple[str, ...]:
    """Names of the discrete actions, in index order (e.g. LANE_LEFT, IDLE, ...)."""
    action_type = env.unwrapped.action_type
    actions = getattr(action_type, "actions", None)
    if isinstance(actions, dict):
        return tuple(actions[i] for i in sorted(actions))
    return tuple(str(i) for i in range(int(env.action_space.n)))

"""Simulator backends, observation codecs and truth recording. Knows nothing of federation or attacks.

``make_env`` and ``make_codec`` dispatch on ``EnvConfig.backend``: highway-env (Kinematics
observation, :mod:`drivepriv.envs.highway`), MetaDrive (lidar and state, one worker process per
environment, :mod:`drivepriv.envs.metadrive`) and gymnasium's classic control tasks
(:mod:`drivepriv.envs.control`). The backends are imported when first used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")  # "dummy" renders all-black frames
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from drivepriv.envs.codec import ObservationCodec
from drivepriv.envs.vector import VectorCodec, VectorFeature

if TYPE_CHECKING:
    import gymnasium as gym

    from drivepriv.config import EnvConfig


def make_env(cfg: "EnvConfig", render_mode: str | None = None) -> "gym.Env":
    """The scenario's environment (unseeded: call ``reset(seed=...)``)."""
    if cfg.backend == "metadrive":
        from drivepriv.envs.metadrive import make_metadrive_env

        return make_metadrive_env(cfg, render_mode)
    if cfg.backend == "control":
        from drivepriv.envs.control import make_control_env

        return make_control_env(cfg, render_mode)
    from drivepriv.envs.highway import make_env as make_highway_env

    return make_highway_env(cfg, render_mode)


def make_codec(cfg: "EnvConfig") -> ObservationCodec | VectorCodec:
    """The codec that decodes the scenario's observations into physical units."""
    if cfg.backend == "metadrive":
        from drivepriv.envs.metadrive import metadrive_codec

        return metadrive_codec(cfg)
    if cfg.backend == "control":
        from drivepriv.envs.control import control_codec

        return control_codec(cfg.id)
    from drivepriv.envs.highway import make_codec as make_highway_codec

    return make_highway_codec(cfg)


__all__ = ["ObservationCodec", "VectorCodec", "VectorFeature", "make_env", "make_codec"]

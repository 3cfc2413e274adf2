"""Simulator backends, observation codecs and truth recording. Knows nothing of federation or attacks.

One :class:`Backend` per simulator, registered in :mod:`drivepriv.envs.backends` and looked up
by ``EnvConfig.backend`` (:func:`backend_of`): highway-env (Kinematics observation,
:mod:`drivepriv.envs.highway`), MetaDrive (lidar and state, one worker process per environment,
:mod:`drivepriv.envs.metadrive`) and gymnasium's classic control tasks
(:mod:`drivepriv.envs.control`). ``make_env`` and ``make_codec`` ask the backend; the
simulators are imported when first used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")  # "dummy" renders all-black frames
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from drivepriv.envs.backends import BACKENDS, Backend, backend_of
from drivepriv.envs.codec import ObservationCodec
from drivepriv.envs.vector import VectorCodec, VectorFeature

if TYPE_CHECKING:
    import gymnasium as gym

    from drivepriv.config import EnvConfig


def make_env(cfg: "EnvConfig", render_mode: str | None = None) -> "gym.Env":
    """The scenario's environment (unseeded: call ``reset(seed=...)``)."""
    return backend_of(cfg).make_env(cfg, render_mode)


def make_codec(cfg: "EnvConfig") -> ObservationCodec | VectorCodec:
    """The codec that decodes the scenario's observations into physical units."""
    return backend_of(cfg).make_codec(cfg)


__all__ = ["BACKENDS", "Backend", "ObservationCodec", "VectorCodec", "VectorFeature", "backend_of", "make_env", "make_codec"]

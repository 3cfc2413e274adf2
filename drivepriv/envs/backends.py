"""One :class:`Backend` per simulator, registered once in :data:`BACKENDS`: everything the rest
of drivepriv asks of a simulator, so that nothing outside ``envs/`` compares backend names.

A backend gives
- the environment and the observation codec (``make_env``, ``make_codec``), built here in
  ``envs/``;
- the dynamics-residual stepper (``residual``): the real simulator stepped from a
  (reconstructed) state and action, or None where the simulator's state cannot be set from an
  observation (MetaDrive's Bullet physics);
- three parts that live downstream of ``envs/`` and are named here by entry point
  (``"module:attribute"``, as gymnasium registers environments), imported on first use by
  :meth:`Backend.load`, so that ``envs/`` imports none of them (DESIGN.md section 5):
  ``priors`` (in ``priors/``: what the simulator's public knowledge gives the attacker,
  :mod:`drivepriv.priors.backends`), ``figures`` (in ``report/``: the report's per-batch
  figures and videos, :mod:`drivepriv.report.figures`) and ``renderer`` (in ``report/``: the
  replay's renderer, :mod:`drivepriv.report.replay`).

What depends on the observation layout rather than the simulator (highway-env's parking task
has a flat goal observation) is a property of the codec: ``codec.has_positions``,
``codec.flat``, ``codec.distance_suffix``.

A new simulator is one new module in ``envs/`` (its environment, codec and stepper) and one
``register(Backend(...))`` here; its priors builder, figures and renderer can be existing ones
(e.g. :func:`drivepriv.priors.backends.box_priors`, everything else learned from the attacker's
rollouts, and :class:`drivepriv.report.figures.VectorFigures` for any flat observation).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from drivepriv.errors import ConfigError
from drivepriv.registry import Registry

if TYPE_CHECKING:
    import gymnasium as gym

    from drivepriv.config import EnvConfig
    from drivepriv.envs.codec import ObservationCodec
    from drivepriv.envs.vector import VectorCodec

    Codec = ObservationCodec | VectorCodec


class Residual(Protocol):
    """A simulator stepped from given (s, a), compared with the given s' (see :class:`Backend`)."""

    def residual(self, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray) -> np.ndarray:
        """Per transition, the distance between ``next_states`` and the simulator's next states."""

    def close(self) -> None:
        """Release the simulator."""


@dataclass(frozen=True)
class Backend:
    """One simulator: see the module docstring for what each field gives."""

    name: str
    make_env: Callable[["EnvConfig", str | None], "gym.Env"]
    make_codec: Callable[["EnvConfig"], "Codec"]
    #: ``(env config, codec) -> Residual | None``
    residual: Callable[["EnvConfig", "Codec"], Residual | None]
    #: Entry point of ``(env config, env, codec, continuous actions) -> BackendPriors``.
    priors: str
    #: Entry point of ``(run config, codec) -> Figures`` (``draw(run_dir, record, with_video)``).
    figures: str
    #: Entry point of ``(run config) -> ReplayRenderer``; None: the backend cannot be replayed.
    renderer: str | None = None

    def load(self, part: str) -> Any:
        """The object an entry-point field (``priors``, ``figures``, ``renderer``) names, imported now."""
        ref = getattr(self, part)
        if ref is None:
            raise ConfigError(f"env.backend: backend '{self.name}' has no {part}")
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)


#: Every simulator backend, by ``EnvConfig.backend``.
BACKENDS: Registry[Backend] = Registry("simulator backend")


def register(backend: Backend) -> Backend:
    """Register ``backend`` under its name (once)."""
    return BACKENDS.register(backend.name)(backend)


def backend_of(env_cfg: "EnvConfig") -> Backend:
    """The backend of an environment configuration."""
    return BACKENDS.get(env_cfg.backend)


# ---------------------------------------------------------------------------------------------
# highway-env (Kinematics observation; the flat goal observation of parking)


def _highway_env(cfg: "EnvConfig", render_mode: str | None = None) -> "gym.Env":
    from drivepriv.envs.highway import make_env

    return make_env(cfg, render_mode)


def _highway_codec(cfg: "EnvConfig") -> "Codec":
    from drivepriv.envs.highway import make_codec

    return make_codec(cfg)


def _highway_residual(cfg: "EnvConfig", codec: "Codec") -> Residual | None:
    """The ego's simulated next position (m); not for continuous actions or the goal observation."""
    from drivepriv.envs.highway_stepper import HighwayResidual

    env = _highway_env(cfg)
    if hasattr(env.action_space, "n") and codec.has_positions:
        return HighwayResidual(env, codec)
    env.close()
    return None


register(Backend(
    name="highway",
    make_env=_highway_env,
    make_codec=_highway_codec,
    residual=_highway_residual,
    priors="drivepriv.priors.backends:highway_priors",
    figures="drivepriv.report.figures:SceneFigures",
    renderer="drivepriv.report.replay_render:HighwayRenderer",
))


# ---------------------------------------------------------------------------------------------
# gymnasium's classic control tasks


def _control_env(cfg: "EnvConfig", render_mode: str | None = None) -> "gym.Env":
    from drivepriv.envs.control import make_control_env

    return make_control_env(cfg, render_mode)


def _control_codec(cfg: "EnvConfig") -> "Codec":
    from drivepriv.envs.control import control_codec

    return control_codec(cfg.id)


def _control_residual(cfg: "EnvConfig", codec: "Codec") -> Residual:
    """The physical state distance to the simulator's exact next state."""
    from drivepriv.envs.control import ControlStepper

    return ControlStepper(cfg)


register(Backend(
    name="control",
    make_env=_control_env,
    make_codec=_control_codec,
    residual=_control_residual,
    priors="drivepriv.priors.backends:control_priors",
    figures="drivepriv.report.figures:VectorFigures",
    renderer="drivepriv.report.replay_render:ControlRenderer",
))


# ---------------------------------------------------------------------------------------------
# MetaDrive (lidar and state, one worker process per environment)


def _metadrive_env(cfg: "EnvConfig", render_mode: str | None = None) -> "gym.Env":
    from drivepriv.envs.metadrive import make_metadrive_env

    return make_metadrive_env(cfg, render_mode)


def _metadrive_codec(cfg: "EnvConfig") -> "Codec":
    from drivepriv.envs.metadrive import metadrive_codec

    return metadrive_codec(cfg)


def _no_residual(cfg: "EnvConfig", codec: "Codec") -> None:
    """Bullet's state cannot be set from an observation: no residual (NaN)."""
    return None


register(Backend(
    name="metadrive",
    make_env=_metadrive_env,
    make_codec=_metadrive_codec,
    residual=_no_residual,
    priors="drivepriv.priors.backends:metadrive_priors",
    figures="drivepriv.report.figures:LidarFigures",
    renderer="drivepriv.report.replay_metadrive:MetaDriveRenderer",
))


__all__ = ["BACKENDS", "Backend", "Residual", "backend_of", "register"]

"""MetaDrive backend: offline, physics-only MetaDrive environments, one engine per worker process.

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
5      last_action_steering      -       2 obs - 1                                    action
6      last_action_throttle      -       2 obs - 1                                    action
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
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import sys
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from drivepriv.config import EnvConfig  # noqa: E402
from drivepriv.envs.vector import VectorCodec, VectorFeature  # noqa: E402
from drivepriv.errors import ConfigError, DriveprivError, did_you_mean  # noqa: E402

log = logging.getLogger(__name__)

#: Boolean keys that switch on MetaDrive's 3D rendering or image observations.
_ASSET_FLAGS = ("use_render", "image_observation", "render_pipeline", "use_mesh_terrain")
#: Sensors that work without assets (ray casts in the physics world).
_PHYSICS_SENSORS = ("lidar", "side_detector", "lane_line_detector")
#: Nested keys whose content is free-form in MetaDrive (not checked key by key).
_FREE_FORM = ("agent_configs", "sensors", "target_vehicle_configs", "config")
#: MetaDrive's info flags that end an episode as a crash (or leaving the road).
CRASH_FLAGS = ("crash_vehicle", "crash_object", "crash_building", "crash_human", "out_of_road")
#: Seconds to wait for a worker before giving up (it is checked for life every half second).
WORKER_TIMEOUT_S = 300.0
#: Default top-down frame size (pixels) and scale (pixels per metre) for ``render()``.
TOPDOWN_SIZE_PX = (400, 400)
TOPDOWN_SCALING_PX_PER_M = 5.0

_ASSET_HELP = (
    "it needs MetaDrive's 3D assets (models and textures), which drivepriv never downloads. "
    "Physics-only observations (ego state + lidar) and top-down rendering (render_mode='rgb_array') work; "
    "remove the key or set it to its default."
)


class MetaDriveWorkerError(DriveprivError):
    """The MetaDrive worker process failed or died; the message carries its traceback."""


# ---------------------------------------------------------------------------------------------
# configuration checks


def _import_metadrive_env() -> type:
    """Import ``MetaDriveEnv`` (no engine is created, so this is safe in any process)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from metadrive.envs.metadrive_env import MetaDriveEnv
        except ImportError as e:
            raise ConfigError(
                f"MetaDrive cannot be imported ({e}). Install it as the README says, without its "
                "dependencies (they would replace pygame-ce and the headless OpenCV): "
                "pip install --no-deps metadrive-simulator==0.4.3"
            ) from None
    return MetaDriveEnv


def default_metadrive_config() -> dict[str, Any]:
    """MetaDrive's own default configuration (``MetaDriveEnv.default_config()``) as a plain dict."""
    return _import_metadrive_env().default_config().get_dict()


def _check_keys(user: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
    for key, value in user.items():
        if key not in defaults:
            raise ConfigError(
                f"{where}: unknown MetaDrive key '{key}'.{did_you_mean(key, defaults)} "
                f"Known keys: {', '.join(sorted(map(str, defaults)))}."
            )
        default = defaults[key]
        if isinstance(default, dict) and default and key not in _FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a mapping of MetaDrive keys, got {value!r}")
            _check_keys(value, default, f"{where}.{key}")


def _check_offline(config: dict[str, Any], where: str) -> None:
    for key in _ASSET_FLAGS:
        if config.get(key):
            raise ConfigError(f"{where}.{key}: {key}=True is not supported: {_ASSET_HELP}")
    sensors = config.get("sensors") or {}
    if not isinstance(sensors, dict):
        raise ConfigError(f"{where}.sensors: expected a mapping of sensor name -> (class, ...), got {sensors!r}")
    for name in sensors:
        if name not in _PHYSICS_SENSORS:
            raise ConfigError(
                f"{where}.sensors.{name}: camera and dashboard sensors are not supported: {_ASSET_HELP} "
                f"Sensors that work: {', '.join(_PHYSICS_SENSORS)}."
            )
    if config.get("manual_control"):
        raise ConfigError(f"{where}.manual_control: manual control needs MetaDrive's 3D window: {_ASSET_HELP}")
    agent_obs = config.get("agent_observation")
    if agent_obs is not None:
        raise ConfigError(
            f"{where}.agent_observation: drivepriv decodes MetaDrive's LidarStateObservation only; "
            "remove agent_observation (image observations need assets drivepriv never downloads)."
        )
    vc = config.get("vehicle_config") or {}
    if vc.get("random_agent_model") or config.get("random_agent_model"):
        raise ConfigError(
            f"{where}.random_agent_model: the observation codec needs one fixed vehicle model (its top speed "
            "sets the speed scale); set vehicle_config.vehicle_model instead."
        )


def validate_metadrive_config(cfg: EnvConfig, where: str = "env") -> dict[str, Any]:
    """Check ``cfg.config`` against ``MetaDriveEnv.default_config()`` and return it as a dict.

    Unknown keys (also nested ones, e.g. ``vehicle_config.lidar.num_lasers``) fail with a
    did-you-mean; anything that needs MetaDrive's asset download fails with an explanation.
    """
    if cfg.backend != "metadrive":
        raise ConfigError(f"{where}.backend: expected 'metadrive' for a MetaDrive environment, got '{cfg.backend}'")
    if cfg.id not in ("MetaDrive", "MetaDriveEnv", "metadrive"):
        raise ConfigError(f"{where}.id: the metadrive backend supports id 'MetaDrive' only, got '{cfg.id}'")
    config = dict(cfg.config)
    _check_keys(config, default_metadrive_config(), f"{where}.config")
    _check_offline(config, f"{where}.config")
    if int(config.get("num_scenarios", 1)) < 1:
        raise ConfigError(f"{where}.config.num_scenarios: expected an integer >= 1, got {config['num_scenarios']}")
    return config


def merged_metadrive_config(cfg: EnvConfig) -> dict[str, Any]:
    """MetaDrive's defaults recursively updated with ``cfg.config`` (after validation)."""
    user = validate_metadrive_config(cfg)
    config = _import_metadrive_env().default_config()
    config.update(user)
    return config.get_dict()


def scenario_for_seed(seed: int, start_seed: int, num_scenarios: int) -> int:
    """Map any non-negative seed to a MetaDrive scenario in ``[start_seed, start_seed + num_scenarios)``."""
    if seed < 0:
        raise ValueError(f"reset(seed=...): expected a non-negative integer, got {seed}")
    return int(start_seed) + int(seed) % int(num_scenarios)


# ---------------------------------------------------------------------------------------------
# worker process (keep light: no torch, no drivepriv imports beyond this module's own)


class NetworkForbiddenError(RuntimeError):
    """Raised in a MetaDrive worker by any attempt to reach the network."""


def _forbid_network() -> None:
    """Make every internet connection or URL download in this process fail loudly.

    drivepriv's workers never need the network; this turns a silent hang or a slow DNS
    failure (MetaDrive's asset download) into an immediate, explicit error.
    """
    import socket
    import urllib.request

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NetworkForbiddenError(f"drivepriv's MetaDrive worker never uses the network (attempted with {args[:2]!r})")

    original_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return original_connect(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    urllib.request.urlretrieve = refuse  # type: ignore[assignment]
    urllib.request.urlopen = refuse  # type: ignore[assignment]


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


# ---------------------------------------------------------------------------------------------
# the proxy environment


def _shutdown(process: Any, conn: Any) -> None:
    """Stop a worker: ask politely, then terminate, then kill; always reap it (no zombies)."""
    try:
        if process.is_alive():
            try:
                conn.send(("close", None))
                if conn.poll(5.0):
                    conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            process.join(5.0)
        if process.is_alive():
            process.terminate()
            process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join(5.0)
    except Exception:  # noqa: BLE001  (interpreter exit: best effort)
        pass
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Keep "spawn" from re-running the caller's ``__main__`` in the worker.

    The worker needs nothing from it, and re-running it would import whatever the caller's
    script imports (torch...) or, in a script without an ``if __name__ == "__main__"`` guard,
    create environments recursively.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for k in saved:
            if k == "__file__":
                del main.__dict__[k]
            else:
                main.__dict__[k] = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


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
        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        self._conn = parent_conn
        self._process = ctx.Process(target=_worker_main, args=(child_conn, dict(config)), daemon=True,
                                    name="drivepriv-metadrive")
        with _main_module_hidden():
            self._process.start()
        child_conn.close()  # so a dead worker gives EOF instead of a hang
        self._finalizer = weakref.finalize(self, _shutdown, self._process, self._conn)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the worker's MetaDriveEnv (done by the constructor unless ``wait=False``)."""
        if hasattr(self, "observation_space") and "observation_space" in self.__dict__:
            return
        try:
            self.observation_space, self.action_space = self._recv("start")
        except BaseException:
            self.close()
            raise
        log.debug("MetaDrive worker pid %s started", self._process.pid)

    @property
    def pid(self) -> int | None:
        """Process id of the worker (None before start)."""
        return self._process.pid

    # -- plumbing -----------------------------------------------------------------------------
    def _recv(self, what: str) -> Any:
        waited_s = 0.0
        while not self._conn.poll(0.5):
            waited_s += 0.5
            if not self._process.is_alive():
                code = self._process.exitcode
                raise MetaDriveWorkerError(
                    f"MetaDrive worker (pid {self._process.pid}) died during {what} with exit code {code}; "
                    "create a new environment (see the log above for its output)."
                )
            if waited_s >= WORKER_TIMEOUT_S:
                raise MetaDriveWorkerError(f"MetaDrive worker (pid {self._process.pid}) did not answer {what} within {WORKER_TIMEOUT_S:.0f} s")
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise MetaDriveWorkerError(f"MetaDrive worker (pid {self._process.pid}) closed its pipe during {what}") from exc
        if status != "ok":
            raise MetaDriveWorkerError(f"MetaDrive worker failed during {what}:\n{payload}")
        return payload

    def _call(self, cmd: str, arg: Any = None) -> Any:
        if not self._finalizer.alive:
            raise MetaDriveWorkerError(f"{cmd}() on a closed MetaDrive environment; create a new one")
        try:
            self._conn.send((cmd, arg))
        except (OSError, BrokenPipeError) as exc:
            raise MetaDriveWorkerError(f"MetaDrive worker (pid {self._process.pid}) is gone; create a new environment") from exc
        return self._recv(cmd)

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
        obs, info = self._call("reset", self._scenario)
        info["scenario"] = self._scenario
        return obs, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        act = np.clip(np.asarray(action, dtype=np.float32).reshape(self.action_space.shape), -1.0, 1.0)
        obs, reward, terminated, truncated, info = self._call("step", act)
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
        return self._call("render", self._topdown)

    def vehicle_truth(self) -> dict[str, float]:
        """The ego vehicle's true state in physical units (for tests and codec checks)."""
        return self._call("truth")

    def close(self) -> None:
        """Stop the worker process (idempotent; also done on garbage collection and at exit)."""
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()


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


# ---------------------------------------------------------------------------------------------
# observation codec


#: Block ids whose roads keep ``lane_num * lane_width`` between the two road borders (checked
#: on real observations; bottlenecks "y"/"Y", forks, toll gates and parking lots do not).
_CONSTANT_WIDTH_BLOCKS = frozenset("SCrRXTO")


@dataclass(frozen=True)
class MetaDriveCodec(VectorCodec):
    """:class:`VectorCodec` of MetaDrive's lidar-and-state observation, plus public map facts."""

    #: Distance between the road's two borders (``lane_num * lane_width``) when every road of the
    #: scenario has it (None: unknown, e.g. random lane numbers or bottleneck blocks).
    road_width_m: float | None = None
    #: ``map_config.lane_width`` (m): the width of every lane.
    lane_width_m: float = 3.5


def _road_width_m(c: dict[str, Any]) -> float | None:
    mc = c["map_config"]
    if c.get("random_lane_num") or c.get("random_lane_width") or mc.get("config") is not None:
        return None
    m = c.get("map")
    if isinstance(m, str) and not set(m) <= _CONSTANT_WIDTH_BLOCKS:
        return None
    if not isinstance(m, (int, str)):
        return None
    return float(mc["lane_num"]) * float(mc["lane_width"])


def _vehicle_limits(vehicle_model: str) -> tuple[float, float]:
    """(max_speed_km_h, max_steering_deg) of a MetaDrive vehicle model."""
    from metadrive.component.pg_space import VehicleParameterSpace
    from metadrive.component.vehicle.vehicle_type import vehicle_type

    if vehicle_model not in vehicle_type:
        raise ConfigError(
            f"env.config.vehicle_config.vehicle_model: unknown model '{vehicle_model}'."
            f"{did_you_mean(vehicle_model, vehicle_type)} Known: {', '.join(vehicle_type)}."
        )
    space = getattr(vehicle_type[vehicle_model], "PARAMETER_SPACE", None)
    space_dict = getattr(space, "parameters", None) or {}
    values = {}
    for key, fallback in (("max_speed_km_h", "max_speed_km_h"), ("max_steering", "max_steering")):
        item = space_dict.get(key) if isinstance(space_dict, dict) else None
        values[key] = getattr(item, "value", None) if item is not None else None
    if values["max_speed_km_h"] is None or values["max_steering"] is None:
        base = VehicleParameterSpace.BASE_VEHICLE  # the default model's constants
        values["max_speed_km_h"] = values["max_speed_km_h"] or base["max_speed_km_h"].value
        values["max_steering"] = values["max_steering"] or base["max_steering"].value
    return float(values["max_speed_km_h"]), float(values["max_steering"])


def metadrive_codec(cfg: EnvConfig) -> MetaDriveCodec:
    """Name every element of MetaDrive's ``LidarStateObservation`` for ``cfg`` (see the module table).

    Physical units follow MetaDrive's normalisation: metres, m/s, rad, rad/s. The heading
    difference is stored as ``sin`` of the angle; ``1 - 2 obs`` is exact as a sine and within
    0.5 % of the angle in radians for |angle| < 0.17 rad (10 degrees).
    """
    from metadrive.component.map.base_map import BaseMap
    from metadrive.component.pg_space import BlockParameterSpace, Parameter

    c = merged_metadrive_config(cfg)
    vc = c["vehicle_config"]
    max_speed_kmh, max_steering_deg = _vehicle_limits(str(vc.get("vehicle_model", "default")))
    border_m = (BaseMap.MAX_LANE_NUM + 1) * BaseMap.MAX_LANE_WIDTH
    feats: list[VectorFeature] = []

    side = vc["side_detector"]
    if side["num_lasers"] > 0 and side["distance"] > 0:
        for i in range(int(side["num_lasers"])):
            feats.append(VectorFeature(f"side_{i:03d}", "m", float(side["distance"]), 0.0, 0.0, 1.0, "side_detector"))
    else:
        feats.append(VectorFeature("border_left_m", "m", border_m, 0.0, 0.0, 1.0, "lateral"))
        feats.append(VectorFeature("border_right_m", "m", border_m, 0.0, 0.0, 1.0, "lateral"))
    feats += [
        VectorFeature("heading_diff_rad", "rad", -2.0, 1.0, 0.0, 1.0, "heading"),
        VectorFeature("speed_mps", "m/s", (max_speed_kmh + 1.0) / 3.6, -1.0 / 3.6, 0.0, 1.0, "speed"),
        VectorFeature("steering_rad", "rad", 2.0 * 60.0 * math.radians(max_steering_deg),
                      -60.0 * math.radians(max_steering_deg), 0.0, 1.0, "steering"),
        VectorFeature("last_action_steering", "", 2.0, -1.0, 0.0, 1.0, "action"),
        VectorFeature("last_action_throttle", "", 2.0, -1.0, 0.0, 1.0, "action"),
        VectorFeature("yaw_rate_radps", "rad/s", 1.0, 0.0, 0.0, 1.0, "yaw_rate"),
    ]
    lane = vc["lane_line_detector"]
    if lane["num_lasers"] > 0 and lane["distance"] > 0:
        for i in range(int(lane["num_lasers"])):
            feats.append(VectorFeature(f"lane_line_{i:03d}", "m", float(lane["distance"]), 0.0, 0.0, 1.0, "lane_line_detector"))
    else:
        feats.append(VectorFeature("lane_offset_left_m", "m", -BaseMap.MAX_LANE_WIDTH, BaseMap.MAX_LANE_WIDTH / 2, 0.0, 1.0, "lateral"))

    if vc.get("navigation_module") is not None:
        navi_dist_m = 50.0  # BaseNavigation.NAVI_POINT_DIST
        mc = c["map_config"]
        radius_scale_m = BlockParameterSpace.CURVE[Parameter.radius].max + float(mc["lane_num"]) * float(mc["lane_width"])
        angle_scale_rad = math.radians(BlockParameterSpace.CURVE[Parameter.angle].max)
        for k in (1, 2):
            feats += [
                VectorFeature(f"navi{k}_ahead_m", "m", 2 * navi_dist_m, -navi_dist_m, 0.0, 1.0, "navigation"),
                VectorFeature(f"navi{k}_left_m", "m", 2 * navi_dist_m, -navi_dist_m, 0.0, 1.0, "navigation"),
                VectorFeature(f"navi{k}_bend_radius_m", "m", radius_scale_m, 0.0, 0.0, 1.0, "navigation_radius"),
                VectorFeature(f"navi{k}_clockwise", "", 2.0, -1.0, 0.0, 1.0, "navigation_direction"),
                VectorFeature(f"navi{k}_bend_angle_rad", "rad", 2 * angle_scale_rad, -angle_scale_rad, 0.0, 1.0, "navigation_angle"),
            ]

    lidar = vc["lidar"]
    if lidar["num_lasers"] > 0 and lidar["distance"] > 0:
        dist_m = float(lidar["distance"])
        for j in range(int(lidar["num_others"])):
            feats += [
                VectorFeature(f"other{j}_ahead_m", "m", 2 * dist_m, -dist_m, 0.0, 1.0, "others_position"),
                VectorFeature(f"other{j}_left_m", "m", 2 * dist_m, -dist_m, 0.0, 1.0, "others_position"),
                VectorFeature(f"other{j}_rel_vahead_mps", "m/s", 2 * max_speed_kmh / 3.6, -max_speed_kmh / 3.6, 0.0, 1.0, "others_velocity"),
                VectorFeature(f"other{j}_rel_vleft_mps", "m/s", 2 * max_speed_kmh / 3.6, -max_speed_kmh / 3.6, 0.0, 1.0, "others_velocity"),
            ]
            if lidar["add_others_navi"]:
                for k in (1, 2):
                    feats += [
                        VectorFeature(f"other{j}_navi{k}_ahead_m", "m", 2 * dist_m, -dist_m, 0.0, 1.0, "others_navigation"),
                        VectorFeature(f"other{j}_navi{k}_left_m", "m", 2 * dist_m, -dist_m, 0.0, 1.0, "others_navigation"),
                    ]
        for i in range(int(lidar["num_lasers"])):
            feats.append(VectorFeature(f"lidar_{i:03d}", "m", dist_m, 0.0, 0.0, 1.0, "lidar"))
    return MetaDriveCodec(features=tuple(feats), road_width_m=_road_width_m(c), lane_width_m=float(c["map_config"]["lane_width"]))


def lidar_angles_rad(codec: VectorCodec) -> np.ndarray:
    """Angle of each lidar ray of ``codec``, counter-clockwise from the ego's heading (rad)."""
    n = len(codec.groups().get("lidar", []))
    return np.arange(n) * (2 * math.pi / max(n, 1))

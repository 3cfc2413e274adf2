"""MetaDrive configuration: strict checks of MetaDrive's own keys against its defaults, offline only.

Unknown keys (nested ones too) fail with a did-you-mean; anything that needs MetaDrive's 3D
assets (which drivepriv never downloads) fails with an explanation. No engine is created here.
"""

from __future__ import annotations

from typing import Any

from drivepriv.config import EnvConfig
from drivepriv.errors import ConfigError, did_you_mean

#: Boolean keys that switch on MetaDrive's 3D rendering or image observations.
_ASSET_FLAGS = ("use_render", "image_observation", "render_pipeline", "use_mesh_terrain")
#: Sensors that work without assets (ray casts in the physics world).
_PHYSICS_SENSORS = ("lidar", "side_detector", "lane_line_detector")
#: Nested keys whose content is free-form in MetaDrive (not checked key by key).
_FREE_FORM = ("agent_configs", "sensors", "target_vehicle_configs", "config")

_ASSET_HELP = (
    "it needs MetaDrive's 3D assets (models and textures), which drivepriv never downloads. "
    "Physics-only observations (ego state + lidar) and top-down rendering (render_mode='rgb_array') work; "
    "remove the key or set it to its default."
)


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

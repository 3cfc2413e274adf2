"""The observation codec of MetaDrive's ``LidarStateObservation`` (see the table in :mod:`drivepriv.envs.metadrive`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivepriv.config import EnvConfig
from drivepriv.envs.metadrive.config import merged_metadrive_config
from drivepriv.envs.vector import VectorCodec, VectorFeature
from drivepriv.errors import ConfigError, did_you_mean

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

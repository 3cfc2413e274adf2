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


#: A ray shorter than this share of the lidar's range hit something (1.0: nothing hit).
LIDAR_HIT = 0.999
#: Neighbouring rays whose hit points are closer than this (m) hit the same object: a car's
#: length, since the rays' spacing along a car's side seen at a grazing angle reaches 4.2 m
#: (measured on ray-cast cars at 12 to 40 m); cars closer than this in the scan are one object.
OBJECT_GAP_M = 5.0
#: The scored group of the objects the lidar sees (:meth:`MetaDriveCodec.group_errors`).
LIDAR_OBJECTS = "lidar_objects"


@dataclass(frozen=True)
class MetaDriveCodec(VectorCodec):
    """:class:`VectorCodec` of MetaDrive's lidar-and-state observation, plus public map facts.

    Beyond the feature groups, the metrics score where the objects the lidar sees are
    (``lidar_objects``, m: see :func:`lidar_objects` and :func:`lidar_object_errors`)."""

    #: Distance between the road's two borders (``lane_num * lane_width``) when every road of the
    #: scenario has it (None: unknown, e.g. random lane numbers or bottleneck blocks).
    road_width_m: float | None = None
    #: ``map_config.lane_width`` (m): the width of every lane.
    lane_width_m: float = 3.5
    headline = ("lateral", "side_detector", "speed", "heading", LIDAR_OBJECTS, "lidar", "navigation")

    def scored_groups(self) -> dict[str, str]:
        out = super().scored_groups()
        if "lidar" in self.groups():
            out[LIDAR_OBJECTS] = "m"
        return out

    def group_help(self, group: str) -> str:
        if group == LIDAR_OBJECTS:
            return ("how far the objects the reconstructed lidar scan sees (the centres of their hit points, ego frame) are from "
                    "the true scan's: OSPA distance in m, a missed or a false object costing the lidar's range; "
                    "transitions whose scan sees nothing left out")
        return super().group_help(group)

    def group_errors(self, truth: np.ndarray, rec: np.ndarray) -> dict[str, np.ndarray]:
        out = super().group_errors(truth, rec)
        if "lidar" in self.groups():
            out[LIDAR_OBJECTS] = lidar_object_errors(self, truth, rec)
        return out


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
        VectorFeature("last_action_steering", "", 2.0, -1.0, 0.0, 1.0, "last_action"),
        VectorFeature("last_action_throttle", "", 2.0, -1.0, 0.0, 1.0, "last_action"),
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


def lidar_range_m(codec: VectorCodec) -> float:
    """The lidar's range (m; MetaDrive's default 50 where the codec has no lidar)."""
    idx = codec.groups().get("lidar", [])
    return float(codec.features[idx[0]].scale) if idx else 50.0


def lidar_objects(dist_m: np.ndarray, angles_rad: np.ndarray, range_m: float) -> np.ndarray:
    """Where the objects one lidar scan sees are: (k, 2) positions in the ego's frame (m, x
    ahead, y left).

    MetaDrive's lidar hits vehicles, traffic objects and pedestrians only (not the road's
    borders). Each run of neighbouring rays that hit at points less than :data:`OBJECT_GAP_M`
    apart is one object (the scan is circular: a run may wrap past ray 0), placed at the mean of its
    hit points: the centre of its visible outline, a proxy of the object's position within about
    half a vehicle's length (its centre is not observed). Objects closer than
    :data:`OBJECT_GAP_M` in the scan (two cars side by side in neighbouring lanes, or queueing)
    are one."""
    d = np.asarray(dist_m, dtype=np.float64)
    hit = d < LIDAR_HIT * range_m
    if not hit.any():
        return np.zeros((0, 2))
    pts = np.stack([d * np.cos(angles_rad), d * np.sin(angles_rad)], -1)
    # linked[i]: ray i and ray i + 1 see the same object
    linked = hit & np.roll(hit, -1) & (np.linalg.norm(pts - np.roll(pts, -1, axis=0), axis=-1) < OBJECT_GAP_M)
    if linked.all():  # one object all around
        return pts.mean(0, keepdims=True)
    n, out = len(d), []
    for start in np.flatnonzero(hit & ~np.roll(linked, 1)):
        run, i = [start], start
        while linked[i]:
            i = (i + 1) % n
            run.append(i)
        out.append(pts[run].mean(0))
    return np.array(out)


def lidar_object_errors(codec: VectorCodec, truth: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Per transition (N,), how far (m) the objects the reconstructed scan sees are from those
    the true scan sees: the OSPA distance (Schuhmacher et al., 2008; order 1, cut-off the
    lidar's range c), i.e. the mean over max(k, m) objects of the matched distances (each at
    most c; minimum-cost matching), an object of either scan left without a match counting c.
    So a missed vehicle and a vehicle that is not there both cost the range. NaN where the true
    scan sees nothing. ``truth``, ``rec``: (N, D) observations."""
    from scipy.optimize import linear_sum_assignment

    idx, ang, c = codec.groups()["lidar"], lidar_angles_rad(codec), lidar_range_m(codec)
    t, r = codec.to_physical(np.asarray(truth, np.float64)), codec.to_physical(np.asarray(rec, np.float64))
    out = np.full(len(t), np.nan)
    for i in range(len(t)):
        mine = lidar_objects(t[i, idx], ang, c)
        if not len(mine):
            continue
        theirs = lidar_objects(r[i, idx], ang, c)
        cost = np.minimum(np.linalg.norm(mine[:, None] - theirs[None], axis=-1), c)
        rows, cols = linear_sum_assignment(cost)
        out[i] = (cost[rows, cols].sum() + c * abs(len(mine) - len(theirs))) / max(len(mine), len(theirs))
    return out

"""State feasibility for MetaDrive's lidar-and-state observation: zero on real observations.

:func:`metadrive_state_penalty` sums, per observation, squared violations of constraints that
MetaDrive's own observation code imposes (metadrive/obs/state_obs.py, sensors/lidar.py,
navigation_module/node_network_navigation.py). Each term reaches 1 at a violation that is
plainly wrong:

====================  =============================================================  ==========================
term                  what                                                           equals 1 at
====================  =============================================================  ==========================
``range``             every value within its clip range [low, high] (mostly [0, 1])  a value 1 past the clip
``speed``             decoded speed >= 0 m/s (the speed is a norm: obs >= 1/(v+1))   -1 m/s
``steering``          wheel steering = last steering action (MetaDrive stores the    steering 1 (full lock) off
                      action; obs = (s/60 + 1)/2 next to (s + 1)/2)
``navigation_range``  each checkpoint within 50 m (MetaDrive crops the vector):      (ahead^2+left^2) = 2*50^2
                      (2 a - 1)^2 + (2 l - 1)^2 <= 1
``navigation_bend``   bend direction in {anticlockwise, straight, clockwise}, and    direction halfway; a
                      a straight lane has radius 0 and angle 0                       straight lane at full bend
``border_sum``        left + right border distance = lane_num * lane_width           1.05 m off (0.05 m free)
                      (only when the codec knows the road width)
``lidar_convex``      three adjacent rays hitting one object (hits within 0.75 m     middle hit 1 m beyond the
                      of each other) see a convex outline: the middle hit is not     line through its
                      beyond the straight line through its neighbours' hits          neighbours (1 % free)
====================  =============================================================  ==========================

Checked on 7,529 real observations (straight, curve, on-ramp, roundabout, intersection,
procedural maps and a bottleneck map; noisy lane keeping; traffic density 0.1-0.3): every term
is <= 1e-10. Two constraints needed care: the border sum is not constant on bottleneck blocks
("y"/"Y": the codec then has no road width and the term is dropped), and two cars adjacent in
the lidar's view form a concave junction, so runs are cut where neighbouring hits differ by
more than 0.75 m (with a 2 m cut, 19 of 4,197 triples were concave). tests/envs/test_metadrive.py
repeats the check on >= 1000 fresh observations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from drivepriv.envs.metadrive.codec import LIDAR_HIT
from drivepriv.envs.vector import VectorCodec

#: ``BaseVehicle.MAX_STEERING``: MetaDrive divides the (normalised) steering by this.
STEERING_DIVISOR = 60.0
#: Hit distances (m) of adjacent lidar rays closer than this belong to one object.
SAME_OBJECT_JUMP_M = 0.75
#: Relative tolerance of the lidar convexity check (float32 hits, tilted car bodies).
LIDAR_CONVEX_TOL = 0.01
#: Free band (m) of the border-sum check.
BORDER_SUM_TOL_M = 0.05


def _has(codec: VectorCodec, *names: str) -> bool:
    return all(n in codec.names for n in names)


def metadrive_state_penalty_terms(obs: Tensor, codec: VectorCodec) -> dict[str, Tensor]:
    """The named terms of :func:`metadrive_state_penalty`, each (N,) and non-negative.

    ``obs`` is (N, D) in observation units (as the environment emits them).
    """
    if obs.dim() != 2 or obs.shape[-1] != codec.obs_dim:
        raise ValueError(f"metadrive_state_penalty: expected obs of shape (N, {codec.obs_dim}), got {tuple(obs.shape)}")
    terms: dict[str, Tensor] = {}
    lo, hi = codec.box()
    lo_t = torch.as_tensor(lo, dtype=obs.dtype, device=obs.device)
    hi_t = torch.as_tensor(hi, dtype=obs.dtype, device=obs.device)
    terms["range"] = (torch.relu(lo_t - obs) ** 2 + torch.relu(obs - hi_t) ** 2).sum(-1)
    phys = codec.to_physical(obs)

    if _has(codec, "speed_mps"):
        terms["speed"] = torch.relu(-phys[:, codec.index("speed_mps")]) ** 2
    if _has(codec, "steering_rad", "last_action_steering"):
        wheel = STEERING_DIVISOR * (2.0 * obs[:, codec.index("steering_rad")] - 1.0)
        action = 2.0 * obs[:, codec.index("last_action_steering")] - 1.0
        terms["steering"] = (wheel - action) ** 2

    nav_range, nav_bend = [], []
    for k in (1, 2):
        if not _has(codec, f"navi{k}_ahead_m", f"navi{k}_left_m"):
            continue
        a = 2.0 * obs[:, codec.index(f"navi{k}_ahead_m")] - 1.0
        lft = 2.0 * obs[:, codec.index(f"navi{k}_left_m")] - 1.0
        nav_range.append(torch.relu(a**2 + lft**2 - 1.0) ** 2)
        if _has(codec, f"navi{k}_clockwise", f"navi{k}_bend_radius_m", f"navi{k}_bend_angle_rad"):
            t = (2.0 * obs[:, codec.index(f"navi{k}_clockwise")] - 1.0).abs()  # 0 straight, 1 curved
            straight = (1.0 - t).clamp(0.0, 1.0)
            radius = obs[:, codec.index(f"navi{k}_bend_radius_m")]
            angle = 2.0 * obs[:, codec.index(f"navi{k}_bend_angle_rad")] - 1.0
            nav_bend.append(4.0 * (t * (1.0 - t)).abs() + straight * (radius**2 + angle**2))
    if nav_range:
        terms["navigation_range"] = torch.stack(nav_range).sum(0)
    if nav_bend:
        terms["navigation_bend"] = torch.stack(nav_bend).sum(0)

    road_width_m = getattr(codec, "road_width_m", None)
    if road_width_m is not None and _has(codec, "border_left_m", "border_right_m"):
        width = phys[:, codec.index("border_left_m")] + phys[:, codec.index("border_right_m")]
        terms["border_sum"] = torch.relu((width - road_width_m).abs() - BORDER_SUM_TOL_M) ** 2

    lidar_idx = codec.groups().get("lidar", [])
    if len(lidar_idx) >= 3:
        terms["lidar_convex"] = _lidar_convexity(phys[:, lidar_idx], codec.features[lidar_idx[0]].scale)
    return terms


def _lidar_convexity(dist_m: Tensor, max_dist_m: float) -> Tensor:
    """Sum over runs of three adjacent hit rays of (excess beyond the chord)^2, (N,) in m^2.

    For rays at angles theta - d, theta, theta + d hitting one straight edge, 1/r is
    A cos + B sin, so the straight line through the outer hits meets the middle ray at
    ``2 cos d / (1/r_- + 1/r_+)``; on a convex outline the middle hit is no farther.
    """
    n_rays = dist_m.shape[-1]
    delta = 2.0 * math.pi / n_rays
    prev, nxt = torch.roll(dist_m, 1, -1), torch.roll(dist_m, -1, -1)
    with torch.no_grad():  # which triples are one object: a gate, not a gradient path
        hit = dist_m < LIDAR_HIT * max_dist_m
        gate = (
            hit & torch.roll(hit, 1, -1) & torch.roll(hit, -1, -1)
            & ((dist_m - prev).abs() < SAME_OBJECT_JUMP_M) & ((dist_m - nxt).abs() < SAME_OBJECT_JUMP_M)
        )
    eps = 1e-3
    chord_m = 2.0 * math.cos(delta) / (1.0 / prev.clamp_min(eps) + 1.0 / nxt.clamp_min(eps))
    excess_m = dist_m - chord_m - LIDAR_CONVEX_TOL * chord_m.abs()
    return (torch.relu(excess_m) ** 2 * gate).sum(-1)


def metadrive_state_penalty(obs: Tensor, codec: VectorCodec) -> Tensor:
    """(N,) non-negative penalty, 0 on observations MetaDrive can emit (see the module table)."""
    terms = metadrive_state_penalty_terms(obs, codec)
    return torch.stack(list(terms.values())).sum(0)

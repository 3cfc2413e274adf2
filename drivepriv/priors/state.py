"""State feasibility: a penalty that is zero on observations the simulator can produce.

RGIA's state regularizer (DESIGN.md section 2) keeps reconstructed observations inside the
feasible set. :func:`state_penalty` sums, per observation, squared violations of:

==================  ==========================================================  ==============================
term                what                                                        equals 1 at
==================  ==========================================================  ==============================
``range``           normalised values within [-1, 1] (the observation clips)    a value 1 past the clip
``presence``        presence in {0, 1}: 4 |p (1 - p)|                           p = 0.5
``ego_presence``    the ego row is always present: (1 - p_0)^2                  p_0 = 0
``absent_zero``     rows without a vehicle are all zeros: (1 - p) o^2           an absent feature at +-1
``heading_norm``    cos_h^2 + sin_h^2 = 1 on present rows                       cos_h = sin_h = 0
``offroad``         present vehicles on the road (``RoadGeometry.offroad_m``)   1 m off the road
``speed``           |speed| <= 40 m/s (highway-env ``Vehicle.MAX_SPEED``)       1 m/s too fast
``overlap``         vehicle centres at least 2 m apart (pairs of present rows)  centres 1 m apart
==================  ==========================================================  ==============================

Physical terms are in metres and m/s, observation terms in normalised units, so that each
term reaches 1 at a violation that is plainly wrong. Positions for the physical terms are
decoded with presence taken as 1 (so they do not shrink with a soft presence), and each row's
physical terms are weighted by its presence (pairs by the product of both).

Checked at 0 on real merge-v0 and highway-fast-v0 observations. On roundabouts real vehicles
cut the corners between lanes by up to ~0.3 m and crashed vehicles are pushed off the road,
so ``offroad`` is small but not always 0 there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drivepriv.envs.codec import ObservationCodec
from drivepriv.priors.road import RoadGeometry

#: highway-env ``Vehicle.MAX_SPEED`` (m/s); ``MIN_SPEED`` is its negative.
MAX_SPEED_MPS = 40.0
#: Vehicle centres closer than this (m) overlap: highway-env vehicles are 5 m x 2 m, and
#: neighbours side by side in adjacent lanes are 4 m apart.
MIN_GAP_M = 2.0
_EPS = 1e-12


def state_penalty_terms(obs: Tensor, codec: ObservationCodec, road: RoadGeometry | None) -> dict[str, Tensor]:
    """The named terms of :func:`state_penalty`, each (B,) and non-negative.

    ``obs`` is (B, V, F) normalised; ``road`` None drops the off-road term.
    """
    p_idx = codec.index("presence")
    p = obs[..., p_idx]  # (B, V)
    others = [i for i in range(codec.n_features) if i != p_idx]
    terms: dict[str, Tensor] = {}
    terms["range"] = (torch.relu(obs.abs() - 1.0) ** 2).sum((-1, -2))
    terms["presence"] = 4.0 * (p * (1.0 - p)).abs().sum(-1)
    terms["ego_presence"] = (1.0 - p[..., 0]) ** 2
    terms["absent_zero"] = ((1.0 - p).clamp(0.0, 1.0) * (obs[..., others] ** 2).sum(-1)).sum(-1)
    w = p.clamp(0.0, 1.0)  # weight of each row's physical terms
    if "cos_h" in codec.features and "sin_h" in codec.features:
        c, s = obs[..., codec.index("cos_h")], obs[..., codec.index("sin_h")]
        terms["heading_norm"] = (w * (c**2 + s**2 - 1.0) ** 2).sum(-1)

    # Physical units, presence taken as 1 for decoding.
    ones = torch.ones_like(p)[..., None]
    full = torch.cat([obs[..., :p_idx], ones, obs[..., p_idx + 1 :]], dim=-1)
    world = codec.decode_world(full)
    xy = torch.stack([world[..., codec.index("x")], world[..., codec.index("y")]], -1)  # (B, V, 2)
    if road is not None:
        terms["offroad"] = (w * road.offroad_m(xy) ** 2).sum(-1)
    vx, vy = world[..., codec.index("vx")], world[..., codec.index("vy")]
    speed = torch.sqrt(vx**2 + vy**2 + _EPS)
    terms["speed"] = (w * torch.relu(speed - MAX_SPEED_MPS) ** 2).sum(-1)
    V = obs.shape[-2]
    if V > 1:
        i, j = torch.triu_indices(V, V, offset=1, device=obs.device)
        gap = torch.sqrt(((xy[..., i, :] - xy[..., j, :]) ** 2).sum(-1) + _EPS)
        terms["overlap"] = (w[..., i] * w[..., j] * torch.relu(MIN_GAP_M - gap) ** 2).sum(-1)
    return terms


def state_penalty(obs: Tensor, codec: ObservationCodec, road: RoadGeometry | None) -> Tensor:
    """(B,) non-negative feasibility penalty of normalised observations (B, V, F); ~0 on real ones.

    The sum of :func:`state_penalty_terms` (see the module docstring for each term and its unit).
    """
    return sum(state_penalty_terms(obs, codec, road).values())


def box_penalty(obs: Tensor, codec) -> Tensor:
    """(N,) squared violation of the codec's observation box (flat observations without
    a richer feasibility model)."""
    lo, hi = (torch.as_tensor(x, dtype=obs.dtype) for x in codec.box())
    flat = obs.reshape(obs.shape[0], -1)
    return (torch.relu(lo.reshape(-1) - flat) ** 2 + torch.relu(flat - hi.reshape(-1)) ** 2).sum(-1)

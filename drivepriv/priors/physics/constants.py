"""highway-env's vehicle, controller and IDM constants (highway-env 1.12), and its small helpers, in torch."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# highway_env.vehicle.kinematics.Vehicle
VEHICLE_LENGTH_M = 5.0
MAX_SPEED_MPS = 40.0
MIN_SPEED_MPS = -40.0
# highway_env.vehicle.controller.ControlledVehicle
TAU_ACC_S = 0.6
TAU_HEADING_S = 0.2
TAU_LATERAL_S = 0.6
TAU_PURSUIT_S = 0.5 * TAU_HEADING_S
KP_A_PER_S = 1.0 / TAU_ACC_S
KP_HEADING_PER_S = 1.0 / TAU_HEADING_S
KP_LATERAL_PER_S = 1.0 / TAU_LATERAL_S
MAX_STEERING_ANGLE_RAD = np.pi / 3
# highway_env.vehicle.behavior.IDMVehicle (longitudinal policy)
IDM_ACC_MAX_MPS2 = 6.0
IDM_COMFORT_ACC_MAX_MPS2 = 3.0
IDM_COMFORT_ACC_MIN_MPS2 = -5.0
IDM_DISTANCE_WANTED_M = 5.0 + VEHICLE_LENGTH_M
IDM_TIME_WANTED_S = 1.5
IDM_DELTA = 4.0
# highway_env.road.road.Road.neighbour_vehicles: on_lane(margin=1)
_ON_LANE_MARGIN_M = 1.0
# highway_env.vehicle.controller.MDPVehicle
DEFAULT_TARGET_SPEEDS_MPS = (20.0, 25.0, 30.0)
# highway_env.envs.common.action.DiscreteMetaAction.ACTIONS_ALL
DEFAULT_ACTIONS = ("LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER")
# highway_env.utils.not_zero
_NOT_ZERO_EPS = 1e-2
# arcsin is kept off +-1 so its gradient stays finite where highway-env clips to +-1
_ASIN_LIMIT = 1.0 - 1e-9


def _not_zero(x: Tensor) -> Tensor:
    """highway_env.utils.not_zero: ``x`` if ``|x| > eps`` else ``eps`` (sign lost, as there)."""
    return torch.where(x.abs() > _NOT_ZERO_EPS, x, torch.full_like(x, _NOT_ZERO_EPS))


def _wrap_to_pi(x: Tensor) -> Tensor:
    """highway_env.utils.wrap_to_pi, smooth form."""
    return torch.atan2(torch.sin(x), torch.cos(x))

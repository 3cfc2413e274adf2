"""highway-env's dynamics-residual stepper: step the real simulator from a (reconstructed) state and compare.

The simulator's own dynamics are the reference: the vehicles of an observation are placed on
the scenario's road (ego as the controlled vehicle, neighbours as the scenario's traffic
model), the action is applied, and the ego's simulated next position is compared with the
next state under test. What the observation does not carry (target speeds, lanes and
driver parameters of other vehicles) is filled in with the simulator's defaults, so the same
residual computed on the true transition is reported beside it as the floor.
"""

from __future__ import annotations

import numpy as np

from drivepriv.envs.codec import ObservationCodec


class SimulatorStepper:
    """Places an observation's vehicles in a highway-env environment and steps it once."""

    def __init__(self, env, codec: ObservationCodec) -> None:
        self.env = env
        self.codec = codec

    def step(self, obs: np.ndarray, action: int) -> np.ndarray:
        """Next observation (normalised) from observation ``obs`` (normalised, (V, F)) and ``action``."""
        from highway_env import utils

        c = self.codec
        base = self.env.unwrapped
        self.env.reset(seed=0)
        road = base.road
        lo = np.array([-1.0] * c.n_features)
        world = c.decode_world(np.clip(np.nan_to_num(obs, nan=0.0), lo * 1.0, -lo * 1.0)[None])[0]
        p = c.index("presence")
        ego = base.vehicle
        rows = [0] + [i for i in range(1, c.vehicles_count) if world[i, p] > 0.5]
        other_cls = utils.class_from_path(base.config["other_vehicles_type"])
        road.vehicles = [ego]
        for k, i in enumerate(rows):
            x, y = world[i, c.index("x")], world[i, c.index("y")]
            heading = self._heading(world[i])
            speed = float(c.speed(world[i]))
            if k == 0:
                veh = ego
                veh.position = np.array([x, y], dtype=float)
                veh.heading = heading
                veh.speed = speed
                veh.lane_index = road.network.get_closest_lane_index(veh.position, veh.heading)
                veh.lane = road.network.get_lane(veh.lane_index)
                veh.target_lane_index = veh.lane_index
                if hasattr(veh, "speed_to_index"):
                    veh.speed_index = veh.speed_to_index(speed)
                    veh.target_speed = veh.index_to_speed(veh.speed_index)
                else:
                    veh.target_speed = speed
            else:
                veh = other_cls(road, np.array([x, y], dtype=float), heading=heading, speed=speed)
                road.vehicles.append(veh)
        obs2, *_ = self.env.step(int(action))
        return obs2

    def _heading(self, row: np.ndarray) -> float:
        c = self.codec
        if "cos_h" in c.features and "sin_h" in c.features:
            return float(np.arctan2(row[c.index("sin_h")], row[c.index("cos_h")]))
        return float(np.arctan2(row[c.index("vy")], row[c.index("vx")]))

    def ego_residual_m(self, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray) -> np.ndarray:
        """Per transition: distance (m) between the ego in ``next_states`` and the simulated ego."""
        c = self.codec
        ix, iy = c.index("x"), c.index("y")
        out = np.empty(len(states))
        for i, (s, a, s2) in enumerate(zip(states, actions, next_states)):
            sim = c.decode_world(self.step(s, int(a))[None])[0]
            given = c.decode_world(s2[None])[0]
            out[i] = float(np.hypot(*(given[0, [ix, iy]] - sim[0, [ix, iy]])))
        return out


class HighwayResidual:
    """The highway backend's dynamics residual: :meth:`SimulatorStepper.ego_residual_m` on one
    environment the residual owns (closed by :meth:`close`)."""

    def __init__(self, env, codec: ObservationCodec) -> None:
        self.env = env
        self.residual = SimulatorStepper(env, codec).ego_residual_m

    def close(self) -> None:
        self.env.close()

"""The replay's renderers for highway-env and the gymnasium control tasks (:mod:`drivepriv.report.replay`).

Each renderer draws one panel of a state with the simulator's own renderer (:class:`ReplayRenderer`).

- **highway-env** (Kinematics observation): the scenario's own environment, created with
  ``render_mode="rgb_array"``, reset once (highway-env builds the same road every episode),
  then for every panel the road's vehicles are replaced by the decoded rows: the ego
  (row 0, always drawn) and every neighbour row with presence > 0.5, at its position, with
  its heading (``cos_h``/``sin_h``, else the velocity's direction) and speed. Rows that are
  absent are removed from ``road.vehicles``; static road objects (the merge's end obstacle)
  stay. The frame is highway-env's own ``EnvViewer`` image. Every panel's camera is centred
  on the *true* ego, so a reconstruction's displacement is visible as such; attack panels
  also show the truth's vehicles as translucent ghosts. A reconstructed ego outside the view
  is named in the panel's title with its distance from the true ego. Soft presences are
  thresholded at 0.5 before decoding. Parking (``KinematicsGoal``): the ego and the goal
  landmark are placed at the decoded ego and desired-goal poses; parked cars are not in the
  observation and are not drawn.
- **gymnasium control tasks**: the task's own ``rgb_array`` renderer with the simulator's
  state set from the decoded observation (:func:`drivepriv.envs.control.obs_to_state`);
  attack panels show the truth faintly underneath.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import numpy as np

from drivepriv.report.plots import poses
from drivepriv.seeding import derive_seed

#: Colours (RGBA) of the truth's translucent ghost vehicles in highway-env attack panels.
GHOST_EGO_RGBA = (170, 255, 150, 120)
GHOST_RGBA = (225, 235, 255, 120)
#: highway-env views drawn side by side (intersection, roundabout...) are at most this wide.
ROW_PANEL_MAX_PX = 400
#: Control tasks: panels are scaled to this width (gymnasium draws 500-600 px).
CONTROL_PANEL_W = 300


class ReplayRenderer(Protocol):
    """Draws the panels of one simulator: the truth, then each reconstruction of the same state."""

    #: "stack" (panels one under another, one title line each) or "row" (side by side, two title lines)
    layout: str

    def begin(self, truth_state: np.ndarray, client: int, episode: int, step: int) -> None:
        """Prepare a frame whose true state is ``truth_state`` (camera, scenario, ghosts)."""

    def panel(self, state: np.ndarray, truth: bool, rgb: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
        """One panel (H, W, 3) uint8 of ``state`` (same size for every state) and notes for its title."""

    def action_text(self, a: np.ndarray) -> str: ...

    def close(self) -> None: ...


def action_formatter(continuous: bool, names: tuple[str, ...] = ()) -> Callable[[np.ndarray], str]:
    """Formatter of one action: its name (discrete: index, or probabilities / one-hot) or its values."""

    def text(a: np.ndarray) -> str:
        a = np.asarray(a, dtype=float).reshape(-1)
        if not a.size or not np.isfinite(a).all():
            return "?"
        if continuous:
            return f"{a[0]:+.2f}" if a.size == 1 else "(" + ", ".join(f"{v:+.2f}" for v in a) + ")"
        k = int(round(float(a[0]))) if a.size == 1 else int(np.argmax(a))
        return names[k] if 0 <= k < len(names) else str(k)

    return text


def _binarise_presence(state: np.ndarray, p: int) -> np.ndarray:
    s = np.array(state, dtype=np.float64)
    s[..., p] = (np.nan_to_num(s[..., p]) > 0.5).astype(np.float64)
    return s


class HighwayRenderer:
    """highway-env's own viewer with the road's vehicles placed at the decoded rows."""

    def __init__(self, cfg: Any) -> None:
        from drivepriv.envs import make_codec, make_env
        from drivepriv.envs.highway import action_names

        self.codec = make_codec(cfg.env)
        self.goal = cfg.env.observation.type == "KinematicsGoal"
        self.env = make_env(cfg.env, render_mode="rgb_array")
        u = self.env.unwrapped
        # render-only keys: centre the view on the (true) ego; square views side by side are
        # shrunk to ROW_PANEL_MAX_PX, keeping highway-env's field of view
        u.config["centering_position"] = [0.5, 0.5]
        w, h = int(u.config["screen_width"]), int(u.config["screen_height"])
        if w < 2 * h and w > ROW_PANEL_MAX_PX:
            f = ROW_PANEL_MAX_PX / w
            u.config.update(screen_width=int(round(w * f / 2)) * 2, screen_height=int(round(h * f / 2)) * 2,
                            scaling=float(u.config["scaling"]) * f)
        self.env.reset(seed=derive_seed(cfg.seed, "replay"))
        self.u = u
        w, h = int(u.config["screen_width"]), int(u.config["screen_height"])
        self.layout = "stack" if w >= 2 * h else "row"
        discrete = hasattr(self.env.action_space, "n")
        self.action_text = action_formatter(not discrete, action_names(self.env) if discrete else ())
        self.ego = u.vehicle
        self.ego.crashed = False
        self.objects = [o for o in u.road.objects if not (self.goal and o is getattr(self.ego, "goal", None))]
        self.goal_mark = getattr(self.ego, "goal", None)
        self._pool: list[Any] = []
        self._ghosts: list[Any] = []
        self.truth_poses: Any = None
        self.env.render()  # creates the viewer
        self.viewer = u.viewer

    # -- decoding -------------------------------------------------------------------------
    def _decode(self, state: np.ndarray) -> tuple[Any, tuple[np.ndarray, float] | None]:
        """Poses of the rows to draw (and the goal pose for parking)."""
        from drivepriv.report.plots import Poses

        if not self.goal:
            c = self.codec
            world = c.decode_world(_binarise_presence(state, c.index("presence")))
            p = poses(world, c.features)
            p.present[0] = bool(np.isfinite(world[0, [c.index("x"), c.index("y")]]).all())  # the ego is always drawn
            return p, None
        phys = self.codec.to_physical(np.asarray(state, dtype=np.float64))
        f = {n: phys[self.codec.index(n)] for n in self.codec.names}
        xy = np.array([[f["ego_x"], f["ego_y"]]])
        present = np.isfinite(xy).all(axis=1)
        p = Poses(present=present, xy=np.nan_to_num(xy), v=np.array([[f["ego_vx"], f["ego_vy"]]]),
                  heading=np.array([math.atan2(f["ego_sin_h"], f["ego_cos_h"])]))
        return p, (np.array([f["desired_x"], f["desired_y"]]), math.atan2(f["desired_sin_h"], f["desired_cos_h"]))

    def _vehicle(self, pool: list[Any], k: int, rgba: tuple[int, ...] | None) -> Any:
        from highway_env.vehicle.behavior import IDMVehicle
        from highway_env.vehicle.graphics import VehicleGraphics

        while len(pool) <= k:
            v = IDMVehicle(self.u.road, [0.0, 0.0], 0.0, 0.0)
            v.color = VehicleGraphics.BLUE
            pool.append(v)
        v = pool[k]
        if rgba is not None:
            v.color = rgba
        return v

    @staticmethod
    def _place(v: Any, xy: np.ndarray, heading: float, vel: np.ndarray) -> None:
        v.position = np.asarray(xy, dtype=np.float64).copy()
        v.heading = float(heading)
        v.speed = float(np.hypot(*vel))
        v.crashed = False

    # -- frames ---------------------------------------------------------------------------
    def begin(self, truth_state: np.ndarray, client: int, episode: int, step: int) -> None:
        self.truth_poses, self.truth_goal = self._decode(truth_state)

    def panel(self, state: np.ndarray, truth: bool, rgb: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
        from types import SimpleNamespace

        p, goal = self._decode(state)
        vehicles = []
        if not truth:  # the truth's vehicles as translucent ghosts, under the reconstruction
            t = self.truth_poses
            for k, j in enumerate(np.flatnonzero(t.present)):
                g = self._vehicle(self._ghosts, k, GHOST_EGO_RGBA if j == 0 else GHOST_RGBA)
                self._place(g, t.xy[j], t.heading[j], t.v[j])
                vehicles.append(g)
        for k, j in enumerate(j for j in np.flatnonzero(p.present) if j != 0):
            v = self._vehicle(self._pool, k, None)
            self._place(v, p.xy[j], p.heading[j], p.v[j])
            vehicles.append(v)
        if p.present[0]:
            self._place(self.ego, p.xy[0], p.heading[0], p.v[0])
            vehicles.append(self.ego)
        road = self.u.road
        road.vehicles = vehicles
        road.objects = list(self.objects)
        if self.goal_mark is not None and goal is not None and np.isfinite(goal[0]).all():
            self.goal_mark.position = goal[0]
            self.goal_mark.heading = float(goal[1])
            road.objects.append(self.goal_mark)
        camera = self.truth_poses.xy[0] if self.truth_poses.present[0] else np.zeros(2)
        self.viewer.observer_vehicle = SimpleNamespace(position=np.asarray(camera, dtype=np.float64))
        img = np.ascontiguousarray(self.env.render())
        notes = []
        if not truth:
            if not p.present[0]:
                notes.append("ego not finite: not drawn")
            else:
                px, py = self.viewer.sim_surface.pos2pix(*p.xy[0])
                if not (0 <= px < img.shape[1] and 0 <= py < img.shape[0]):
                    notes.append(f"ego off view, {float(np.hypot(*(p.xy[0] - camera))):.0f} m from the true ego")
        return img, notes

    def close(self) -> None:
        self.env.close()


class ControlRenderer:
    """gymnasium's own rgb_array renderer with the simulator's state set from the observation."""

    layout = "row"

    def __init__(self, cfg: Any) -> None:
        from drivepriv.envs import make_env

        self.env_id = cfg.env.id
        self.env = make_env(cfg.env, render_mode="rgb_array")
        self.env.reset(seed=derive_seed(cfg.seed, "replay"))
        self.truth_img: np.ndarray | None = None
        self.action_text = action_formatter(not hasattr(self.env.action_space, "n"))

    def _render(self, state: np.ndarray) -> np.ndarray:
        import cv2

        from drivepriv.envs.control import obs_to_state

        u = self.env.unwrapped
        s = obs_to_state(self.env_id, np.nan_to_num(np.asarray(state, dtype=np.float64), posinf=1e6, neginf=-1e6))
        u.state = s
        if hasattr(u, "last_u"):
            u.last_u = None  # Pendulum: no torque arrow (the frame is a state, not an action)
        img = np.asarray(self.env.render())
        h, w = img.shape[:2]
        size = (CONTROL_PANEL_W, int(round(h * CONTROL_PANEL_W / w / 2)) * 2)
        return cv2.resize(img, size, interpolation=cv2.INTER_AREA)

    def begin(self, truth_state: np.ndarray, client: int, episode: int, step: int) -> None:
        self.truth_img = self._render(truth_state)

    def panel(self, state: np.ndarray, truth: bool, rgb: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
        if truth:
            return self.truth_img, []
        img = self._render(state)
        faint = (255 - 0.3 * (255 - self.truth_img.astype(np.float64))).astype(np.uint8)
        return np.minimum(img, faint), ["truth faint"]

    def close(self) -> None:
        self.env.close()

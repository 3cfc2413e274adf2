"""The replay's MetaDrive renderer (:mod:`drivepriv.report.replay`): localisation on the route and
the worker process that renders.

- **MetaDrive** (lidar-and-state observation): MetaDrive's own top-down renderer, in a
  worker process of its own (MetaDrive allows one engine per process; assets are never
  downloaded and the network is refused, as in :mod:`drivepriv.envs.metadrive`). The
  observation has no absolute position, so the ego is *localised* on the route of the
  episode's scenario (map and route are public; the scenario is the one the client's episode
  played, from the run's seed as the clients derive it): lateral position from the decoded
  distance to the road's left border, heading from the lane's heading plus the decoded
  heading difference, position along the route from the two navigation checkpoints (their
  ego-frame offsets are exact within 50 m, only a direction beyond), by a 0.25 m search over
  every road of the route with MetaDrive's own checkpoint formula. On real observations of
  metadrive-ramp this lands within 0.1 m of the true position (the test allows 0.5 m). It
  cannot always be unique: on a straight road made of equal segments the same observation
  recurs further on (130 m in metadrive-ramp). The truth then
  takes the first fitting place the ego can have reached by its step (``step x 0.1 s x`` top
  speed); a reconstruction takes, among the places that fit it nearly as well as its best,
  the one nearest the truth. Panel titles say how long a stretch of road fits ("fits 103 m
  of road"), how far the reconstructed ego is from the true one ("ego 2.7 m off") and, when
  the checkpoints fit nowhere well, the RMS navigation error ("navi err 9.4 m").
  Other traffic is not in the observation: the replay's engine runs without traffic, and
  each panel's lidar hits are drawn as dots at the decoded distances (truth dark, attacks in
  their colour); attack panels outline the true ego. MetaDrive draws the world's y axis up.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivepriv.errors import ConfigError
from drivepriv.report.replay_render import action_formatter

#: MetaDrive panel: side (px) and scale (px per m): +-50 m, the default lidar's range.
MD_PANEL_PX = 340
MD_SCALING_PX_PER_M = 3.4


def client_episode_seed(cfg: Any, client: int, episode: int) -> int:
    """The seed the client's episode was reset with (the federation's own rule)."""
    from drivepriv.federation.inprocess import episode_seed

    return episode_seed(cfg.seed, client, episode)


@dataclass
class _Fit:
    """Candidate ego poses on the route: squared navigation error (m^2), x, y, heading, route distance."""

    cost: np.ndarray
    xy: np.ndarray
    heading: np.ndarray
    route_m: np.ndarray

    def clusters(self, tol_m2: float, rel: float = 0.0, cap_m2: float = 0.0, gap_m: float = 1.0) -> list[np.ndarray]:
        """The places that fit as well as the best (within ``tol_m2``, or ``rel`` times the best
        error up to ``cap_m2``), grouped into stretches of road (closer than ``gap_m`` along the route)."""
        best = float(self.cost.min())
        ties = np.flatnonzero(self.cost <= best + max(tol_m2, min(rel * best, cap_m2)))
        ties = ties[np.argsort(self.route_m[ties], kind="stable")]
        cuts = np.flatnonzero(np.diff(self.route_m[ties]) > gap_m) + 1
        return np.split(ties, cuts)

    def best(self, group: np.ndarray) -> int:
        return int(group[np.argmin(self.cost[group])])


_NAVI_FEATURES = ("navi1_ahead_m", "navi1_left_m", "navi2_ahead_m", "navi2_left_m")
_MD_FEATURES = ("border_left_m", "heading_diff_rad", "speed_mps") + _NAVI_FEATURES


def _route_candidates(env: Any, f: dict[str, float], step_m: float = 0.25) -> dict[str, np.ndarray]:
    """Every pose on the route of ``env``'s ego consistent with the decoded lateral features,
    with the squared error of its predicted navigation features (runs in the worker).

    Follows ``NodeNetworkNavigation._get_info_for_checkpoint`` and
    ``BaseVehicle._dist_to_route_left_right`` (metadrive 0.4.3): the checkpoint of a road is
    the end of its first lane shifted to the middle of the road, its ego-frame offset is
    cropped to 50 m, and the left-border distance is the lateral offset from the first lane
    plus half a lane width.
    """
    nav = env.agent.navigation
    net = env.current_map.road_network
    ck = list(nav.checkpoints)
    segs = list(zip(ck[:-1], ck[1:]))
    obs = np.array([f[k] for k in _NAVI_FEATURES])
    dpsi = math.asin(max(-1.0, min(1.0, f["heading_diff_rad"])))
    cost, xy, hd, route = [], [], [], []
    start_m = 0.0
    for j, (a, b) in enumerate(segs):
        lanes = net.graph[a][b]
        ref0 = lanes[0]
        w = float(ref0.width)
        middle = (len(lanes) / 2 - 0.5) * w
        nxt = net.graph[segs[j + 1][0]][segs[j + 1][1]][0] if j + 1 < len(segs) else ref0
        c1 = np.asarray(ref0.position(ref0.length, middle), dtype=float)
        c2 = np.asarray(nxt.position(nxt.length, middle), dtype=float)
        s = np.arange(0.0, float(ref0.length) + 1e-9, step_m)
        p = np.array([ref0.position(si, f["border_left_m"] - w / 2) for si in s], dtype=float).reshape(-1, 2)
        h = np.array([ref0.heading_theta_at(si) for si in s], dtype=float) + dpsi
        u = np.stack([np.cos(h), np.sin(h)], -1)
        left = np.stack([-np.sin(h), np.cos(h)], -1)
        pred = []
        for c in (c1, c2):
            d = c[None, :] - p
            n = np.hypot(d[:, 0], d[:, 1])[:, None]
            d = np.where(n > 50.0, d / np.maximum(n, 1e-9) * 50.0, d)
            pred += [np.clip((d * u).sum(-1), -50, 50), np.clip((d * left).sum(-1), -50, 50)]
        cost.append(((np.stack(pred, -1) - obs[None, :]) ** 2).sum(-1))
        xy.append(p)
        hd.append(h)
        route.append(start_m + s)
        start_m += float(ref0.length)
    return {"cost": np.concatenate(cost), "xy": np.concatenate(xy), "heading": np.concatenate(hd), "route_m": np.concatenate(route)}


def _md_worker(conn: Any, config: dict[str, Any], panel_px: int, scaling: float) -> None:
    """Replay worker: one MetaDriveEnv (no traffic), commands reset / locate / draw / close."""
    from drivepriv.envs.metadrive import serve_metadrive

    render_kw = {"mode": "topdown", "window": False, "screen_size": (panel_px, panel_px), "scaling": scaling,
                 "film_size": (4000, 4000), "num_stack": 1}

    def handle(env: Any, cmd: str, arg: Any) -> Any:
        if cmd == "reset":
            env.reset(seed=int(arg))
            env.render(**render_kw)  # builds the top-down renderer (map drawn once per scenario)
            spawn = _route_candidates(env, {"border_left_m": 0.0, "heading_diff_rad": 0.0,
                                            **{k: 0.0 for k in _NAVI_FEATURES}})
            d = np.hypot(*(spawn["xy"] - np.asarray(env.agent.position)[None, :]).T)
            size = (float(env.agent.top_down_length), float(env.agent.top_down_width))
            return float(spawn["route_m"][int(np.argmin(d))]), size
        if cmd == "locate":
            return _route_candidates(env, arg)
        if cmd == "draw":
            agent = env.agent
            agent.set_position(tuple(float(v) for v in arg["xy"]))
            agent.set_heading_theta(float(arg["heading"]))
            r = env.engine.top_down_renderer
            r.position = [float(v) for v in arg["camera"]]
            frame = np.ascontiguousarray(env.render(**render_kw), dtype=np.uint8)
            canvas = r._frame_canvas
            cam = canvas.pos2pix(*r.position)
            off = (cam[0] - panel_px / 2, cam[1] - panel_px / 2)
            pix = [(canvas.pos2pix(float(x), float(y))[0] - off[0], canvas.pos2pix(float(x), float(y))[1] - off[1])
                   for x, y in np.asarray(arg["points"], dtype=float).reshape(-1, 2)]
            return frame, np.asarray(pix, dtype=float).reshape(-1, 2)
        return NotImplemented

    serve_metadrive(conn, config, handle)


class MetaDriveRenderer:
    """MetaDrive's top-down renderer, ego localised on the route (see the module docstring)."""

    layout = "row"

    def __init__(self, cfg: Any) -> None:
        from drivepriv.envs import make_codec
        from drivepriv.envs.metadrive import WorkerClient, merged_metadrive_config, validate_metadrive_config

        self.cfg = cfg
        self.codec = make_codec(cfg.env)
        missing = [k for k in _MD_FEATURES if k not in self.codec.names]
        if missing:
            raise ConfigError(
                f"env.config: replay of MetaDrive places the ego from the border distances, heading difference and "
                f"navigation features of the default vehicle configuration; this run's observation lacks {', '.join(missing)}"
            )
        self.lidar = self.codec.groups().get("lidar", [])
        merged = merged_metadrive_config(cfg.env)
        self.start_seed, self.num_scenarios = int(merged["start_seed"]), int(merged["num_scenarios"])
        self.dt_s = float(merged["decision_repeat"]) * float(merged["physics_world_step_size"])
        sp = self.codec.features[self.codec.index("speed_mps")]
        self.v_max_mps = sp.scale + sp.offset
        config = validate_metadrive_config(cfg.env)
        config.update({"traffic_density": 0.0, "log_level": logging.ERROR})  # traffic is not in the observation
        self._worker = WorkerClient(_md_worker, (config, MD_PANEL_PX, MD_SCALING_PX_PER_M),
                                    name="drivepriv-replay-metadrive", label="MetaDrive replay worker")
        self._scenario: int | None = None
        self.spawn_route_m = 0.0
        self.ego_size_m = (4.5, 2.0)  # MetaDrive's default vehicle; the worker says on reset
        self.action_text = action_formatter(True)
        try:
            self._worker.recv("start")
        except BaseException:
            self.close()
            raise

    def _call(self, cmd: str, arg: Any = None) -> Any:
        return self._worker.call(cmd, arg)

    # -- localisation ---------------------------------------------------------------------
    def _features(self, state: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
        """The decoded features the localisation uses, and the lidar distances (m)."""
        phys = self.codec.to_physical(np.nan_to_num(np.asarray(state, dtype=np.float64)))
        return {k: float(phys[self.codec.index(k)]) for k in _MD_FEATURES}, phys[self.lidar]

    def _locate(self, f: dict[str, float], near: np.ndarray | None, reach_m: float | None) -> tuple[np.ndarray, float, float, float]:
        """(x, y), heading, length of road that fits as well (m) and the fit's RMS navigation error (m).

        The truth (``near`` None) takes the first stretch of road that fits as well as the best
        (within 0.05 m^2) and lies within ``reach_m`` of the route's start. A reconstruction
        takes, among the stretches whose squared navigation error is within twice the best's
        (at least 4 m^2, at most 25 m^2: 1 to 2.5 m per feature), the one nearest ``near`` (the
        truth's place): a slightly noisy reconstruction should not jump along a straight road
        that looks the same elsewhere, while one that fits nowhere is drawn where it fits best.
        """
        fit = _Fit(**self._call("locate", f))
        groups = fit.clusters(0.05) if near is None else fit.clusters(4.0, 1.0, 25.0)
        if near is not None:
            k = min((fit.best(g) for g in groups), key=lambda i: float(np.hypot(*(fit.xy[i] - near))))
        else:
            ok = [g for g in groups if fit.route_m[g[0]] <= (reach_m if reach_m is not None else np.inf) + 5.0]
            k = fit.best(ok[0] if ok else groups[0])
        ties = np.concatenate(groups)
        spread = float(np.ptp(fit.route_m[ties])) if len(ties) > 1 else 0.0
        return fit.xy[k], float(fit.heading[k]), spread, float(math.sqrt(fit.cost[k] / len(_NAVI_FEATURES)))

    def begin(self, truth_state: np.ndarray, client: int, episode: int, step: int) -> None:
        from drivepriv.envs.metadrive import scenario_for_seed

        if client < 0:
            raise ConfigError(
                "replay: under secure aggregation the batch mixes every client's transitions, so the MetaDrive map each "
                "was driven on is unknown; replay a run without the secagg defense"
            )
        scenario = scenario_for_seed(client_episode_seed(self.cfg, client, episode), self.start_seed, self.num_scenarios)
        if scenario != self._scenario:
            self.spawn_route_m, self.ego_size_m = self._call("reset", scenario)
            self._scenario = scenario
        f, lidar = self._features(truth_state)
        reach = self.spawn_route_m + step * self.dt_s * self.v_max_mps
        self.truth_xy, self.truth_heading, self.truth_spread, self.truth_rms = self._locate(f, None, reach)
        self.truth_lidar = lidar
        self.scenario = scenario

    def _points(self, xy: np.ndarray, heading: float, lidar_m: np.ndarray) -> np.ndarray:
        n = len(lidar_m)
        ang = heading + np.arange(n) * 2 * math.pi / max(n, 1)
        hit = lidar_m < 0.995 * (self.codec.features[self.lidar[0]].scale if n else 50.0)
        return xy[None, :] + np.stack([np.cos(ang), np.sin(ang)], -1)[hit] * lidar_m[hit, None]

    def panel(self, state: np.ndarray, truth: bool, rgb: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
        import cv2

        if truth:
            xy, heading, spread, rms, lidar = self.truth_xy, self.truth_heading, self.truth_spread, self.truth_rms, self.truth_lidar
        else:
            f, lidar = self._features(state)
            xy, heading, spread, rms = self._locate(f, self.truth_xy, None)
        pts = self._points(xy, heading, lidar)
        ch, sh = math.cos(self.truth_heading), math.sin(self.truth_heading)
        half_l, half_w = self.ego_size_m[0] / 2, self.ego_size_m[1] / 2
        corners = np.array([[half_l, half_w], [half_l, -half_w], [-half_l, -half_w], [-half_l, half_w]])
        ghost = self.truth_xy[None, :] + corners @ np.array([[ch, sh], [-sh, ch]])
        frame, pix = self._call("draw", {"xy": xy, "heading": heading, "camera": self.truth_xy,
                                            "points": np.concatenate([pts, ghost]) if not truth else pts})
        img = np.array(frame, dtype=np.uint8)
        dot = tuple(int(c) for c in rgb)
        for x, y in pix[: len(pts)]:
            cv2.circle(img, (int(round(x)), int(round(y))), 2, dot, -1, cv2.LINE_AA)
        if not truth:
            cv2.polylines(img, [np.round(pix[len(pts):]).astype(np.int32)], True, (40, 40, 40), 1, cv2.LINE_AA)
        notes = [f"scenario {self.scenario}"] if truth else [f"ego {float(np.hypot(*(xy - self.truth_xy))):.1f} m off"]
        if spread > 2.0:
            notes.append(f"fits {spread:.0f} m of road")
        if rms > 1.0:
            notes.append(f"navi err {rms:.1f} m")
        return img, notes

    def close(self) -> None:
        """Stop the worker (politely, then by force; always reaped). Idempotent."""
        if getattr(self, "_worker", None) is not None:
            self._worker.close()
            self._worker = None

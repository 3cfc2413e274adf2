"""Replay videos of an attacked batch: the real traffic beside each attack's reconstruction.

Each transition (s -> s') is replayed over a fixed number of frames: every vehicle slides
from its pose in s to its pose in s'. Observation rows are sorted by distance, so row j of
s and row j of s' need not be the same vehicle; rows are paired by a constant-velocity
prediction (Hungarian assignment with a distance gate) and unpaired vehicles fade in or
out. One panel shows the real transition, one panel per attack shows its reconstruction
over a faint copy of the real vehicles; all panels share one camera that follows the real
ego. Frames are drawn with OpenCV (shapes) and Pillow (text) and encoded as H.264 MP4
(yuv420p, baseline profile, +faststart), which plays in Chromium (see PLATFORM.md §5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drivepriv.priors.road import RoadGeometry
from drivepriv.report.media import h264_writer, paste, text_patch
from drivepriv.report.plots import (
    ARROW_S,
    CAR_RGB,
    CENTRE_RGB,
    EDGE_RGB,
    EGO_RGB,
    ROAD_RGB,
    Poses,
    SceneBatch,
    attack_rgb,
    camera_y,
    car_corners,
    poses,
    road_polygons,
    select_transitions,
    y_extent,
)

log = logging.getLogger(__name__)

BACKGROUND_RGB = (250, 250, 250)
GHOST_EGO_RGB = (180, 222, 208)
GHOST_CAR_RGB = (196, 200, 206)
CAPTION_H = 56
GAP_PX = 4
#: Rows of s and s' further apart than this (after the constant-velocity prediction) are not the same vehicle.
MATCH_GATE_M = 8.0
_SHIFT = 3  # cv2 sub-pixel bits
_ONE = 1 << _SHIFT


@dataclass
class _Tracks:
    """Vehicles of one transition, paired between s and s': arrays (K, ...) at both ends."""

    xy0: np.ndarray
    xy1: np.ndarray
    h0: np.ndarray
    h1: np.ndarray
    v0: np.ndarray
    v1: np.ndarray
    a0: np.ndarray
    a1: np.ndarray
    ego: np.ndarray

    def at(self, u: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Centres, headings, velocities and opacity at fraction ``u`` of the transition."""
        dh = (self.h1 - self.h0 + np.pi) % (2 * np.pi) - np.pi
        return (
            self.xy0 + u * (self.xy1 - self.xy0),
            self.h0 + u * dh,
            self.v0 + u * (self.v1 - self.v0),
            self.a0 + u * (self.a1 - self.a0),
        )


def _pair(p0: Poses, p1: Poses, dt_s: float) -> _Tracks:
    """Pair the rows of s and s' (ego with ego; others by predicted position); unpaired rows fade."""
    from scipy.optimize import linear_sum_assignment

    i0 = [j for j in np.flatnonzero(p0.present) if j != 0]
    i1 = [j for j in np.flatnonzero(p1.present) if j != 0]
    pairs: list[tuple[int | None, int | None]] = []
    if p0.present[0] or p1.present[0]:
        pairs.append((0 if p0.present[0] else None, 0 if p1.present[0] else None))
    used0, used1 = set(), set()
    if i0 and i1:
        pred = p0.xy[i0] + p0.v[i0] * dt_s
        cost = np.linalg.norm(pred[:, None, :] - p1.xy[i1][None, :, :], axis=-1)
        for r, c in zip(*linear_sum_assignment(cost)):
            if cost[r, c] <= MATCH_GATE_M:
                pairs.append((i0[r], i1[c]))
                used0.add(i0[r])
                used1.add(i1[c])
    pairs += [(j, None) for j in i0 if j not in used0] + [(None, j) for j in i1 if j not in used1]

    rows = []
    for j0, j1 in pairs:
        if j0 is not None and j1 is not None:
            rows.append((p0.xy[j0], p1.xy[j1], p0.heading[j0], p1.heading[j1], p0.v[j0], p1.v[j1], 1.0, 1.0))
        elif j0 is not None:  # leaves the observation: keeps driving and fades out
            rows.append((p0.xy[j0], p0.xy[j0] + p0.v[j0] * dt_s, p0.heading[j0], p0.heading[j0], p0.v[j0], p0.v[j0], 1.0, 0.0))
        else:  # enters the observation: fades in
            rows.append((p1.xy[j1] - p1.v[j1] * dt_s, p1.xy[j1], p1.heading[j1], p1.heading[j1], p1.v[j1], p1.v[j1], 0.0, 1.0))
    ego = np.array([j0 == 0 or j1 == 0 for j0, j1 in pairs], dtype=bool)
    if not rows:
        z2, z1 = np.zeros((0, 2)), np.zeros(0)
        return _Tracks(z2, z2, z1, z1, z2, z2, z1, z1, ego)
    cols = [np.array(c, dtype=np.float64) for c in zip(*rows)]
    return _Tracks(*cols, ego=ego)


def _policy_period(scene: SceneBatch) -> float:
    """Time between s and s' (s), estimated from the real ego: displacement / mean speed."""
    f = scene.features
    s, s2 = np.asarray(scene.truth_states, float), np.asarray(scene.truth_next_states, float)
    disp = np.hypot(s2[:, 0, f.index("x")] - s[:, 0, f.index("x")], s2[:, 0, f.index("y")] - s[:, 0, f.index("y")])
    speed = 0.5 * (np.hypot(s[:, 0, f.index("vx")], s[:, 0, f.index("vy")]) + np.hypot(s2[:, 0, f.index("vx")], s2[:, 0, f.index("vy")]))
    ok = (speed > 1.0) & np.isfinite(disp)
    return float(np.clip(np.median(disp[ok] / speed[ok]), 0.1, 5.0)) if ok.any() else 1.0


def _blend(rgb: tuple[int, int, int], alpha: float, under: tuple[int, int, int] = ROAD_RGB) -> tuple[int, int, int]:
    return tuple(int(round(alpha * c + (1 - alpha) * b)) for c, b in zip(rgb, under))


def _dashes(points: np.ndarray, on_m: float = 3.0, period_m: float = 9.0) -> list[np.ndarray]:
    """Dash segments (2, 2) along a polyline, for dashed centre lines."""
    seg = np.diff(points, axis=0)
    length = np.linalg.norm(seg, axis=1)
    cum = np.concatenate([[0.0], np.cumsum(length)])
    out = []
    for start in np.arange(0.0, cum[-1], period_m):
        ends = [start, min(start + on_m, cum[-1])]
        out.append(np.stack([np.array([np.interp(e, cum, points[:, k]) for k in range(2)]) for e in ends]))
    return out


class _Painter:
    """Draws one panel: road, vehicles and arrows, in a camera frame (centre, pixels per metre)."""

    def __init__(self, road: RoadGeometry, w: int, h: int, ppm: float) -> None:
        self.w, self.h, self.ppm = w, h, ppm
        self.polys = road_polygons(road)
        dashes = [d for lane in road.lanes for d in _dashes(np.asarray(lane.points, float))]
        self.dashes = np.stack(dashes) if dashes else np.zeros((0, 2, 2))
        self.cx = self.cy = 0.0

    def px(self, xy: np.ndarray) -> np.ndarray:
        """World metres -> fixed-point pixel coordinates for cv2 (shift = _SHIFT)."""
        p = np.empty_like(np.asarray(xy, float))
        p[..., 0] = (xy[..., 0] - self.cx) * self.ppm + self.w / 2
        p[..., 1] = (xy[..., 1] - self.cy) * self.ppm + self.h / 2
        return np.round(np.clip(p, -1e5, 1e5) * _ONE).astype(np.int32)

    def road(self, img: np.ndarray) -> None:
        import cv2

        img[:] = BACKGROUND_RGB
        cv2.fillPoly(img, [self.px(s) for s, _, _ in self.polys], ROAD_RGB, cv2.LINE_AA, _SHIFT)
        edges = [self.px(e) for _, l, r in self.polys for e in (l, r)]
        cv2.polylines(img, edges, False, EDGE_RGB, 1, cv2.LINE_AA, _SHIFT)
        half_w = self.w / self.ppm / 2 + 5.0
        d = self.dashes[np.abs(self.dashes[:, 0, 0] - self.cx) < half_w]
        if len(d):
            cv2.polylines(img, list(self.px(d)), False, CENTRE_RGB, 1, cv2.LINE_AA, _SHIFT)

    def cars(self, img: np.ndarray, tr: _Tracks, u: float, fill, ego_fill, outline: bool, arrows: bool) -> None:
        import cv2

        xy, h, v, a = tr.at(u)
        corners = car_corners(xy, h)
        for k in np.argsort(tr.ego):  # ego last, on top
            if a[k] < 0.03:
                continue
            colour = _blend(ego_fill if tr.ego[k] else fill, float(a[k]))
            pts = self.px(corners[k])
            cv2.fillPoly(img, [pts], colour, cv2.LINE_AA, _SHIFT)
            if outline and tr.ego[k]:
                thick = 2 if self.ppm >= 5 else 1
                cv2.polylines(img, [pts], True, _blend((20, 20, 20), float(a[k])), thick, cv2.LINE_AA, _SHIFT)
            if arrows:
                tip = xy[k] + v[k] * ARROW_S
                p0, p1 = self.px(xy[k]), self.px(tip)
                n = np.hypot(*(p1 - p0)) / _ONE
                if n > 4:
                    cv2.arrowedLine(img, tuple(int(c) for c in p0), tuple(int(c) for c in p1), _blend((30, 30, 30), float(a[k])),
                                    1, cv2.LINE_AA, _SHIFT, min(0.4, 7.0 / n))


def _caption(scene: SceneBatch, i: int, k: int, n: int, width: int, colours: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Caption strip for transition ``i`` (k-th of n shown): label, index, true vs reconstructed actions."""
    strip = np.full((CAPTION_H, width, 3), 255, np.uint8)
    dark, grey = (30, 30, 30), (110, 110, 110)
    where = f"   transition {i + 1} of {scene.batch_size}" + (f"   ({k + 1}/{n} shown)" if n < scene.batch_size else "")
    paste(strip, text_patch([(scene.label, dark, True), (where, grey, False), ("      s → s′", grey, False)], 15), 6, 2)
    parts: list[tuple[str, tuple[int, int, int], bool]] = []
    for who, act, ok in scene.action_parts(i):
        parts.append((f"{who}: " if who == "true" else f"   {who}: ", colours.get(who, dark), who != "true"))
        parts.append((act + ("" if ok is None else (" ✓" if ok else " ✗")), dark if ok in (None, True) else (190, 30, 30), False))
    if parts:
        paste(strip, text_patch([("action  ", grey, False)] + parts, 14), 6, 25)
    return strip


def write_replay_video(
    scene: SceneBatch,
    road: RoadGeometry,
    path: Path,
    fps: int = 15,
    frames_per_transition: int = 15,
    window_m: float = 60.0,
    max_transitions: int = 8,
) -> Path:
    """Write an H.264 MP4 replaying each transition of ``scene`` (real panel + one panel per attack).

    Every vehicle moves from s to s' over ``frames_per_transition`` frames (the first frame
    is s, the last s'). Panels are stacked (long thin roads) or side by side (compact
    roads such as a roundabout), all with the same camera following the real ego and
    showing +-``window_m`` along x. At most ``max_transitions`` transitions (evenly
    spaced) are replayed, so the video has ``len(shown) * frames_per_transition`` frames.
    """
    if scene.batch_size == 0:
        raise ValueError(f"SceneBatch '{scene.label}' is empty: nothing to replay")
    frames_per_transition = max(2, int(frames_per_transition))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = select_transitions(scene.batch_size, max_transitions)
    f = scene.features
    s, s2 = np.asarray(scene.truth_states, float), np.asarray(scene.truth_next_states, float)
    ego_x = np.concatenate([s[idx, 0, f.index("x")], s2[idx, 0, f.index("x")]])
    ego_y = np.concatenate([s[idx, 0, f.index("y")], s2[idx, 0, f.index("y")]])
    road_lo, road_hi = y_extent(road, float(ego_x.min() - window_m), float(ego_x.max() + window_m), ego_y)
    half_h = min(window_m, (road_hi - road_lo) / 2.0)
    square = half_h > 0.35 * window_m
    panel_w = 400 if square else 960
    ppm = panel_w / (2 * window_m)
    panel_h = int(np.ceil(2 * half_h * ppm / 2) * 2)
    names = list(scene.recon)
    n_panels = 1 + len(names)
    if square:
        width, height = n_panels * panel_w + (n_panels - 1) * GAP_PX, CAPTION_H + panel_h
    else:
        width, height = panel_w, CAPTION_H + n_panels * (panel_h + GAP_PX) - GAP_PX
    width, height = width + width % 2, height + height % 2
    colours = {name: attack_rgb(n) for n, name in enumerate(names)}
    painter = _Painter(road, panel_w, panel_h, ppm)

    labels = [text_patch([("■ ", EGO_RGB, True), ("real", (30, 30, 30), True)], 13, bg=(255, 255, 255))]
    labels += [text_patch([("■ ", colours[n], True), (n, (30, 30, 30), True), ("  (real: faint)", (110, 110, 110), False)],
                           13, bg=(255, 255, 255)) for n in names]
    bar = text_patch([("10 m", (60, 60, 60), False)], 11, bg=(255, 255, 255), pad=2)
    dt_s = _policy_period(scene)
    panel = np.empty((panel_h, panel_w, 3), np.uint8)
    road_img = np.empty_like(panel)

    def origin(p: int) -> tuple[int, int]:
        return (p * (panel_w + GAP_PX), CAPTION_H) if square else (0, CAPTION_H + p * (panel_h + GAP_PX))

    writer = h264_writer(path, fps)
    n_frames = 0
    try:
        for k, i in enumerate(idx):
            truth = _pair(poses(s[i], f), poses(s2[i], f), dt_s)
            recons = [_pair(poses(scene.recon[n][0][i], f), poses(scene.recon[n][1][i], f), dt_s) for n in names]
            caption = _caption(scene, i, k, len(idx), width, colours)
            for fr in range(frames_per_transition):
                u = fr / (frames_per_transition - 1)
                frame = np.full((height, width, 3), 255, np.uint8)
                frame[:CAPTION_H] = caption
                # progress through the transition (s -> s') along the bottom of the caption
                frame[CAPTION_H - 4 : CAPTION_H - 1, : int(round(u * width))] = (120, 120, 120)
                ego_xy = truth.at(u)[0][truth.ego]
                if len(ego_xy):
                    painter.cx = float(ego_xy[0, 0])
                    painter.cy = camera_y(road_lo, road_hi, float(ego_xy[0, 1]), half_h)
                painter.road(road_img)  # same camera in every panel: draw the road once per frame
                for p in range(n_panels):
                    x0, y0 = origin(p)
                    img = panel  # drawn in a contiguous buffer (cv2 needs one), then copied in
                    img[:] = road_img
                    if p == 0:
                        painter.cars(img, truth, u, CAR_RGB, EGO_RGB, outline=True, arrows=True)
                    else:
                        c = colours[names[p - 1]]
                        painter.cars(img, truth, u, GHOST_CAR_RGB, GHOST_EGO_RGB, outline=False, arrows=False)
                        painter.cars(img, recons[p - 1], u, c, tuple(int(v * 0.7) for v in c), outline=True, arrows=True)
                    paste(img, labels[p], 4, 4)
                    paste(img, bar, 6, panel_h - bar.shape[0] - 9)
                    img[panel_h - 6 : panel_h - 4, 8 : 8 + int(round(10 * ppm))] = (60, 60, 60)
                    frame[y0 : y0 + panel_h, x0 : x0 + panel_w] = img
                writer.append_data(frame)
                n_frames += 1
    finally:
        writer.close()
    log.info("wrote replay video %s (%d frames, %dx%d, %d transitions)", path, n_frames, width, height, len(idx))
    return path

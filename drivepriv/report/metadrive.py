"""Figures and videos of MetaDrive lidar-and-state observations, ego-centric (heading up).

:func:`draw_lidar_scene` draws one observation as the ego sees it: the ego as a 4.5 m x 2 m
box pointing up, each lidar hit at its distance and angle (rays that hit nothing are left
out; a faint circle marks the lidar's range), the road borders and lane lines rebuilt from
the decoded border distances, lane offset and heading difference (drawn straight: the
observation has no curvature of the ego's own lane), and a caption with the decoded speed,
heading difference and lateral position. Truth comes first, then one panel per
reconstruction, all at the same scale. Drawn with OpenCV (headless), so a video of a few
hundred frames takes seconds.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from drivepriv.envs.metadrive.codec import LIDAR_HIT, lidar_angles_rad, lidar_range_m
from drivepriv.envs.vector import VectorCodec
from drivepriv.report.media import h264_writer
from drivepriv.report.plots import EGO_RGB, attack_rgb

log = logging.getLogger(__name__)

PANEL_PX = 320
GAP_PX = 6
TITLE_H = 26
CAPTION_H = 40
EGO_LENGTH_M = 4.5
EGO_WIDTH_M = 2.0
#: Half the side of the area a panel shows (m): the default lidar range plus a margin.
DEFAULT_HALF_VIEW_M = 52.0

TRUTH_RGB = (30, 30, 30)
ROAD_RGB = (90, 90, 90)
LANE_RGB = (170, 170, 170)
FAINT_RGB = (225, 225, 225)


def _feature(phys: np.ndarray, codec: VectorCodec, name: str) -> float | None:
    return float(phys[codec.index(name)]) if name in codec.names else None


def _draw_panel(img: np.ndarray, obs: np.ndarray, codec: VectorCodec, colour: tuple[int, int, int], half_view_m: float) -> dict[str, float | None]:
    """Draw one observation into ``img`` (PANEL_PX square, RGB); return the decoded caption values."""
    import cv2

    ppm = PANEL_PX / (2.0 * half_view_m)
    c = PANEL_PX / 2.0

    def px(x_ahead_m: np.ndarray | float, y_left_m: np.ndarray | float) -> np.ndarray:
        """Ego frame (x ahead, y left) -> pixel (u right, v down), ego at the centre, heading up."""
        u = c - np.asarray(y_left_m) * ppm
        v = c - np.asarray(x_ahead_m) * ppm
        return np.stack([u, v], -1)

    phys = codec.to_physical(np.asarray(obs, np.float64))
    heading = _feature(phys, codec, "heading_diff_rad")
    left_m = _feature(phys, codec, "border_left_m")
    right_m = _feature(phys, codec, "border_right_m")
    offset_m = _feature(phys, codec, "lane_offset_left_m")
    speed = _feature(phys, codec, "speed_mps")
    lane_w = float(getattr(codec, "lane_width_m", 3.5))

    # road: borders and lane lines parallel to the lane direction (-heading in the ego frame)
    psi = -(heading or 0.0)
    u_dir = np.array([math.cos(psi), math.sin(psi)])
    n_left = np.array([-math.sin(psi), math.cos(psi)])
    s = np.array([-1.5 * half_view_m, 1.5 * half_view_m])

    def line(lat_m: float, rgb: tuple[int, int, int], thick: int, dashed: bool = False) -> None:
        p0, p1 = lat_m * n_left + s[0] * u_dir, lat_m * n_left + s[1] * u_dir
        a, b = px(p0[0], p0[1]), px(p1[0], p1[1])
        if not dashed:
            cv2.line(img, tuple(int(round(v)) for v in a), tuple(int(round(v)) for v in b), rgb, thick, cv2.LINE_AA)
            return
        n_dash = 40
        for k in range(0, n_dash, 2):
            q0, q1 = a + (b - a) * k / n_dash, a + (b - a) * (k + 1) / n_dash
            cv2.line(img, tuple(int(round(v)) for v in q0), tuple(int(round(v)) for v in q1), rgb, thick, cv2.LINE_AA)

    if left_m is not None and right_m is not None:
        line(left_m, ROAD_RGB, 2)
        line(-right_m, ROAD_RGB, 2)
        k = 1
        while left_m - k * lane_w > -right_m + 0.25 * lane_w and k < 12:
            line(left_m - k * lane_w, LANE_RGB, 1, dashed=True)
            k += 1
    elif offset_m is not None:  # only the ego's own lane is known
        line(offset_m + lane_w / 2, LANE_RGB, 1, dashed=True)
        line(offset_m - lane_w / 2, LANE_RGB, 1, dashed=True)

    # lidar: faint range circle, hit points
    lidar_idx = codec.groups().get("lidar", [])
    rng_m = lidar_range_m(codec)
    cv2.circle(img, (int(c), int(c)), int(round(rng_m * ppm)), FAINT_RGB, 1, cv2.LINE_AA)
    if lidar_idx:
        dist = phys[lidar_idx]
        ang = lidar_angles_rad(codec)
        hit = dist < LIDAR_HIT * rng_m
        pts = px(dist * np.cos(ang), dist * np.sin(ang))
        for (u, v), h in zip(pts, hit):
            if h:
                cv2.circle(img, (int(round(u)), int(round(v))), 2, colour, -1, cv2.LINE_AA)

    # the ego: a 4.5 m x 2 m box pointing up, with a nose mark
    hl, hw = EGO_LENGTH_M / 2, EGO_WIDTH_M / 2
    box = px(np.array([hl, hl, -hl, -hl]), np.array([hw, -hw, -hw, hw])).round().astype(np.int32)
    cv2.fillPoly(img, [box], EGO_RGB, cv2.LINE_AA)
    nose = px(np.array([hl, hl - 1.0, hl - 1.0]), np.array([0.0, 0.6, -0.6])).round().astype(np.int32)
    cv2.fillPoly(img, [nose], (255, 255, 255), cv2.LINE_AA)
    return {"speed": speed, "heading": heading, "offset": offset_m, "left": left_m}


def _text(img: np.ndarray, text: str, xy: tuple[int, int], rgb: tuple[int, int, int], scale: float = 0.42, bold: bool = False) -> None:
    import cv2

    cv2.putText(img, text, xy, cv2.FONT_HERSHEY_SIMPLEX, scale, rgb, 2 if bold else 1, cv2.LINE_AA)


def _fmt(v: float | None, unit: str, signed: bool = True) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.2f} {unit}" if signed else f"{v:.1f} {unit}"


def draw_lidar_scene(truth_obs: np.ndarray, recon_obs: dict[str, np.ndarray], codec: VectorCodec, title: str = "",
                     half_view_m: float | None = None) -> np.ndarray:
    """Side-by-side ego-centric panels (truth, then each reconstruction) as an RGB uint8 image.

    ``truth_obs`` and each ``recon_obs`` value are one observation (D,) in observation units.
    The image has even width and height (H.264 needs them).
    """
    truth_obs = np.asarray(truth_obs).reshape(-1)
    if truth_obs.shape[0] != codec.obs_dim:
        raise ValueError(f"draw_lidar_scene: truth has {truth_obs.shape[0]} values, the codec {codec.obs_dim}")
    half = float(half_view_m or max(DEFAULT_HALF_VIEW_M, lidar_range_m(codec) * 1.04))
    panels = [("truth", truth_obs, TRUTH_RGB)]
    for k, (name, rec) in enumerate(recon_obs.items()):
        rec = np.asarray(rec).reshape(-1)
        if rec.shape[0] != codec.obs_dim:
            raise ValueError(f"draw_lidar_scene: reconstruction '{name}' has {rec.shape[0]} values, the codec {codec.obs_dim}")
        panels.append((name, rec, attack_rgb(k)))
    n = len(panels)
    width = n * PANEL_PX + (n - 1) * GAP_PX
    height = TITLE_H + PANEL_PX + CAPTION_H
    width, height = width + width % 2, height + height % 2
    img = np.full((height, width, 3), 255, np.uint8)
    if title:
        _text(img, title, (6, 18), (40, 40, 40), 0.5, bold=True)
    for p, (name, obs, rgb) in enumerate(panels):
        x0 = p * (PANEL_PX + GAP_PX)
        panel = np.full((PANEL_PX, PANEL_PX, 3), 250, np.uint8)
        vals = _draw_panel(panel, obs, codec, rgb, half)
        _text(panel, name, (6, 16), rgb, 0.48, bold=True)
        img[TITLE_H : TITLE_H + PANEL_PX, x0 : x0 + PANEL_PX] = panel
        y = TITLE_H + PANEL_PX
        _text(img, f"v {_fmt(vals['speed'], 'm/s', signed=False)}   dpsi {_fmt(vals['heading'], 'rad')}", (x0 + 4, y + 16), (40, 40, 40))
        _text(img, f"lane offset {_fmt(vals['offset'], 'm')}   to left border {_fmt(vals['left'], 'm', signed=False)}", (x0 + 4, y + 33), (40, 40, 40))
    return img


def write_lidar_video(frames_truth: np.ndarray, frames_recon: dict[str, np.ndarray], codec: VectorCodec, path: Path,
                      fps: int = 10) -> Path:
    """Write an H.264 MP4 with one frame per transition: truth and each reconstruction side by side.

    ``frames_truth`` is (T, D); each ``frames_recon`` value is (T, D) in observation units.
    """
    truth = np.asarray(frames_truth)
    if truth.ndim != 2 or truth.shape[0] == 0:
        raise ValueError(f"write_lidar_video: expected frames_truth of shape (T, D) with T >= 1, got {truth.shape}")
    recons = {k: np.asarray(v) for k, v in frames_recon.items()}
    for k, v in recons.items():
        if v.shape != truth.shape:
            raise ValueError(f"write_lidar_video: reconstruction '{k}' has shape {v.shape}, the truth {truth.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = h264_writer(path, fps)
    try:
        for t in range(truth.shape[0]):
            frame = draw_lidar_scene(truth[t], {k: v[t] for k, v in recons.items()}, codec, title=f"transition {t + 1}/{truth.shape[0]}")
            writer.append_data(frame)
    finally:
        writer.close()
    log.info("wrote lidar video %s (%d frames)", path, truth.shape[0])
    return path


def topdown_frame(env: Any) -> np.ndarray:
    """The simulator's own top-down frame of the current state, (H, W, 3) RGB uint8.

    ``env`` is an environment from :func:`drivepriv.envs.metadrive.make_metadrive_env` created
    with ``render_mode="rgb_array"`` (wrappers are fine) and reset at least once.
    """
    frame = env.render()
    if frame is None:
        raise ValueError("topdown_frame: the environment renders nothing; create it with render_mode='rgb_array'")
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"topdown_frame: expected an (H, W, 3) frame, got shape {frame.shape}")
    return frame.astype(np.uint8, copy=False)

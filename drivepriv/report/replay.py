"""``drivepriv replay RUN_DIR``: a run's reconstructions drawn by the simulator's own renderer.

For every attacked batch of a finished ``drivepriv eval`` run (``reconstructions.npz`` and
``config.yaml``), :func:`replay_run` writes an H.264 MP4 and a small GIF thumbnail. Each
transition of the batch gives two frames, s then s'; each frame shows the truth panel and
one panel per attack ("truth", "rgia", "dlg", ...), stacked for long thin roads (merge,
highway) and side by side otherwise, under a caption with the transition, its episode and
step, and the true and reconstructed actions and rewards.

What each backend draws, and its limits:

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
- **gymnasium control tasks**: the task's own ``rgb_array`` renderer with the simulator's
  state set from the decoded observation (:func:`drivepriv.envs.control.obs_to_state`);
  attack panels show the truth faintly underneath.

Files are written atomically (a hidden temporary name in the output folder, then
``os.replace``): an interrupted replay leaves no half-written MP4 or GIF.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from drivepriv.errors import ConfigError, did_you_mean
from drivepriv.report.media import h264_writer
from drivepriv.report.plots import attack_rgb, poses, select_transitions
from drivepriv.results import BatchRecord, load_batches
from drivepriv.seeding import derive_seed

log = logging.getLogger(__name__)

#: Frames per second of the MP4: each state (s, then s') is one frame.
DEFAULT_FPS = 2
#: At most this many transitions of a batch are replayed (evenly spaced).
MAX_TRANSITIONS = 16
#: The GIF thumbnail shows at most this many transitions, at most this wide.
GIF_MAX_TRANSITIONS = 4
GIF_MAX_WIDTH_PX = 360
CAPTION_H = 26
TITLE_H = 20
GAP_PX = 4
TRUTH_RGB = (30, 30, 30)
#: Colours (RGBA) of the truth's translucent ghost vehicles in highway-env attack panels.
GHOST_EGO_RGBA = (170, 255, 150, 120)
GHOST_RGBA = (225, 235, 255, 120)
#: highway-env views drawn side by side (intersection, roundabout...) are at most this wide.
ROW_PANEL_MAX_PX = 400
#: Control tasks: panels are scaled to this width (gymnasium draws 500-600 px).
CONTROL_PANEL_W = 300
#: MetaDrive panel: side (px) and scale (px per m): +-50 m, the default lidar's range.
MD_PANEL_PX = 340
MD_SCALING_PX_PER_M = 3.4


# ---------------------------------------------------------------------------------------------
# public entry point


def replay_run(
    run_dir: Path,
    batch: int | None = None,
    attacks: list[str] | None = None,
    out_dir: Path | None = None,
    fps: int = DEFAULT_FPS,
    max_transitions: int = MAX_TRANSITIONS,
) -> list[dict]:
    """Render a run's attacked batches in the simulator's own renderer, truth beside reconstructions.

    ``batch``: index of one batch (0-based, in the order of ``reconstructions.npz``); None
    renders every batch. ``attacks``: the attacks to show (default: all of the batch's).
    ``out_dir``: default ``run_dir / "replay"``. At most ``max_transitions`` transitions
    per batch are shown (evenly spaced), two frames each (s, s') at ``fps`` frames per second.

    Returns, per rendered batch, ``{"batch": k, "label": ..., "mp4": Path, "gif": Path,
    "frames": n}``. Raises :class:`ConfigError` for a missing or damaged run folder, a batch
    index out of range, an unknown attack or a backend that cannot be replayed.
    """
    from drivepriv.scenarios import load_scenario

    run_dir = Path(run_dir)
    records = load_batches(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: it is not a drivepriv run folder; run `drivepriv eval` again")
    cfg = load_scenario(str(cfg_path))
    if not records:
        raise ConfigError(f"{run_dir}: the run attacked no batch, so there is nothing to replay")
    if batch is None:
        chosen = list(range(len(records)))
    else:
        if not 0 <= int(batch) < len(records):
            raise ConfigError(
                f"--batch {batch}: {run_dir} has {len(records)} attacked batch{'es' if len(records) != 1 else ''}; "
                f"choose a batch from 0 to {len(records) - 1}"
            )
        chosen = [int(batch)]
    if int(fps) < 1:
        raise ConfigError(f"fps: expected a positive integer, got {fps}")
    if int(max_transitions) < 1:
        raise ConfigError(f"max_transitions: expected a positive integer, got {max_transitions}")
    known = list(dict.fromkeys(a for r in records for a in r.recon))
    if attacks is not None:
        for a in attacks:
            if a not in known:
                raise ConfigError(
                    f"attack '{a}' is not in {run_dir}.{did_you_mean(a, known)} Attacks of this run: {', '.join(known) or 'none'}."
                )
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "replay"
    out_dir.mkdir(parents=True, exist_ok=True)

    backend = _make_backend(cfg)
    results = []
    try:
        for k in chosen:
            rec = records[k]
            names = [a for a in rec.recon if attacks is None or a in attacks]
            colours = {a: attack_rgb(i) for i, a in enumerate(rec.recon)}
            frames = list(_batch_frames(backend, rec, names, colours, int(max_transitions)))
            stem = f"b{k}-{rec.stem}"
            mp4 = _write_mp4(frames, out_dir / f"{stem}.mp4", int(fps))
            gif = _write_gif(frames[: 2 * GIF_MAX_TRANSITIONS], out_dir / f"{stem}.gif", int(fps))
            log.info("replay of batch %d (%s): %s, %s (%d frames)", k, rec.label, mp4, gif, len(frames))
            results.append({"batch": k, "label": rec.label, "mp4": mp4, "gif": gif, "frames": len(frames)})
    finally:
        backend.close()
    return results


# ---------------------------------------------------------------------------------------------
# frames


class _Backend(Protocol):
    #: "stack" (panels one under another, one title line each) or "row" (side by side, two title lines)
    layout: str

    def begin(self, truth_state: np.ndarray, client: int, episode: int, step: int) -> None:
        """Prepare a frame whose true state is ``truth_state`` (camera, scenario, ghosts)."""

    def panel(self, state: np.ndarray, truth: bool, rgb: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
        """One panel (H, W, 3) uint8 of ``state`` (same size for every state) and notes for its title."""

    def action_text(self, a: np.ndarray) -> str: ...

    def close(self) -> None: ...


def _batch_frames(backend: _Backend, rec: BatchRecord, names: list[str], colours: dict[str, tuple[int, int, int]],
                  max_transitions: int) -> Iterator[np.ndarray]:
    """Yield the frames of one batch: per shown transition, s then s'."""
    t = rec.truth
    n = len(t["states"])
    idx = select_transitions(n, max_transitions)
    for i in idx:
        episode, step = (int(v) for v in rec.origins[i])
        for which, key in ((0, "states"), (1, "next_states")):
            backend.begin(np.asarray(t[key][i]), rec.client, episode, step + which)
            true_a = backend.action_text(t["actions"][i])
            img, notes = backend.panel(np.asarray(t[key][i]), True, TRUTH_RGB)
            panels = [_Panel("truth", TRUTH_RGB, img, notes, true_a, None, t["rewards"][i])]
            for a in names:
                img, notes = backend.panel(np.asarray(rec.recon[a][key][i]), False, colours[a])
                ra = backend.action_text(rec.recon[a]["actions"][i])
                panels.append(_Panel(a, colours[a], img, notes, ra, ra == true_a, rec.recon[a]["rewards"][i]))
            yield _compose(_caption(rec, i, n, which, episode, step + which), panels, backend.layout)


@dataclass
class _Panel:
    """One drawn panel and what its title says: name, action (and whether it is the true one), reward, notes."""

    name: str
    rgb: tuple[int, int, int]
    img: np.ndarray
    notes: list[str]
    action: str
    correct: bool | None
    reward: Any

    def title(self, two_lines: bool) -> "_Text":
        """Name, action (red when wrong) and reward; the notes after them or on a second line."""
        dark, grey = (30, 30, 30), (110, 110, 110)
        try:
            r = f"{float(self.reward):+.2f}"
        except (TypeError, ValueError):
            r = "?"
        mark = "" if self.correct is None else (" ✓" if self.correct else " ✗")
        line = [("■ ", self.rgb, True), (self.name, dark, True), ("   a ", grey, False),
                (self.action + mark, dark if self.correct in (None, True) else (190, 30, 30), False), (f"   r {r}", dark, False)]
        notes = [(" · ".join(self.notes), grey, False)] if self.notes else []
        if two_lines:
            return [line, [("   ", grey, False), *notes]]
        return [line + [("   ", grey, False), *notes]]


_Text = list[list[tuple[str, tuple[int, int, int], bool]]]  # lines of (text, rgb, bold) segments


def _caption(rec: BatchRecord, i: int, n: int, which: int, episode: int, step: int) -> _Text:
    """The caption line: batch, transition, which state, and where it came from."""
    grey, dark = (110, 110, 110), (30, 30, 30)
    state = "s  (before the action)" if which == 0 else "s′  (after the action)"
    return [[(rec.label, dark, True), (f"   transition {i + 1} of {n}   ", grey, False), (state, dark, True),
             (f"   episode {episode}, step {step}", grey, False)]]


@lru_cache(maxsize=8)
def _font(size: int, bold: bool = False):
    """DejaVu Sans from matplotlib's bundled fonts (Pillow's default font as a fallback)."""
    from PIL import ImageFont

    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)
    except (OSError, ImportError):  # pragma: no cover - matplotlib ships DejaVu
        return ImageFont.load_default()


def _draw_text(img: np.ndarray, lines: _Text, x: int, y: int, size: int = 13, line_h: int = 20) -> np.ndarray:
    """Draw lines of coloured segments onto a copy of ``img`` at (x, y)."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for k, parts in enumerate(lines):
        xx = x
        for text, rgb, bold in parts:
            d.text((xx, y + k * line_h), text, fill=tuple(rgb), font=_font(size, bold))
            xx += _font(size, bold).getlength(text)
    return np.asarray(pil)


def _compose(caption: list, panels: list[_Panel], layout: str) -> np.ndarray:
    """Caption on top, then the titled panels stacked or side by side; even width and height."""
    title_h = TITLE_H if layout == "stack" else 2 * TITLE_H - 4
    ph, pw = panels[0].img.shape[:2]
    n = len(panels)
    if layout == "stack":
        width, height = pw, CAPTION_H + n * (title_h + ph) + (n - 1) * GAP_PX
    else:
        width, height = n * pw + (n - 1) * GAP_PX, CAPTION_H + title_h + ph
    width = max(width, 480)
    width, height = width + width % 2, height + height % 2
    frame = np.full((height, width, 3), 255, np.uint8)
    corners = []
    for p, panel in enumerate(panels):
        x0, y0 = (0, CAPTION_H + p * (title_h + ph + GAP_PX)) if layout == "stack" else (p * (pw + GAP_PX), CAPTION_H)
        frame[y0 + title_h : y0 + title_h + ph, x0 : x0 + pw] = panel.img[:, :, :3]
        if layout != "stack":  # a hairline between panels that share a white background
            frame[y0 + title_h : y0 + title_h + ph, [x0, x0 + pw - 1]] = (200, 200, 200)
        corners.append((x0, y0))
    frame = _draw_text(frame, caption, 6, 4, size=13)
    for (x0, y0), panel in zip(corners, panels):
        frame = _draw_text(frame, panel.title(layout != "stack"), x0 + 4, y0 + 2, size=12, line_h=16)
    return frame


# ---------------------------------------------------------------------------------------------
# writers (atomic)


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.stem}.{os.getpid()}.tmp{final.suffix}")


def _atomic(final: Path, write: Callable[[Path], None]) -> Path:
    tmp = _tmp_path(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def _write_mp4(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    """H.264 (libx264, yuv420p, baseline, +faststart): plays in every browser."""
    def write(tmp: Path) -> None:
        writer = h264_writer(tmp, fps)
        try:
            for f in frames:
                writer.append_data(f)
        finally:
            writer.close()

    return _atomic(path, write)


def _write_gif(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    """Looping GIF thumbnail, at most GIF_MAX_WIDTH_PX wide."""
    import imageio.v2 as imageio
    from PIL import Image

    h, w = frames[0].shape[:2]
    scale = min(1.0, GIF_MAX_WIDTH_PX / w)
    size = (max(2, int(round(w * scale))), max(2, int(round(h * scale))))
    small = [np.asarray(Image.fromarray(f).resize(size, Image.LANCZOS)) if scale < 1 else f for f in frames]
    return _atomic(path, lambda tmp: imageio.mimsave(tmp, small, format="GIF", duration=1000.0 / fps, loop=0))


# ---------------------------------------------------------------------------------------------
# backends


def _make_backend(cfg: Any) -> _Backend:
    backend = cfg.env.backend
    if backend == "highway":
        return _HighwayBackend(cfg)
    if backend == "control":
        return _ControlBackend(cfg)
    if backend == "metadrive":
        return _MetaDriveBackend(cfg)
    raise ConfigError(f"env.backend: replay cannot render backend '{backend}'; it renders highway, metadrive and control")


def _episode_seed(cfg: Any, client: int, episode: int) -> int:
    """The seed the client's episode was reset with (the federation's own rule)."""
    from drivepriv.federation.inprocess import episode_seed

    return episode_seed(cfg.seed, client, episode)


def _action_text(continuous: bool, names: tuple[str, ...] = ()) -> Callable[[np.ndarray], str]:
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


class _HighwayBackend:
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
        self.action_text = _action_text(not discrete, action_names(self.env) if discrete else ())
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


class _ControlBackend:
    """gymnasium's own rgb_array renderer with the simulator's state set from the observation."""

    layout = "row"

    def __init__(self, cfg: Any) -> None:
        from drivepriv.envs import make_env

        self.env_id = cfg.env.id
        self.env = make_env(cfg.env, render_mode="rgb_array")
        self.env.reset(seed=derive_seed(cfg.seed, "replay"))
        self.truth_img: np.ndarray | None = None
        self.action_text = _action_text(not hasattr(self.env.action_space, "n"))

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


# ---------------------------------------------------------------------------------------------
# MetaDrive: localisation on the route and the worker that renders


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


class _MetaDriveBackend:
    """MetaDrive's top-down renderer, ego localised on the route (see the module docstring)."""

    layout = "row"

    def __init__(self, cfg: Any) -> None:
        import multiprocessing as mp

        from drivepriv.envs import make_codec
        from drivepriv.envs.metadrive import _main_module_hidden, merged_metadrive_config, validate_metadrive_config

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
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._conn = parent
        self._process = ctx.Process(target=_md_worker, args=(child, config, MD_PANEL_PX, MD_SCALING_PX_PER_M),
                                    daemon=True, name="drivepriv-replay-metadrive")
        with _main_module_hidden():
            self._process.start()
        child.close()
        self._scenario: int | None = None
        self.spawn_route_m = 0.0
        self.ego_size_m = (4.5, 2.0)  # MetaDrive's default vehicle; the worker says on reset
        self.action_text = _action_text(True)
        try:
            self._recv("start")
        except BaseException:
            self.close()
            raise

    def _recv(self, what: str) -> Any:
        from drivepriv.envs.metadrive import WORKER_TIMEOUT_S, MetaDriveWorkerError

        waited = 0.0
        while not self._conn.poll(0.5):
            waited += 0.5
            if not self._process.is_alive():
                raise MetaDriveWorkerError(f"MetaDrive replay worker died during {what} (exit code {self._process.exitcode})")
            if waited >= WORKER_TIMEOUT_S:
                raise MetaDriveWorkerError(f"MetaDrive replay worker did not answer {what} within {WORKER_TIMEOUT_S:.0f} s")
        status, payload = self._conn.recv()
        if status != "ok":
            raise MetaDriveWorkerError(f"MetaDrive replay worker failed during {what}:\n{payload}")
        return payload

    def _call(self, cmd: str, arg: Any = None) -> Any:
        self._conn.send((cmd, arg))
        return self._recv(cmd)

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
        scenario = scenario_for_seed(_episode_seed(self.cfg, client, episode), self.start_seed, self.num_scenarios)
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
        from drivepriv.envs.metadrive import _shutdown

        if getattr(self, "_process", None) is not None:
            _shutdown(self._process, self._conn)
            self._process = None

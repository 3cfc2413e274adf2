"""Bird's-eye figures of an attacked batch: real transitions beside their reconstructions.

Everything here works in the physical world frame of the simulator (metres, m/s). As in
highway-env's own renderer, world ``y`` points *down* the page (the merge on-ramp at
``y = 14.5 m`` is drawn below the highway).

The module also holds the scene geometry shared with :mod:`drivepriv.report.video`:
vehicle poses from a state array, car footprints, lane edges, the vertical extent of the
road and the colour palette.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from drivepriv.priors.road import Lane, RoadGeometry

log = logging.getLogger(__name__)

#: Footprint drawn for every vehicle (highway-env's default vehicle is 5 m x 2 m).
CAR_LENGTH_M = 5.0
CAR_WIDTH_M = 2.0
#: Velocity arrows show the displacement over this many seconds.
ARROW_S = 0.5
#: A row is drawn when its (possibly soft) presence exceeds this.
PRESENCE_THRESHOLD = 0.5
#: Figure panels on long thin roads are stretched vertically up to this height (inches) ...
MIN_PANEL_H_IN = 1.7
#: ... but never by more than this factor.
MAX_Y_STRETCH = 2.0

# Okabe-Ito colour-blind-safe palette (RGB 0..255).
EGO_RGB = (0, 158, 115)
CAR_RGB = (70, 82, 96)
ATTACK_RGB = ((213, 94, 0), (0, 114, 178), (204, 121, 167), (230, 159, 0), (86, 180, 233), (240, 228, 66))
ROAD_RGB = (222, 222, 222)
EDGE_RGB = (128, 128, 128)
CENTRE_RGB = (170, 170, 170)


def attack_rgb(i: int) -> tuple[int, int, int]:
    """Colour of the ``i``-th attack (cycles through the palette)."""
    return ATTACK_RGB[i % len(ATTACK_RGB)]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@dataclass
class SceneBatch:
    """One attacked batch, every array in the physical world frame (m, m/s), shape (B, V, F).

    Row 0 of every state is the ego. ``recon`` maps an attack name to its reconstructed
    (states, next_states), already matched to the truth's order: transition ``i`` of a
    reconstruction is transition ``i`` of the truth, and vehicle row ``j`` is observation
    slot ``j``. Presence may be soft; rows with presence > 0.5 are drawn.
    """

    label: str
    features: tuple[str, ...]
    truth_states: np.ndarray
    truth_next_states: np.ndarray
    recon: dict[str, tuple[np.ndarray, np.ndarray]]
    actions: np.ndarray | None = None
    recon_actions: dict[str, np.ndarray] = field(default_factory=dict)
    action_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        for name in ("presence", "x", "y", "vx", "vy"):
            if name not in self.features:
                raise ValueError(f"SceneBatch '{self.label}': feature '{name}' is required, features are {self.features}")
        shape = np.shape(self.truth_states)
        if len(shape) != 3 or shape[2] != len(self.features):
            raise ValueError(
                f"SceneBatch '{self.label}': truth_states must be (B, V, {len(self.features)}), got {shape}"
            )
        if np.shape(self.truth_next_states) != shape:
            raise ValueError(f"SceneBatch '{self.label}': truth_next_states {np.shape(self.truth_next_states)} != {shape}")
        for name, (s, s2) in self.recon.items():
            if np.shape(s) != shape or np.shape(s2) != shape:
                raise ValueError(
                    f"SceneBatch '{self.label}': reconstruction '{name}' has shapes {np.shape(s)}, {np.shape(s2)}; "
                    f"expected {shape} like the truth"
                )

    @property
    def batch_size(self) -> int:
        return int(np.shape(self.truth_states)[0])

    def action_text(self, a: float | int | None) -> str:
        """Readable name of an action index ("?" when unknown)."""
        if a is None or (isinstance(a, float) and not np.isfinite(a)):
            return "?"
        k = int(round(float(a)))
        return self.action_names[k] if 0 <= k < len(self.action_names) else str(k)

    def action_parts(self, i: int) -> list[tuple[str, str, bool | None]]:
        """(who, action text, correct?) for transition ``i``: first the truth, then each attack."""
        parts: list[tuple[str, str, bool | None]] = []
        true_a = None if self.actions is None else self.actions[i]
        if true_a is not None:
            parts.append(("true", self.action_text(true_a), None))
        for name, acts in self.recon_actions.items():
            a = acts[i]
            ok = None if true_a is None else int(round(float(a))) == int(round(float(true_a)))
            parts.append((name, self.action_text(a), ok))
        return parts


@dataclass
class Poses:
    """Vehicles of one state: presence mask (V,), centres (V, 2), velocities (V, 2), headings (V,) in rad."""

    present: np.ndarray
    xy: np.ndarray
    v: np.ndarray
    heading: np.ndarray


def poses(state: np.ndarray, features: tuple[str, ...]) -> Poses:
    """Decode one (V, F) world-frame state; heading from cos_h/sin_h if present, else from velocity."""
    f = {name: i for i, name in enumerate(features)}
    st = np.asarray(state, dtype=np.float64)
    present = np.nan_to_num(st[:, f["presence"]]) > PRESENCE_THRESHOLD
    xy = st[:, [f["x"], f["y"]]]
    v = np.nan_to_num(st[:, [f["vx"], f["vy"]]])
    if "cos_h" in f and "sin_h" in f:
        c, s = np.nan_to_num(st[:, f["cos_h"]]), np.nan_to_num(st[:, f["sin_h"]])
        heading = np.where(np.hypot(c, s) > 1e-6, np.arctan2(s, c), np.arctan2(v[:, 1], v[:, 0]))
    else:
        heading = np.where(np.hypot(v[:, 0], v[:, 1]) > 0.1, np.arctan2(v[:, 1], v[:, 0]), 0.0)
    present &= np.isfinite(xy).all(axis=1)
    return Poses(present=present, xy=np.nan_to_num(xy), v=v, heading=heading)


def car_corners(xy: np.ndarray, heading: np.ndarray, length_m: float = CAR_LENGTH_M, width_m: float = CAR_WIDTH_M) -> np.ndarray:
    """Footprint corners (..., 4, 2) of cars centred at ``xy`` (..., 2) with ``heading`` (...)."""
    half = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]], dtype=np.float64) * [length_m / 2, width_m / 2]
    c, s = np.cos(heading)[..., None], np.sin(heading)[..., None]
    x = half[:, 0] * c - half[:, 1] * s
    y = half[:, 0] * s + half[:, 1] * c
    return np.stack([x, y], axis=-1) + np.asarray(xy)[..., None, :]


def lane_edges(lane: Lane) -> tuple[np.ndarray, np.ndarray]:
    """Left and right edge polylines (N, 2) of a lane: its centre line offset by +-width/2."""
    pts = np.asarray(lane.points, dtype=np.float64)
    d = np.diff(pts, axis=0)
    seg = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
    tang = np.empty_like(pts)
    tang[0], tang[-1] = seg[0], seg[-1]
    if len(pts) > 2:
        mid = seg[:-1] + seg[1:]
        tang[1:-1] = mid / np.maximum(np.linalg.norm(mid, axis=1, keepdims=True), 1e-9)
    normal = np.stack([-tang[:, 1], tang[:, 0]], axis=1)
    off = normal * (lane.width_m / 2.0)
    return pts + off, pts - off


def road_polygons(road: RoadGeometry) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(surface polygon (2N, 2), left edge, right edge) of every lane."""
    out = []
    for lane in road.lanes:
        left, right = lane_edges(lane)
        out.append((np.concatenate([left, right[::-1]]), left, right))
    return out


def y_extent(road: RoadGeometry, x_lo: float, x_hi: float, ys: np.ndarray, margin_m: float = 2.0) -> tuple[float, float]:
    """Vertical range (m) covering the lanes that overlap [x_lo, x_hi] and the given vehicle ``ys``."""
    lo, hi = np.inf, -np.inf
    for lane in road.lanes:
        for edge in lane_edges(lane):
            inside = (edge[:, 0] >= x_lo) & (edge[:, 0] <= x_hi)
            if inside.any():
                lo, hi = min(lo, edge[inside, 1].min()), max(hi, edge[inside, 1].max())
            elif edge[:, 0].min() < x_lo and edge[:, 0].max() > x_hi:  # a long straight segment spans the window
                yy = np.interp([x_lo, x_hi], edge[:, 0], edge[:, 1]) if np.all(np.diff(edge[:, 0]) > 0) else edge[:, 1]
                lo, hi = min(lo, np.min(yy)), max(hi, np.max(yy))
    ys = np.asarray(ys, dtype=np.float64)
    ys = ys[np.isfinite(ys)]
    if ys.size:
        lo, hi = min(lo, ys.min() - CAR_WIDTH_M), max(hi, ys.max() + CAR_WIDTH_M)
    if not np.isfinite(lo):
        lo, hi = -10.0, 10.0
    return float(lo - margin_m), float(hi + margin_m)


def select_transitions(batch_size: int, max_transitions: int) -> list[int]:
    """Indices of the transitions shown: all of them, or ``max_transitions`` evenly spaced."""
    if batch_size <= max_transitions:
        return list(range(batch_size))
    return sorted({int(round(i)) for i in np.linspace(0, batch_size - 1, max_transitions)})


def shown_text(idx: list[int], batch_size: int) -> str:
    """Human text (1-based) saying which transitions are shown."""
    if len(idx) == batch_size:
        return "1 transition" if batch_size == 1 else f"all {batch_size} transitions"
    return f"transitions {', '.join(str(i + 1) for i in idx)} of {batch_size}"


def camera_y(road_lo: float, road_hi: float, ego_y: float, half_h_m: float) -> float:
    """Vertical camera centre: fixed on the road when it fits in the panel, else following the ego."""
    if road_hi - road_lo <= 2 * half_h_m:
        return (road_lo + road_hi) / 2.0
    return float(np.clip(ego_y, road_lo + half_h_m, road_hi - half_h_m))


def draw_batch_figure(
    scene: SceneBatch,
    road: RoadGeometry,
    path: Path,
    window_m: float = 60.0,
    max_transitions: int = 8,
    y_stretch: float | None = None,
    dpi: int = 110,
) -> Path:
    """Write a bird's-eye PNG of ``scene``: one row per transition, state s left and next state s' right.

    Each panel is centred on the *true* ego position of state s and shows +-``window_m``
    along x. Real vehicles are filled (ego green), each attack's reconstruction is outlined
    in its own colour; arrows show velocity x 0.5 s; thin dotted lines join a reconstructed
    row to the true row of the same observation slot. On long thin roads the y axis is
    stretched (``y_stretch``; auto: x2 when the road is much wider than tall) and the figure
    says so. At most ``max_transitions`` transitions are drawn, evenly spaced, and the title
    says which.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MultipleLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = select_transitions(scene.batch_size, max_transitions)
    names = list(scene.recon)
    feats = scene.features

    # One vertical extent for every panel of the figure, so rows compare at a glance.
    ego_x = np.asarray(scene.truth_states, dtype=np.float64)[idx, 0, feats.index("x")]
    all_y = [np.asarray(scene.truth_states)[idx, 0, feats.index("y")]]
    road_lo, road_hi = y_extent(road, float(ego_x.min() - window_m), float(ego_x.max() + window_m), np.concatenate(all_y))
    half_h = min(window_m, (road_hi - road_lo) / 2.0)
    square = half_h > 0.35 * window_m
    pairs_per_row = 2 if square else 1
    panel_w = 3.3 if square else 6.4  # inches
    natural_h = panel_w * half_h / window_m  # panel height at equal aspect
    if y_stretch is None:
        y_stretch = 1.0 if natural_h >= MIN_PANEL_H_IN else min(MIN_PANEL_H_IN / natural_h, MAX_Y_STRETCH)
    panel_h = natural_h * y_stretch
    n_rows = int(np.ceil(len(idx) / pairs_per_row))
    # Explicit layout in inches: left margin, panels with a gap, title above and ticks below each row.
    left, right, pair_gap, top, foot_h = 0.62, 0.2, 0.55, 0.85, 0.36
    gap = 0.45 if square else 0.3
    title_h = 0.45 if square else 0.28  # square panels are narrow: the action goes on a second line
    fig_w = left + pairs_per_row * (2 * panel_w + gap) + (pairs_per_row - 1) * pair_gap + right
    row_h = title_h + panel_h + foot_h
    fig_h = top + n_rows * row_h + 0.15
    fig = Figure(figsize=(fig_w, fig_h))  # no pyplot: no global state, Agg canvas
    FigureCanvasAgg(fig)
    axes = np.empty((n_rows, 2 * pairs_per_row), dtype=object)
    for r in range(n_rows):
        y0 = fig_h - top - r * row_h - title_h - panel_h
        for c in range(2 * pairs_per_row):
            pair, col = divmod(c, 2)
            x0 = left + pair * (2 * panel_w + gap + pair_gap) + col * (panel_w + gap)
            axes[r, c] = fig.add_axes((x0 / fig_w, y0 / fig_h, panel_w / fig_w, panel_h / fig_h))
    polys = road_polygons(road)
    # Each panel is drawn with a handful of collections (road, cars, arrows, error lines) rather
    # than one artist per shape: a figure has 16 panels, and matplotlib's cost is per artist.
    # Every panel's limits are set explicitly below, so nothing needs the data limits.
    road_surfaces = [surface for surface, _, _ in polys]
    road_edges = [edge for _, left, right in polys for edge in (left, right)]
    centres = [lane.points for lane in road.lanes]

    def draw_road(ax) -> None:
        ax.add_collection(PolyCollection(road_surfaces, closed=True, facecolors=_hex(ROAD_RGB), edgecolors="none", zorder=0), autolim=False)
        ax.add_collection(LineCollection(road_edges, colors=_hex(EDGE_RGB), linewidths=0.8, zorder=1), autolim=False)
        ax.add_collection(LineCollection(centres, colors=_hex(CENTRE_RGB), linewidths=0.7, linestyles=[(0, (6, 5))], zorder=1), autolim=False)

    def arrows(ax, tails: list, tips: list, colours: list, z: int) -> None:
        """Velocity arrows (tail -> tip, metres), skipping those shorter than 0.3 m."""
        if not tails:
            return
        tails, d = np.asarray(tails), np.asarray(tips) - np.asarray(tails)
        keep = np.hypot(d[:, 0], d[:, 1]) > 0.3
        if keep.any():
            ax.quiver(tails[keep, 0], tails[keep, 1], d[keep, 0], d[keep, 1], color=[c for c, k in zip(colours, keep) if k],
                      angles="xy", scale_units="xy", scale=1.0, units="inches", width=0.9 / 72, headwidth=3.2, headlength=3.4, headaxislength=3.0, zorder=z)

    def draw_truth(ax, t: Poses) -> None:
        corners = car_corners(t.xy, t.heading)
        present = np.flatnonzero(t.present)
        others = [j for j in present if j != 0]
        if others:
            ax.add_collection(PolyCollection([corners[j] for j in others], closed=True, facecolors=_hex(CAR_RGB), edgecolors="none", alpha=0.9, zorder=2), autolim=False)
        if 0 in present:
            ax.add_collection(PolyCollection([corners[0]], closed=True, facecolors=_hex(EGO_RGB), edgecolors="black", linewidths=1.0, alpha=0.9, zorder=3), autolim=False)
        arrows(ax, [t.xy[j] for j in present], [t.xy[j] + t.v[j] * ARROW_S for j in present], ["black"] * len(present), 4)

    def draw_recons(ax, recon: list[tuple[Poses, str]], t: Poses) -> None:
        """Every attack's reconstruction in the panel: outlines (ego thick), error lines, arrows."""
        shapes: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
        errors, error_colours, tails, tips, arrow_colours = [], [], [], [], []
        for p, colour in recon:
            corners = car_corners(p.xy, p.heading)
            for j in np.flatnonzero(p.present):
                shapes[j == 0][0].append(corners[j])
                shapes[j == 0][1].append(colour)
                if t.present[j]:
                    errors.append([t.xy[j], p.xy[j]])
                    error_colours.append(colour)
                tails.append(p.xy[j])
                tips.append(p.xy[j] + p.v[j] * ARROW_S)
                arrow_colours.append(colour)
        if errors:
            ax.add_collection(LineCollection(errors, colors=error_colours, linewidths=0.8, linestyles=":", zorder=4), autolim=False)
        for ego, (polygons, colours) in shapes.items():
            if polygons:
                ax.add_collection(PolyCollection(polygons, closed=True, facecolors="none", edgecolors=colours, linewidths=2.4 if ego else 1.3, zorder=5 + ego), autolim=False)
        arrows(ax, tails, tips, arrow_colours, 7)

    for k, i in enumerate(idx):
        r, c0 = divmod(k, pairs_per_row)
        cx = float(scene.truth_states[i, 0, feats.index("x")])
        cy = camera_y(road_lo, road_hi, float(scene.truth_states[i, 0, feats.index("y")]), half_h)
        for col, (which, truth_arr) in enumerate((("s", scene.truth_states), ("s′", scene.truth_next_states))):
            ax = axes[r, 2 * c0 + col]
            draw_road(ax)
            t = poses(truth_arr[i], feats)
            draw_truth(ax, t)
            draw_recons(ax, [(poses(scene.recon[name][col][i], feats), _hex(attack_rgb(n))) for n, name in enumerate(names)], t)
            ax.set_xlim(cx - window_m, cx + window_m)
            ax.set_ylim(cy + half_h, cy - half_h)  # world y points down, as in highway-env
            ax.tick_params(labelsize=7, length=2, pad=1.5)
            ax.yaxis.set_major_locator(MultipleLocator(5.0 if half_h < 20 else 20.0))
            ax.set_facecolor("white")
            if col == 0:
                acts = scene.action_parts(i)
                act = " · ".join(f"{w} {a}" + ("" if ok is None else (" ✓" if ok else " ✗")) for w, a, ok in acts)
                sep = "\n" if square else "   |   "
                title = f"#{i + 1}  state s" + (f"{sep}action: {act}" if act else "")
            else:
                title = f"#{i + 1}  next state s′"
            ax.set_title(title, fontsize=8, loc="left")
            ax.set_xlabel("x (m)", fontsize=7, labelpad=0)
            if col == 0 and c0 == 0:
                ax.set_ylabel("y (m)", fontsize=8)
    for k in range(len(idx), n_rows * pairs_per_row):  # unused slots in the last row
        r, c0 = divmod(k, pairs_per_row)
        axes[r, 2 * c0].axis("off")
        axes[r, 2 * c0 + 1].axis("off")

    handles = [
        Patch(facecolor=_hex(EGO_RGB), edgecolor="black", label="real ego"),
        Patch(facecolor=_hex(CAR_RGB), label="real vehicle"),
    ]
    handles += [Patch(facecolor="none", edgecolor=_hex(attack_rgb(n)), lw=1.6, label=f"{name} (ego: thick)")
                for n, name in enumerate(names)]
    handles += [Line2D([], [], color="black", lw=0.9, marker=">", markersize=4, label=f"velocity × {ARROW_S:g} s"),
                Line2D([], [], color="grey", lw=0.8, ls=":", label="error (recon → real slot)")]
    stretch_note = f"; y stretched ×{y_stretch:.2g} for readability" if y_stretch != 1 else ""
    fig.suptitle(
        f"{scene.label} — {shown_text(idx, scene.batch_size)}; panels centred on the real ego of s, "
        f"±{window_m:g} m{stretch_note}",
        fontsize=10, x=0.1 / fig_w, ha="left", va="top", y=1 - 0.12 / fig_h,
    )
    fig.legend(handles=handles, loc="upper left", ncol=min(len(handles), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.05 / fig_w, 1 - 0.36 / fig_h))
    fig.savefig(path, dpi=dpi, facecolor="white")
    log.info("wrote batch figure %s (%d transitions)", path, len(idx))
    return path


def plot_by_round(table: pd.DataFrame, path: Path) -> Path:
    """Per attack, the share of egos within 1 m and the median ego error against the attacked
    round (``metrics.leakage.leakage_by_round``'s table), with the share the update does not merge
    (an upper bound on what it determines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (attack, d) in enumerate(table.groupby("attack", sort=False)):
        color = _hex(attack_rgb(i))
        ax1.plot(d["round"], 100 * d["ego_within_1m"], marker="o", color=color, label=attack)
        ax2.plot(d["round"], d["ego_pos_err_m"].clip(lower=1e-6), marker="o", color=color, label=attack)
    first = table.drop_duplicates("round")
    if first["identifiable"].notna().any():
        ax1.plot(first["round"], 100 * first["identifiable"] / first["transitions"], linestyle="--", color="0.4", label="not merged by the update (upper bound)")
    if "determined" in first and first["determined"].notna().any():
        ax1.plot(first["round"], 100 * first["determined"] / first["transitions"], linestyle=":", color="0.2", label="determined by the update (upper bound)")
    ax1.set_ylabel("egos within 1 m (%)")
    ax1.set_ylim(-5, 105)
    ax2.set_ylabel("median ego error (m)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

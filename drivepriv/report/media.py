"""Media shared by every figure and video drivepriv makes (report videos, replays, lidar scenes).

- writers: browser-playable H.264 (:func:`h264_writer`, :func:`write_mp4`) and looping GIF
  thumbnails (:func:`write_gif`), written atomically (:func:`atomic`: a hidden temporary name
  in the output folder, then ``os.replace``), so an interrupted run leaves no half-written file;
- text: DejaVu Sans (:func:`font`) drawn as lines of coloured segments (:func:`draw_text`) or
  as a one-line patch (:func:`text_patch`) pasted into a frame (:func:`paste`);
- composition: titled panels (:class:`Panel`) under a caption, stacked or side by side
  (:func:`compose`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: H.264 that plays in every browser: libx264, yuv420p, baseline profile, +faststart
#: (the index at the front, so playback starts before the download ends; PLATFORM.md §5).
H264 = {
    "format": "FFMPEG",
    "mode": "I",
    "codec": "libx264",
    "pixelformat": "yuv420p",
    "macro_block_size": 2,
    "ffmpeg_params": ["-movflags", "+faststart", "-profile:v", "baseline"],
    "ffmpeg_log_level": "error",
}
#: GIF thumbnails are at most this wide.
GIF_MAX_WIDTH_PX = 360
#: :func:`compose`: caption strip, panel title line and gap between panels (px).
CAPTION_H = 26
TITLE_H = 20
GAP_PX = 4

#: Lines of (text, rgb, bold) segments.
Text = list[list[tuple[str, tuple[int, int, int], bool]]]


# ---------------------------------------------------------------------------------------------
# writers


def h264_writer(path: str | Path, fps: int):
    """An imageio writer of browser-playable H.264 at ``fps`` (append frames, then close)."""
    import imageio.v2 as imageio

    return imageio.get_writer(path, fps=fps, **H264)


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.stem}.{os.getpid()}.tmp{final.suffix}")


def atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary path beside ``final``, then move it into place;
    the temporary file is removed whatever happens."""
    tmp = _tmp_path(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def write_mp4(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    """H.264 (libx264, yuv420p, baseline, +faststart): plays in every browser. Atomic."""
    def write(tmp: Path) -> None:
        writer = h264_writer(tmp, fps)
        try:
            for f in frames:
                writer.append_data(f)
        finally:
            writer.close()

    return atomic(path, write)


def write_gif(frames: list[np.ndarray], path: Path, fps: int, max_width_px: int = GIF_MAX_WIDTH_PX) -> Path:
    """Looping GIF thumbnail, at most ``max_width_px`` wide. Atomic."""
    import imageio.v2 as imageio
    from PIL import Image

    h, w = frames[0].shape[:2]
    scale = min(1.0, max_width_px / w)
    size = (max(2, int(round(w * scale))), max(2, int(round(h * scale))))
    small = [np.asarray(Image.fromarray(f).resize(size, Image.LANCZOS)) if scale < 1 else f for f in frames]
    return atomic(path, lambda tmp: imageio.mimsave(tmp, small, format="GIF", duration=1000.0 / fps, loop=0))


# ---------------------------------------------------------------------------------------------
# text


@lru_cache(maxsize=8)
def font(size: int, bold: bool = False):
    """DejaVu Sans from matplotlib's bundled fonts (Pillow's default font as a fallback)."""
    from PIL import ImageFont

    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)
    except (OSError, ImportError):  # pragma: no cover - matplotlib ships DejaVu
        return ImageFont.load_default()


def draw_text(img: np.ndarray, lines: Text, x: int, y: int, size: int = 13, line_h: int = 20) -> np.ndarray:
    """Draw lines of coloured segments onto a copy of ``img`` at (x, y)."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for k, parts in enumerate(lines):
        xx = x
        for text, rgb, bold in parts:
            d.text((xx, y + k * line_h), text, fill=tuple(rgb), font=font(size, bold))
            xx += font(size, bold).getlength(text)
    return np.asarray(pil)


def text_patch(parts: list[tuple[str, tuple[int, int, int], bool]], size: int, bg=(255, 255, 255), pad: int = 4) -> np.ndarray:
    """Render coloured text segments (text, rgb, bold) on one line into an RGB array."""
    from PIL import Image, ImageDraw

    widths = [font(size, b).getlength(t) for t, _, b in parts]
    img = Image.new("RGB", (int(sum(widths)) + 2 * pad, size + 2 * pad), bg)
    d = ImageDraw.Draw(img)
    x = pad
    for (t, c, b), w in zip(parts, widths):
        d.text((x, pad - 1), t, fill=c, font=font(size, b))
        x += w
    return np.asarray(img)


def paste(dst: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    """Copy ``patch`` into ``dst`` with its top-left corner at (x, y), cropped to ``dst``."""
    h = min(patch.shape[0], dst.shape[0] - y)
    w = min(patch.shape[1], dst.shape[1] - x)
    if h > 0 and w > 0:
        dst[y : y + h, x : x + w] = patch[:h, :w]


# ---------------------------------------------------------------------------------------------
# panel composition


@dataclass
class Panel:
    """One drawn panel and what its title says: name, action (and whether it is the true one), reward, notes."""

    name: str
    rgb: tuple[int, int, int]
    img: np.ndarray
    notes: list[str]
    action: str
    correct: bool | None
    reward: Any

    def title(self, two_lines: bool) -> Text:
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


def compose(caption: Text, panels: list[Panel], layout: str) -> np.ndarray:
    """Caption on top, then the titled panels stacked (``layout="stack"``, one title line each)
    or side by side (``"row"``, two title lines); even width and height."""
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
    frame = draw_text(frame, caption, 6, 4, size=13)
    for (x0, y0), panel in zip(corners, panels):
        frame = draw_text(frame, panel.title(layout != "stack"), x0 + 4, y0 + 2, size=12, line_h=16)
    return frame

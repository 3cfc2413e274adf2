"""Media writers shared by every video drivepriv makes (report videos, replays, lidar scenes)."""

from __future__ import annotations

from pathlib import Path

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


def h264_writer(path: str | Path, fps: int):
    """An imageio writer of browser-playable H.264 at ``fps`` (append frames, then close)."""
    import imageio.v2 as imageio

    return imageio.get_writer(path, fps=fps, **H264)

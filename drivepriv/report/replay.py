"""``drivepriv replay RUN_DIR``: a run's reconstructions drawn by the simulator's own renderer.

For every attacked batch of a finished ``drivepriv eval`` run (``reconstructions.npz`` and
``config.yaml``), :func:`replay_run` writes an H.264 MP4 and a small GIF thumbnail. Each
transition of the batch gives two frames, s then s'; each frame shows the truth panel and
one panel per attack ("truth", "rgia", "dlg", ...), stacked for long thin roads (merge,
highway) and side by side otherwise, under a caption with the transition, its episode and
step, and the true and reconstructed actions and rewards.

Each simulator has its own renderer: highway-env and the gymnasium control tasks in
:mod:`drivepriv.report.replay_render`, MetaDrive in :mod:`drivepriv.report.replay_metadrive`
(what each draws, and its limits, is written there). Frames are composed and written by
:mod:`drivepriv.report.media`, atomically (a hidden temporary name in the output folder, then
``os.replace``): an interrupted replay leaves no half-written MP4 or GIF.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from drivepriv.envs.backends import BACKENDS, backend_of
from drivepriv.errors import ConfigError, did_you_mean
from drivepriv.report.media import Panel, Text, compose, write_gif, write_mp4
from drivepriv.report.plots import attack_rgb, select_transitions
from drivepriv.report.replay_render import ReplayRenderer
from drivepriv.results import BatchRecord, load_batches

log = logging.getLogger(__name__)

#: Frames per second of the MP4: each state (s, then s') is one frame.
DEFAULT_FPS = 2
#: At most this many transitions of a batch are replayed (evenly spaced).
MAX_TRANSITIONS = 16
#: The GIF thumbnail shows at most this many transitions (at most media.GIF_MAX_WIDTH_PX wide).
GIF_MAX_TRANSITIONS = 4
TRUTH_RGB = (30, 30, 30)


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

    renderer = make_renderer(cfg)
    results = []
    try:
        for k in chosen:
            rec = records[k]
            names = [a for a in rec.recon if attacks is None or a in attacks]
            colours = {a: attack_rgb(i) for i, a in enumerate(rec.recon)}
            frames = list(_batch_frames(renderer, rec, names, colours, int(max_transitions)))
            stem = f"b{k}-{rec.stem}"
            mp4 = write_mp4(frames, out_dir / f"{stem}.mp4", int(fps))
            gif = write_gif(frames[: 2 * GIF_MAX_TRANSITIONS], out_dir / f"{stem}.gif", int(fps))
            log.info("replay of batch %d (%s): %s, %s (%d frames)", k, rec.label, mp4, gif, len(frames))
            results.append({"batch": k, "label": rec.label, "mp4": mp4, "gif": gif, "frames": len(frames)})
    finally:
        renderer.close()
    return results


# ---------------------------------------------------------------------------------------------
# frames


def _batch_frames(renderer: ReplayRenderer, rec: BatchRecord, names: list[str], colours: dict[str, tuple[int, int, int]],
                  max_transitions: int) -> Iterator[np.ndarray]:
    """Yield the frames of one batch: per shown transition, s then s'."""
    t = rec.truth
    n = len(t)
    idx = select_transitions(n, max_transitions)
    for i in idx:
        episode, step = (int(v) for v in t.origins[i])
        for which, key in ((0, "states"), (1, "next_states")):
            true_s = np.asarray(getattr(t, key)[i])
            renderer.begin(true_s, rec.client, episode, step + which)
            true_a = renderer.action_text(t.actions[i])
            img, notes = renderer.panel(true_s, True, TRUTH_RGB)
            panels = [Panel("truth", TRUTH_RGB, img, notes, true_a, None, t.rewards[i])]
            for a in names:
                img, notes = renderer.panel(np.asarray(rec.recon[a][key][i]), False, colours[a])
                ra = renderer.action_text(rec.recon[a]["actions"][i])
                panels.append(Panel(a, colours[a], img, notes, ra, ra == true_a, rec.recon[a]["rewards"][i]))
            yield compose(_caption(rec, i, n, which, episode, step + which), panels, renderer.layout)


def _caption(rec: BatchRecord, i: int, n: int, which: int, episode: int, step: int) -> Text:
    """The caption line: batch, transition, which state, and where it came from."""
    grey, dark = (110, 110, 110), (30, 30, 30)
    state = "s  (before the action)" if which == 0 else "s′  (after the action)"
    return [[(rec.label, dark, True), (f"   transition {i + 1} of {n}   ", grey, False), (state, dark, True),
             (f"   episode {episode}, step {step}", grey, False)]]


def make_renderer(cfg: Any) -> ReplayRenderer:
    """The renderer of the run's simulator backend (its ``renderer`` entry point)."""
    backend = backend_of(cfg.env)
    if backend.renderer is None:
        can = [name for name in BACKENDS if BACKENDS.get(name).renderer is not None]
        raise ConfigError(f"env.backend: replay cannot render backend '{backend.name}'; it renders {', '.join(can)}")
    return backend.load("renderer")(cfg)

"""The report's per-batch figure and video, one kind per simulator backend: the entry points that
:class:`drivepriv.envs.backends.Backend` names as ``figures``.

Each is built once per report with ``(run config, codec)`` (what it needs from the public
simulator it reads then, before the batches fan out over workers) and draws one attacked batch
with ``draw(run_dir, record, with_video) -> (figure path | None, video path | None)``, files
named after the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from drivepriv.results import BatchRecord

Drawn = tuple[Path | None, Path | None]


class VectorFigures:
    """Flat observations (control tasks, highway-env's goal observation): the batch's states and
    next states feature by feature; no video."""

    def __init__(self, cfg: Any, codec: Any) -> None:
        self.cfg = cfg
        self.codec = codec

    def draw(self, run_dir: Path, rec: BatchRecord, with_video: bool) -> Drawn:
        if not self.cfg.report.figures:
            return None, None
        from drivepriv.report.vector import draw_vector_figure

        truth, recs = rec.truth, rec.recon
        fig = draw_vector_figure(truth.states, truth.next_states, {n: (r["states"], r["next_states"]) for n, r in recs.items()},
                                 self.codec, run_dir / "figures" / f"{rec.stem}.png", title=rec.label)
        return fig, None


class LidarFigures(VectorFigures):
    """MetaDrive: the lidar scene around the ego of the batch's first state, and a video of the batch."""

    def draw(self, run_dir: Path, rec: BatchRecord, with_video: bool) -> Drawn:
        from drivepriv.report.metadrive import draw_lidar_scene, write_lidar_video

        cfg, codec = self.cfg, self.codec
        truth = rec.truth
        rec_states = {n: r["states"] for n, r in rec.recon.items()}
        fig = vid = None
        if cfg.report.figures:
            import imageio.v3 as iio

            fig = run_dir / "figures" / f"{rec.stem}.png"
            fig.parent.mkdir(parents=True, exist_ok=True)
            iio.imwrite(fig, draw_lidar_scene(truth.states[0], {n: s[0] for n, s in rec_states.items()}, codec, title=rec.label))
        if with_video:
            vid = write_lidar_video(truth.states, rec_states, codec, run_dir / "videos" / f"{rec.stem}.mp4", fps=max(1, cfg.report.fps // 8))
        return fig, vid


class SceneFigures(VectorFigures):
    """highway-env: the traffic scene on the public road (as the attacker reads it), truth beside
    reconstructions, with the action names; the goal observation (parking) as :class:`VectorFigures`."""

    def __init__(self, cfg: Any, codec: Any) -> None:
        super().__init__(cfg, codec)
        from drivepriv.envs import make_env
        from drivepriv.envs.highway import action_names
        from drivepriv.priors.road import RoadGeometry
        from drivepriv.seeding import derive_seed

        env = make_env(cfg.env)
        try:
            env.reset(seed=derive_seed(cfg.seed, "attacker", "road"))
            self.road = RoadGeometry.from_env(env) if codec.has_positions else None
            self.names = action_names(env) if hasattr(env.action_space, "n") else ()
        finally:
            env.close()

    def draw(self, run_dir: Path, rec: BatchRecord, with_video: bool) -> Drawn:
        if self.codec.flat:
            return super().draw(run_dir, rec, with_video)
        from drivepriv.report import SceneBatch, draw_batch_figure, write_replay_video

        cfg, codec = self.cfg, self.codec
        truth, recs = rec.truth, rec.recon
        discrete = np.ndim(truth.actions) == 1
        scene = SceneBatch(
            label=rec.label,
            features=codec.features,
            truth_states=codec.decode_world(truth.states),
            truth_next_states=codec.decode_world(truth.next_states),
            recon={n: (codec.decode_world(r["states"]), codec.decode_world(r["next_states"])) for n, r in recs.items()},
            # continuous actions have no names to caption
            actions=truth.actions if discrete else None,
            recon_actions={n: r["actions"] for n, r in recs.items()} if discrete else {},
            action_names=self.names,
        )
        fig = draw_batch_figure(scene, self.road, run_dir / "figures" / f"{rec.stem}.png") if cfg.report.figures else None
        vid = write_replay_video(scene, self.road, run_dir / "videos" / f"{rec.stem}.mp4", fps=cfg.report.fps) if with_video else None
        return fig, vid


__all__ = ["LidarFigures", "SceneFigures", "VectorFigures"]

"""Report stage: bird's-eye figures, replay videos and the self-contained HTML report.

Comes last in the data flow (DESIGN.md §4): it reads reconstructions, truths and metrics in
physical units and never feeds anything back to the attacks.
"""

from drivepriv.report.html import DEFAULT_METRIC_HELP, ReportContext, render_report, summarise, summary_stats
from drivepriv.report.plots import SceneBatch, draw_batch_figure
from drivepriv.report.video import write_replay_video

__all__ = [
    "DEFAULT_METRIC_HELP",
    "ReportContext",
    "SceneBatch",
    "draw_batch_figure",
    "render_report",
    "summarise",
    "summary_stats",
    "write_replay_video",
]

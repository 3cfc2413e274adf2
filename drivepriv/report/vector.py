"""Figures of an attacked batch of flat observations (control tasks): every feature of every
transition, true beside reconstructed, in physical units."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from drivepriv.envs.vector import VectorCodec
from drivepriv.report.plots import _hex, attack_rgb


def draw_vector_figure(
    truth_states: np.ndarray,
    truth_next_states: np.ndarray,
    recon: dict[str, tuple[np.ndarray, np.ndarray]],
    codec: VectorCodec,
    path: Path,
    title: str = "",
    max_features: int = 8,
) -> Path:
    """One panel per feature (state s and next state s'): the true value of each transition
    (black) and each attack's reconstruction (coloured), matched to the truth's order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feats = list(range(min(codec.obs_dim, max_features)))
    t = codec.to_physical(truth_states.reshape(len(truth_states), -1))
    tn = codec.to_physical(truth_next_states.reshape(len(truth_next_states), -1))
    fig, axes = plt.subplots(2, len(feats), figsize=(2.2 * len(feats) + 1, 4.4), squeeze=False)
    idx = np.arange(len(t))
    for row, (truth, which) in enumerate(((t, 0), (tn, 1))):
        for col, f in enumerate(feats):
            ax = axes[row, col]
            ax.plot(idx, truth[:, f], "o", color="black", ms=6, mfc="none", label="truth")
            for k, (name, pair) in enumerate(recon.items()):
                r = codec.to_physical(pair[which].reshape(len(pair[which]), -1))
                ax.plot(idx, r[:, f], "x", color=_hex(attack_rgb(k)), ms=5, label=name)
            feat = codec.features[f]
            unit = f" ({feat.unit})" if feat.unit else ""
            ax.set_title(("s: " if row == 0 else "s': ") + feat.name + unit, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("transition", fontsize=7)
    axes[0, 0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

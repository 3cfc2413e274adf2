"""The engine's record of the ground truth: the true minibatches behind the attacked updates,
kept where neither the server nor any attack can reach them, for the metrics alone.

Both engines hand each round's :class:`~drivepriv.federation.types.ClientResult` objects to a
:class:`TruthRecorder`, which keeps the truths and passes on the bare updates to the server.
"""

from __future__ import annotations

import numpy as np

from drivepriv.federation.types import TRANSITION_FIELDS, ClientResult, ClientUpdate, GroundTruth


def merge_truths(rnd: int, truths: list[GroundTruth]) -> GroundTruth:
    """Secure aggregation: all clients' minibatches behind the one aggregate the server sees (client -1)."""
    k = truths[0].local_steps
    parts = [t.step(s) for s in range(k) for t in truths]  # local step by local step, in client order
    cat = {f: np.concatenate([getattr(p, f) for p in parts]) for f in (*TRANSITION_FIELDS, "origins")}
    return GroundTruth(rnd, -1, **cat, local_steps=k)


class TruthRecorder:
    """Keeps the truths of the recorded updates, by (round, client); under secure aggregation
    (``aggregate``) one truth per round, every recorded client's minibatches merged (client -1),
    as the server sees one aggregate."""

    def __init__(self, aggregate: bool) -> None:
        self.aggregate = aggregate
        self.truths: dict[tuple[int, int], GroundTruth] = {}

    def record(self, rnd: int, results: list[ClientResult]) -> list[ClientUpdate]:
        """Keep the round's truths; return the updates alone, for the server."""
        results = sorted(results, key=lambda r: r.update.client)
        recorded = [r.truth for r in results if r.truth is not None]
        if recorded and self.aggregate:
            self.truths[(rnd, -1)] = merge_truths(rnd, recorded)
        elif recorded:
            for r in results:
                if r.truth is not None:
                    self.truths[(rnd, r.update.client)] = r.truth
        return [r.update for r in results]


__all__ = ["TruthRecorder", "merge_truths"]

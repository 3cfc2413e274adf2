"""A curious server for any Flower strategy: capture each client's update before aggregation.

:class:`CuriousStrategy` wraps a Flower strategy of the message API
(``flwr.serverapp.strategy.Strategy``: FedAvg, FedProx, FedAdam, Krum, ... or your own). It
sends what the wrapped strategy sends and aggregates what it aggregates, unchanged; on the way
it keeps, for the rounds and clients it is asked to watch, what an honest-but-curious server
holds: the global model it sent, the target network where the messages carry one, and each
client's reply. These become :class:`~drivepriv.federation.types.ServerView` objects, the
input of drivepriv's attacks (:func:`drivepriv.pipeline.attack_and_report`)::

    strategy = CuriousStrategy(FedAvg(), loss=DQNLossSpec(gamma=0.99), payload="weights",
                               lr=0.01, local_steps=1, batch_size=8, rounds=[0, -1])
    strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=20)
    strategy.save("audit/")                        # capture.pt: drivepriv audit audit/ --scenario merge

Rounds are drivepriv's, 0-based: Flower's ``server_round`` 1 is round 0; -1 is the last.
What a client's reply means is the ``payload`` argument:

- ``"weights"``: the client's model after local training (Flower's usual FedAvg apps); the
  update is its difference from the global model, a FedAvg delta of ``local_steps`` SGD steps
  at ``lr``;
- ``"delta"``: that difference itself;
- ``"gradient"``: one gradient (FedSGD).

The attacks model the clients' local training as plain SGD on the loss: a strategy that
changes the clients' objective (FedProx's proximal term, with more than one local step) is
captured faithfully but attacked against the wrong model of the update.

Under secure aggregation (``aggregate_only=True``) the server learns only the mean of the
replies; the capture then holds that mean alone, as client -1 over all clients' minibatches.
Flower imports only here and in :mod:`drivepriv.federation.flower` (the optional extra).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Literal

import torch

from drivepriv.agents.common import LossSpec, at_step
from drivepriv.errors import ConfigError
from drivepriv.federation.flower_support import require_flower
from drivepriv.federation.strategies import strategy_for_payload

require_flower(simulation=False)  # a deployment's server needs Flower, not Ray

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402

from drivepriv.federation.types import ServerView  # noqa: E402

log = logging.getLogger(__name__)

Payload = Literal["weights", "delta", "gradient"]


def tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as named float tensors, in the record's order."""
    return {k: torch.as_tensor(v.numpy()).clone() for k, v in record.items()}


class CuriousStrategy(Strategy):
    """Wraps ``inner`` (any Flower message-API strategy); records what the server sees.

    Parameters
    ----------
    inner: the strategy that really runs the federation; every call is passed on to it.
    loss: the LossSpec the clients train with (``drivepriv.agents.dqn.DQNLossSpec``,
        ``drivepriv.agents.ppo.PPOLossSpec``, ...), which the attacks differentiate: that of
        training step 0 (TD3's delayed actor term then follows the round's steps).
    payload: what a reply's arrays are (module docstring).
    lr, local_steps, batch_size: the clients' local training, as the server configures it.
    rounds, clients: which rounds (0-based, negative from the end) and clients to capture
        (None: all; capturing every update of a long run holds them all in memory).
    client_key: the reply metric that names the client (e.g. a partition id); without it,
        Flower's node id.
    target_key: the record of the outgoing message holding the target network (DQN, TD3);
        absent: the global model is the target.
    arrays_key: the record holding the model in messages and replies (Flower's "arrays").
    aggregate_only: secure aggregation: keep the mean of the replies only.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        loss: LossSpec,
        payload: Payload = "weights",
        lr: float | None = None,
        local_steps: int = 1,
        batch_size: int,
        rounds: Iterable[int] | None = None,
        clients: Iterable[int] | None = None,
        client_key: str | None = "client",
        target_key: str = "target",
        arrays_key: str = "arrays",
        aggregate_only: bool = False,
    ) -> None:
        if payload not in ("weights", "delta", "gradient"):
            raise ConfigError(f"CuriousStrategy: payload must be 'weights', 'delta' or 'gradient', got {payload!r}")
        if payload != "gradient" and (lr is None or lr <= 0):
            raise ConfigError(
                f"CuriousStrategy: payload={payload!r} needs lr, the clients' positive local SGD learning rate "
                f"(the attacks unroll local_steps steps at it), got {lr}"
            )
        if local_steps < 1 or batch_size < 1:
            raise ConfigError(f"CuriousStrategy: local_steps and batch_size must be >= 1, got {local_steps} and {batch_size}")
        if aggregate_only and payload != "gradient" and local_steps > 1:
            raise ConfigError(
                "CuriousStrategy: under secure aggregation the mean of several clients' K-step deltas is not one "
                "client's unrolled training, which the attacks model; capture FedSGD gradients or local_steps=1"
            )
        self.inner = inner
        self.loss = loss
        self.payload = payload
        self.lr = float(lr) if lr is not None else 1.0
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.rounds = None if rounds is None else list(rounds)
        self.clients = None if clients is None else set(clients)
        self.client_key = client_key
        self.target_key = target_key
        self.arrays_key = arrays_key
        self.aggregate_only = aggregate_only
        self.num_rounds: int | None = None
        self.views: list[ServerView] = []
        self._sent: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    # -- what it watches ------------------------------------------------------------------
    def watches(self, rnd: int) -> bool:
        if self.rounds is None:
            return True
        n = self.num_rounds
        return any(r == rnd or (n is not None and -n <= r < 0 and r % n == rnd) for r in self.rounds)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *args, **kwargs):
        """Flower's own loop (``Strategy.start``), calling this wrapper's methods."""
        bad = [r for r in self.rounds or [] if not -num_rounds <= r < num_rounds]
        if bad:
            raise ConfigError(f"CuriousStrategy: rounds {bad} do not exist in a run of {num_rounds} rounds (0..{num_rounds - 1}, or -1..-{num_rounds})")
        self.num_rounds = num_rounds
        result = super().start(grid, initial_arrays, num_rounds, *args, **kwargs)
        watched = self.rounds if self.rounds is not None else range(num_rounds)
        for rnd in sorted({r % num_rounds for r in watched} - {v.round for v in self.views}):
            log.warning("CuriousStrategy: round %d was watched but nothing was captured (no replies carrying '%s'?)", rnd, self.arrays_key)
        return result

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        rnd = server_round - 1
        if self.watches(rnd) and messages:
            content = messages[0].content
            sent = content.array_records.get(self.arrays_key, arrays)
            params = tensors(sent)
            target = tensors(content.array_records[self.target_key]) if self.target_key in content.array_records else params
            self._sent[rnd] = (params, target)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rnd = server_round - 1
        if rnd in self._sent:
            self._capture(rnd, replies)
        return self.inner.aggregate_train(server_round, replies)

    def _client_of(self, msg: Message) -> int:
        if self.client_key:
            for rec in msg.content.metric_records.values():
                if self.client_key in rec:
                    return int(rec[self.client_key])
        return int(msg.metadata.src_node_id)

    def _capture(self, rnd: int, replies: list[Message]) -> None:
        params, target = self._sent.pop(rnd)
        names = list(params)
        got = []
        for msg in replies:
            if msg.has_error() or self.arrays_key not in msg.content.array_records:
                continue
            arrays = tensors(msg.content.array_records[self.arrays_key])
            if list(arrays) != names:
                log.warning("round %d: a reply's arrays are not the global model's (%s); not captured", rnd, ", ".join(list(arrays)[:3]))
                continue
            update = tuple(arrays[k] - params[k] if self.payload == "weights" else arrays[k] for k in names)
            got.append((self._client_of(msg), update))
        got.sort(key=lambda t: t[0])
        shared = strategy_for_payload("delta" if self.payload == "weights" else self.payload)
        strategy, steps = shared.name, shared.unrolled_steps(self.local_steps)
        loss = at_step(self.loss, rnd * steps)  # the round's first training step (TD3's delayed actor)
        if self.aggregate_only:
            if got:
                mean = tuple(torch.stack(ps).mean(0) for ps in zip(*(u for _, u in got)))
                self.views.append(ServerView(rnd, -1, strategy, params, target, mean, len(got) * self.batch_size, steps, self.lr, loss))
            return
        for client, update in got:
            if self.clients is None or client in self.clients:
                self.views.append(ServerView(rnd, client, strategy, params, target, update, self.batch_size, steps, self.lr, loss))

    # -- passed on unchanged --------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("CuriousStrategy around %s: capturing %s of rounds %s", type(self.inner).__name__, self.payload, self.rounds or "all")
        self.inner.summary()

    # -- handing the capture on -----------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the capture (``capture.pt`` and a readable ``capture.json``) for ``drivepriv audit``."""
        return save_capture(folder, self.views)


def save_capture(folder: str | Path, views: list[ServerView]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "capture.pt"
    tmp = path.with_suffix(".pt.part")
    torch.save([v.__dict__ for v in views], tmp)
    tmp.replace(path)
    summary = [{"round": v.round, "client": v.client, "strategy": v.strategy, "batch_size": v.batch_size, "local_steps": v.local_steps,
                "lr": v.lr, "loss": type(v.loss).__name__} for v in views]
    (folder / "capture.json").write_text(json.dumps(summary, indent=2))
    return path


def load_capture(folder: str | Path) -> list[ServerView]:
    """The server views saved by :func:`save_capture` (pickled LossSpecs: load only your own captures)."""
    path = Path(folder) / "capture.pt"
    if not path.is_file():
        raise ConfigError(f"{folder}: no capture.pt here; a CuriousStrategy writes one with strategy.save(folder)")
    try:
        return [ServerView(**d) for d in torch.load(path, weights_only=False)]
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ConfigError(f"{path}: not a readable capture ({type(e).__name__}: {e})") from None


__all__ = ["CuriousStrategy", "load_capture", "save_capture"]

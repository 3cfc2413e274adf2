"""The ways of sharing: FedSGD and FedAvg, one object each, used by both engines, the curious
strategy, the attacks' inputs and the checks.

A strategy says what a client shares (:meth:`Strategy.local_payload`), how the server applies
the mean of what it received (:meth:`Strategy.server_step`), how Flower's messages carry it
(:attr:`Strategy.payload_kind`) and what an attack must unroll to model it
(:meth:`Strategy.unrolled_steps`, :meth:`Strategy.gradient`, :meth:`Strategy.delta`). A new way
of sharing is one new registered class.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor

from drivepriv.errors import ConfigError
from drivepriv.registry import Registry

Payload = tuple[Tensor, ...]
#: ``local_gradient(at, step)``: the gradient at parameters ``at`` on local step ``step``'s minibatch.
LocalGradient = Callable[[dict[str, Tensor], int], Payload]


class Strategy:
    """One way of sharing (see the module docstring)."""

    name: ClassVar[str]
    #: What a Flower reply carries: "gradient" (FedSGD) or "delta" (FedAvg).
    payload_kind: ClassVar[str]

    def local_payload(self, params: dict[str, Tensor], local_steps: int, lr: float, local_gradient: LocalGradient) -> Payload:
        raise NotImplementedError

    def server_step(self, model: torch.nn.Module, opt: torch.optim.Optimizer, mean: list[Tensor]) -> None:
        """Apply the mean of the clients' payloads to the global model."""
        raise NotImplementedError

    def unrolled_steps(self, local_steps: int) -> int:
        """How many local steps one payload holds (what an attack unrolls)."""
        raise NotImplementedError

    def gradient(self, payload: Payload, lr: float) -> Payload:
        """The gradient the payload amounts to: FedSGD's own; under FedAvg -delta/lr, the sum of
        the K local gradients (exactly the gradient for K = 1)."""
        raise NotImplementedError

    def delta(self, payload: Payload) -> Payload | None:
        """The parameter delta an attack matches by unrolling the local steps (None: it matches
        the gradient)."""
        return None

    def describe(self, local_steps: int) -> str:
        return self.name


STRATEGIES: Registry[Strategy] = Registry("federation strategy")


def strategy(name: str) -> Strategy:
    """The registered strategy ``name`` (unknown names fail with a did-you-mean)."""
    return STRATEGIES.get(name)


def strategy_for_payload(kind: str) -> Strategy:
    """The strategy whose Flower replies carry ``kind`` ("gradient" or "delta")."""
    for name in STRATEGIES:
        s = STRATEGIES.get(name)
        if s.payload_kind == kind:
            return s
    raise ConfigError(f"payload {kind!r}: expected one of {', '.join(sorted(STRATEGIES.get(n).payload_kind for n in STRATEGIES))}")


class FedSGD(Strategy):
    """Each client shares the gradient of its loss on one minibatch at the global parameters;
    the server averages and steps its optimizer."""

    name = "fedsgd"
    payload_kind = "gradient"

    def local_payload(self, params: dict[str, Tensor], local_steps: int, lr: float, local_gradient: LocalGradient) -> Payload:
        return tuple(p.detach().clone() for p in local_gradient(params, 0))

    def server_step(self, model: torch.nn.Module, opt: torch.optim.Optimizer, mean: list[Tensor]) -> None:
        opt.zero_grad()
        for p, g in zip(model.parameters(), mean):
            p.grad = g.clone()
        opt.step()

    def unrolled_steps(self, local_steps: int) -> int:
        return 1

    def gradient(self, payload: Payload, lr: float) -> Payload:
        return payload


class FedAvg(Strategy):
    """Each client runs ``local_steps`` plain SGD steps at ``lr``, each on a fresh minibatch, and
    shares its parameter delta (new minus old); the server adds the mean delta."""

    name = "fedavg"
    payload_kind = "delta"

    def local_payload(self, params: dict[str, Tensor], local_steps: int, lr: float, local_gradient: LocalGradient) -> Payload:
        local = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        for step in range(local_steps):
            grads = local_gradient(local, step)
            local = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(local.items(), grads)}
        payload = tuple((local[k] - params[k]).detach() for k in params)
        return tuple(p.detach().clone() for p in payload)

    def server_step(self, model: torch.nn.Module, opt: torch.optim.Optimizer, mean: list[Tensor]) -> None:
        with torch.no_grad():
            for p, d in zip(model.parameters(), mean):
                p.add_(d)

    def unrolled_steps(self, local_steps: int) -> int:
        return local_steps

    def gradient(self, payload: Payload, lr: float) -> Payload:
        return tuple(-d / lr for d in payload)

    def delta(self, payload: Payload) -> Payload | None:
        return payload

    def describe(self, local_steps: int) -> str:
        return f"{self.name} ({local_steps} local steps)"


for _cls in (FedSGD, FedAvg):
    STRATEGIES.register(_cls.name)(_cls())

__all__ = ["STRATEGIES", "FedAvg", "FedSGD", "Strategy", "strategy", "strategy_for_payload"]

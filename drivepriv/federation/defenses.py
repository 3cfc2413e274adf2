"""Defenses a client (or the aggregation protocol) applies before the server sees an update.

One registry, selected with ``--defense NAME[:KEY=VALUE,...]`` (repeatable, applied in the
order given) or ``federation.defenses`` in a scenario YAML. Four kinds, by where they act:

- ``gradient``: inside local training, on per-sample gradients. ``dpsgd`` (Abadi et al., 2016,
  "Deep Learning with Differential Privacy"): each transition's gradient is clipped to L2
  norm ``clip``, the clipped gradients are summed, Gaussian noise N(0, (noise * clip)^2) is
  added and the sum divided by the batch size. The privacy spent is tracked per client with
  Opacus's RDP accountant (one step per local SGD step at sample rate B / replay size) and
  reported as epsilon at ``delta``.
- ``update``: on the shared payload (gradient or parameter delta) before it leaves the
  client. ``noise`` (Gaussian, absolute std), ``clip`` (L2 norm of the whole update),
  ``topk`` (keep the largest ``fraction`` of coordinates; Lin et al., 2018, "Deep Gradient
  Compression"), ``quantize`` (``bits``-bit uniform per tensor, deterministic rounding) and
  ``sign`` (signSGD, Bernstein et al., 2018, scaled by each tensor's mean magnitude).
- ``aggregate``: ``secagg`` (Bonawitz et al., 2017, "Practical Secure Aggregation"): the
  server learns only the sum of the clients' updates; the attack then faces one gradient
  of all clients' minibatches together (N x B transitions).
- ``config``: ``batch`` (a larger local minibatch) and ``local_steps`` (FedAvg with more
  local SGD steps): the update then mixes more transitions.

Every defense has one ``strength`` parameter that ``--sweep NAME`` varies over ``grid``
(weakest first).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from drivepriv.errors import ConfigError, did_you_mean
from drivepriv.registry import Registry

Payload = tuple[Tensor, ...]


@dataclass
class Defense:
    """Base class; subclasses are dataclasses whose fields are their parameters."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kind: ClassVar[str] = "update"  # gradient | update | aggregate | config
    #: The parameter a sweep varies, its default grid (weakest defense first) and its unit/label.
    strength: ClassVar[str] = ""
    grid: ClassVar[tuple[float, ...]] = ()

    def validate(self) -> None:
        """Raise ConfigError on an impossible parameter."""

    def apply(self, payload: Payload, gen: torch.Generator) -> Payload:
        """The update as it leaves the client (``update`` defenses)."""
        return payload

    def configure(self, cfg: Any) -> Any:
        """The run configuration with this defense applied (``config`` defenses)."""
        return cfg

    def describe(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name):g}" for f in dataclasses.fields(self))
        return f"{self.name}({params})" if params else self.name

    def _positive(self, **values: float) -> None:
        for key, v in values.items():
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ConfigError(f"defense {self.name}: {key} must be a positive number, got {v!r}")


DEFENSES: Registry[type[Defense]] = Registry("defense")


@DEFENSES.register("dpsgd")
@dataclass
class DPSGD(Defense):
    """DP-SGD: per-sample clipping to ``clip`` and Gaussian noise of std ``noise * clip`` on the
    clipped sum (noise multiplier ``noise``); epsilon at ``delta`` from Opacus's RDP accountant."""

    name: ClassVar[str] = "dpsgd"
    summary: ClassVar[str] = "DP-SGD: per-sample clipping + Gaussian noise, epsilon from Opacus's RDP accountant"
    kind: ClassVar[str] = "gradient"
    strength: ClassVar[str] = "noise"
    grid: ClassVar[tuple[float, ...]] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    noise: float = 1.0
    clip: float = 1.0
    delta: float = 1e-5

    def validate(self) -> None:
        self._positive(clip=self.clip, delta=self.delta)
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ConfigError(f"defense dpsgd: noise (the noise multiplier) must be >= 0, got {self.noise!r}")
        if self.delta >= 1:
            raise ConfigError(f"defense dpsgd: delta must be < 1, got {self.delta}")

    def privatize(self, per_sample: Sequence[Payload], gen: torch.Generator) -> Payload:
        """Mean of the per-sample gradients after clipping each to ``clip``, plus the noise."""
        b = len(per_sample)
        total = [torch.zeros_like(t) for t in per_sample[0]]
        for grads in per_sample:
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
            scale = min(1.0, self.clip / (float(norm) + 1e-12))
            for acc, g in zip(total, grads):
                acc.add_(g * scale)
        if self.noise > 0:
            total = [t + self.noise * self.clip * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in total]
        return tuple(t / b for t in total)


@DEFENSES.register("noise")
@dataclass
class GaussianNoise(Defense):
    """Gaussian noise of standard deviation ``std`` added to every coordinate of the update."""

    name: ClassVar[str] = "noise"
    summary: ClassVar[str] = "Gaussian noise (absolute std) added to the update"
    strength: ClassVar[str] = "std"
    grid: ClassVar[tuple[float, ...]] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    std: float = 1e-3

    def validate(self) -> None:
        if not (self.std >= 0 and math.isfinite(self.std)):
            raise ConfigError(f"defense noise: std must be >= 0, got {self.std!r}")

    def apply(self, payload: Payload, gen: torch.Generator) -> Payload:
        if self.std == 0:
            return payload
        return tuple(p + self.std * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in payload)


@DEFENSES.register("clip")
@dataclass
class NormClip(Defense):
    """The whole update scaled down to L2 norm at most ``max_norm`` (no noise)."""

    name: ClassVar[str] = "clip"
    summary: ClassVar[str] = "L2 norm clipping of the whole update"
    strength: ClassVar[str] = "max_norm"
    grid: ClassVar[tuple[float, ...]] = (100.0, 10.0, 1.0, 0.1, 0.01)
    max_norm: float = 1.0

    def validate(self) -> None:
        self._positive(max_norm=self.max_norm)

    def apply(self, payload: Payload, gen: torch.Generator) -> Payload:
        norm = float(torch.sqrt(sum((p.double() ** 2).sum() for p in payload)))
        scale = min(1.0, self.max_norm / (norm + 1e-12))
        return tuple(p * scale for p in payload)


@DEFENSES.register("topk")
@dataclass
class TopK(Defense):
    """Top-k sparsification: only the ``fraction`` of coordinates with the largest magnitude
    (over the whole update) are sent; the rest are zero."""

    name: ClassVar[str] = "topk"
    summary: ClassVar[str] = "top-k sparsification (keep the largest fraction of coordinates)"
    strength: ClassVar[str] = "fraction"
    grid: ClassVar[tuple[float, ...]] = (1.0, 0.3, 0.1, 0.03, 0.01)
    fraction: float = 0.1

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"defense topk: fraction must be in (0, 1], got {self.fraction!r}")

    def apply(self, payload: Payload, gen: torch.Generator) -> Payload:
        flat = torch.cat([p.reshape(-1) for p in payload])
        k = max(1, int(round(self.fraction * flat.numel())))
        if k >= flat.numel():
            return payload
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().topk(k).indices] = True
        out, i = [], 0
        for p in payload:
            n = p.numel()
            out.append(torch.where(keep[i : i + n].reshape(p.shape), p, torch.zeros_like(p)))
            i += n
        return tuple(out)


@DEFENSES.register("quantize")
@dataclass
class Quantize(Defense):
    """Uniform ``bits``-bit quantization of each tensor over its own [min, max] (round to nearest)."""

    name: ClassVar[str] = "quantize"
    summary: ClassVar[str] = "uniform b-bit quantization per tensor (8-bit by default)"
    strength: ClassVar[str] = "bits"
    grid: ClassVar[tuple[float, ...]] = (16, 8, 4, 2)
    bits: int = 8

    def validate(self) -> None:
        if int(self.bits) != self.bits or not 2 <= self.bits <= 24:
            raise ConfigError(f"defense quantize: bits must be an integer in [2, 24] (1 bit is the 'sign' defense), got {self.bits!r}")

    def apply(self, payload: Payload, gen: torch.Generator) -> Payload:
        levels = 2 ** int(self.bits) - 1
        out = []
        for p in payload:
            lo, hi = p.min(), p.max()
            step = (hi - lo) / levels
            out.append(p.clone() if float(step) == 0 else lo + torch.round((p - lo) / step) * step)
        return tuple(out)


@DEFENSES.register("sign")
@dataclass
class Sign(Defense):
    """1-bit quantization (signSGD): each coordinate's sign times its tensor's mean magnitude."""

    name: ClassVar[str] = "sign"
    summary: ClassVar[str] = "sign quantization (1 bit per coordinate, scaled per tensor)"

    def apply(self, payload: Payload, gen: torch.Generator) -> Payload:
        return tuple(torch.sign(p) * p.abs().mean() for p in payload)


@DEFENSES.register("secagg")
@dataclass
class SecureAggregation(Defense):
    """Secure aggregation: the server sees only the sum of the clients' updates of a round."""

    name: ClassVar[str] = "secagg"
    summary: ClassVar[str] = "secure aggregation: the server sees only the sum of the clients' updates"
    kind: ClassVar[str] = "aggregate"


@DEFENSES.register("batch")
@dataclass
class LargerBatch(Defense):
    """A larger local minibatch: each shared gradient averages ``size`` transitions."""

    name: ClassVar[str] = "batch"
    summary: ClassVar[str] = "larger local minibatches (federation.batch_size)"
    kind: ClassVar[str] = "config"
    strength: ClassVar[str] = "size"
    grid: ClassVar[tuple[float, ...]] = (8, 16, 32, 64)
    size: int = 32

    def validate(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise ConfigError(f"defense batch: size must be an integer >= 1, got {self.size!r}")

    def configure(self, cfg: Any) -> Any:
        cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, batch_size=int(self.size)))
        fed = cfg.federation
        if fed.warmup_steps + fed.env_steps_per_round < fed.batch_size:
            cfg = dataclasses.replace(cfg, federation=dataclasses.replace(fed, warmup_steps=fed.batch_size))
        return cfg


@DEFENSES.register("local_steps")
@dataclass
class MoreLocalSteps(Defense):
    """FedAvg with ``steps`` local SGD steps: the shared delta mixes steps x B transitions."""

    name: ClassVar[str] = "local_steps"
    summary: ClassVar[str] = "more local steps (FedAvg with K local SGD steps)"
    kind: ClassVar[str] = "config"
    strength: ClassVar[str] = "steps"
    grid: ClassVar[tuple[float, ...]] = (1, 2, 4, 8)
    steps: int = 4

    def validate(self) -> None:
        if int(self.steps) != self.steps or self.steps < 1:
            raise ConfigError(f"defense local_steps: steps must be an integer >= 1, got {self.steps!r}")

    def configure(self, cfg: Any) -> Any:
        return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, strategy="fedavg", local_steps=int(self.steps)))


def make_defense(spec: dict[str, Any] | str) -> Defense:
    """A defense from ``{"name": ..., param: value}`` or ``"name:param=value,..."``; unknown
    names and parameters fail with a did-you-mean."""
    if isinstance(spec, str):
        spec = parse_defense(spec)
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"defense {spec!r}: missing its name (e.g. {{name: dpsgd, noise: 1.0}} or --defense dpsgd:noise=1.0)")
    cls = DEFENSES.get(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in spec.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ConfigError(f"defense {name}: unknown parameter '{key}'.{did_you_mean(key, fields)} Its parameters: {known}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"defense {name}: {key} must be a number, got {value!r}")
        kwargs[key] = value
    d = cls(**kwargs)
    d.validate()
    return d


def parse_defense(text: str) -> dict[str, Any]:
    """``"dpsgd:noise=1.0,clip=0.5"`` -> ``{"name": "dpsgd", "noise": 1.0, "clip": 0.5}``."""
    name, _, rest = text.strip().partition(":")
    out: dict[str, Any] = {"name": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"--defense {text}: expected NAME:KEY=VALUE,... (e.g. dpsgd:noise=1.0,clip=1.0), got '{part}'")
        try:
            out[key.strip()] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise ConfigError(f"--defense {text}: {key.strip()} must be a number, got '{value}'") from None
    return out


@dataclass
class DefenseStack:
    """The configured defenses, split by where they act."""

    defenses: list[Defense]

    @classmethod
    def from_specs(cls, specs: Sequence[dict[str, Any] | str]) -> "DefenseStack":
        stack = cls([make_defense(s) for s in specs])
        names = [d.name for d in stack.defenses]
        for n in set(names):
            if names.count(n) > 1 and n in ("dpsgd", "secagg", "batch", "local_steps"):
                raise ConfigError(f"defense {n} is given {names.count(n)} times; give it once")
        return stack

    @property
    def dpsgd(self) -> DPSGD | None:
        return next((d for d in self.defenses if isinstance(d, DPSGD)), None)

    @property
    def secagg(self) -> bool:
        return any(d.kind == "aggregate" for d in self.defenses)

    def configure(self, cfg: Any) -> Any:
        for d in self.defenses:
            cfg = d.configure(cfg)
        return cfg

    def apply(self, payload: Payload, gen: torch.Generator) -> Payload:
        for d in self.defenses:
            if d.kind == "update":
                payload = d.apply(payload, gen)
        return payload

    def describe(self) -> str:
        return " + ".join(d.describe() for d in self.defenses) or "none"


class PrivacyAccountant:
    """Epsilon spent by each DP-SGD client, from Opacus's RDP accountant.

    Every local SGD step is one subsampled Gaussian mechanism with noise multiplier ``noise``
    and sample rate B / (transitions in the client's buffer) at that step: the standard
    Poisson-subsampling analysis that Opacus applies to minibatch training (our clients draw
    fixed-size minibatches without replacement, as Opacus's own data loaders approximate)."""

    def __init__(self, dp: DPSGD, clients: int) -> None:
        try:
            from opacus.accountants import RDPAccountant
        except ImportError as e:  # pragma: no cover - opacus is a core dependency
            raise ConfigError("DP-SGD's accountant needs Opacus: pip install opacus") from e
        self.dp = dp
        self.accountants = [RDPAccountant() for _ in range(clients)]

    def step(self, client: int, sample_rate: float) -> None:
        if self.dp.noise > 0:
            self.accountants[client].step(noise_multiplier=self.dp.noise, sample_rate=min(1.0, sample_rate))

    #: RDP orders searched for the tightest epsilon: Opacus's defaults, extended at both ends so
    #: that very small and very large noise multipliers still find their optimum inside.
    ALPHAS = [1 + x / 100 for x in range(1, 10)] + [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [64, 96, 128, 256, 512, 1024, 4096]

    def epsilon(self) -> float:
        """The largest epsilon over clients (inf without noise)."""
        if self.dp.noise == 0:
            return math.inf
        import warnings

        with warnings.catch_warnings():  # "optimal order is the largest/smallest alpha": the bound stays valid
            warnings.simplefilter("ignore", UserWarning)
            return max(a.get_epsilon(delta=self.dp.delta, alphas=self.ALPHAS) for a in self.accountants)


__all__ = ["DEFENSES", "DPSGD", "Defense", "DefenseStack", "PrivacyAccountant", "make_defense", "parse_defense"]

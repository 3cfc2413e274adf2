"""Attacks: the engine, regularizers and catalogue. Attacks know nothing of metrics or ground truth."""

from drivepriv.attacks import regularizers  # noqa: F401  (registers the regularizers)
from drivepriv.attacks.base import ATTACKS, Attack, AttackInput, Priors, Reconstruction
from drivepriv.attacks.catalogue import make_attack

__all__ = ["ATTACKS", "Attack", "AttackInput", "Priors", "Reconstruction", "make_attack"]

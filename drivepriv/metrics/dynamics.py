"""Dynamics residual: step the real simulator from a (reconstructed) state and compare.

The steppers are the simulators' own and live with their backends (:mod:`drivepriv.envs.backends`
gives each backend's); highway-env's is re-exported here for existing imports.
"""

from drivepriv.envs.highway_stepper import SimulatorStepper

__all__ = ["SimulatorStepper"]

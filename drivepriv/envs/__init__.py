"""Simulator backends, observation codecs and truth recording. Knows nothing of federation or attacks."""

from drivepriv.envs.codec import ObservationCodec
from drivepriv.envs.highway import make_env, make_codec

__all__ = ["ObservationCodec", "make_env", "make_codec"]

"""The Backend registry (DESIGN.md section 5): one Backend per simulator, registered once in envs/,
and no backend or codec-kind name comparison outside envs/."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

import drivepriv
from drivepriv.config import EnvConfig
from drivepriv.envs import BACKENDS, backend_of, make_codec
from drivepriv.errors import ConfigError

PACKAGE = Path(drivepriv.__file__).parent


def test_every_configurable_backend_is_registered_with_loadable_parts():
    allowed = set(typing.get_args(typing.get_type_hints(EnvConfig)["backend"]))
    assert set(BACKENDS.names()) == allowed
    for name in BACKENDS:
        backend = BACKENDS.get(name)
        assert backend.name == name
        for part in ("priors", "figures", "renderer"):
            assert callable(backend.load(part)), (name, part)


def test_unknown_backend_fails_with_a_did_you_mean():
    cfg = dataclasses.replace(EnvConfig(), backend="hihgway")
    with pytest.raises(ConfigError, match="Did you mean 'highway'"):
        backend_of(cfg)


def test_codecs_say_what_they_are():
    kin = make_codec(EnvConfig(backend="highway", id="merge-v0"))
    flat = make_codec(EnvConfig(backend="control", id="CartPole-v1"))
    assert (kin.has_positions, kin.flat, kin.distance_suffix) == (True, False, "_m")
    assert (flat.has_positions, flat.flat, flat.distance_suffix) == (False, True, "")


def test_no_backend_or_codec_kind_name_comparison_outside_envs():
    pattern = re.compile(r"(\bbackend\b|codec\.kind|\.backend)\s*[!=]=|[!=]=\s*[\w.]*(\bbackend\b|codec\.kind)")
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "envs":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "compare through the Backend registry (drivepriv.envs.backends) instead:\n" + "\n".join(found)

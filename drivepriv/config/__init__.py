"""Run configuration: typed dataclasses, strict YAML loading and ``--set key=value`` overrides.

A scenario YAML is a thin override of the defaults below. Loading is strict: an unknown key
fails with a "did you mean", a wrong type or an impossible value names the file, the key and
what was expected. Nested sections are merged key by key (never replaced wholesale), so no
nested key is silently dropped.
"""

from __future__ import annotations

from drivepriv.config.loading import apply_overrides, config_from_dict, dump_yaml, load_yaml, parse_override
from drivepriv.config.schema import (
    KNOWN_FEATURES,
    AgentConfig,
    AttackConfig,
    DynamicsPriorConfig,
    EnvConfig,
    FederationConfig,
    ObservationConfig,
    ReportConfig,
    RunConfig,
)

__all__ = [
    "KNOWN_FEATURES", "AgentConfig", "AttackConfig", "DynamicsPriorConfig", "EnvConfig", "FederationConfig",
    "ObservationConfig", "ReportConfig", "RunConfig", "apply_overrides", "config_from_dict", "dump_yaml", "load_yaml",
    "parse_override",
]

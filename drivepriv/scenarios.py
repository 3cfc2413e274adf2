"""The scenario catalogue: YAML files in the repository's scenarios/ folder, or a path to one."""

from __future__ import annotations

from pathlib import Path

from drivepriv.config import RunConfig, config_from_dict, load_yaml
from drivepriv.errors import ConfigError, did_you_mean

#: Where the scenario catalogue lives (the repository's scenarios/ folder).
SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"


def scenario_catalogue() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.yaml"))}


def resolve_scenario(spec: str) -> tuple[Path, str]:
    """A scenario name from the catalogue, or a path to a YAML file of the same schema."""
    catalogue = scenario_catalogue()
    if spec in catalogue:
        return catalogue[spec], spec
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or "/" in spec:
        if not path.is_file():
            raise ConfigError(f"scenario file {spec} does not exist")
        return path, path.stem
    raise ConfigError(
        f"unknown scenario '{spec}'.{did_you_mean(spec, catalogue)} Known scenarios: {', '.join(catalogue)} "
        "(or give a path to a scenario YAML file)."
    )


def load_scenario(spec: str) -> RunConfig:
    """The validated configuration of a scenario name or YAML path."""
    path, stem = resolve_scenario(spec)
    data = load_yaml(path)
    data.setdefault("name", stem)
    return config_from_dict(data, source=str(path))

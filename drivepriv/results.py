"""A run's saved results: every attacked batch's true transitions and each attack's matched
reconstruction, in one ``reconstructions.npz`` beside metrics.csv.

The file lets ``drivepriv report RUN_DIR`` rebuild the report and ``drivepriv replay RUN_DIR``
render the batches again without re-running anything. It is written by the evaluation (which
holds the ground truth for its metrics), never read by an attack.

Layout of the npz (observations as the agent saw them, normalised; reconstructions already
permuted so row i is matched to true transition i):

    batches                      (n, 2) int: client, round of each attacked batch, in order
    b{k}/truth/{states,actions,rewards,next_states,dones}
    b{k}/origins                 (B, 2) int: episode and step of each true transition
    b{k}/local_steps             int: the local steps behind the update (older runs: absent, 1)
    b{k}/recon/{attack}/{states,actions,rewards,next_states}
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from drivepriv.config import RunConfig
from drivepriv.errors import ConfigError
from drivepriv.federation.types import TRANSITION_FIELDS, GroundTruth

FILENAME = "reconstructions.npz"
FIELDS = ("states", "actions", "rewards", "next_states")


@dataclass
class BatchRecord:
    """One attacked update: the client's true transitions and every attack's matched reconstruction."""

    truth: GroundTruth
    #: attack -> states, actions, rewards, next_states (row i matched to true transition i)
    recon: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def client(self) -> int:
        return self.truth.client

    @property
    def round(self) -> int:
        return self.truth.round

    @property
    def stem(self) -> str:
        """File-name stem of the batch's media (``c{client}-r{round}``; ``secagg-r{round}``
        for the sum of all clients' updates under secure aggregation, client -1)."""
        return f"c{self.client}-r{self.round}" if self.client >= 0 else f"secagg-r{self.round}"

    @property
    def label(self) -> str:
        if self.client < 0:
            return f"all clients (secure aggregation) · round {self.round}"
        return f"client {self.client} · round {self.round}"


def save_batches(run_dir: Path, records: list[BatchRecord]) -> Path:
    """Write ``run_dir/reconstructions.npz`` (atomically: a temporary file, then renamed)."""
    arrays: dict[str, np.ndarray] = {"batches": np.array([[r.client, r.round] for r in records], dtype=np.int64).reshape(-1, 2)}
    for k, r in enumerate(records):
        for name, a in r.truth.arrays().items():
            arrays[f"b{k}/truth/{name}"] = np.asarray(a)
        arrays[f"b{k}/origins"] = np.asarray(r.truth.origins, dtype=np.int64)
        arrays[f"b{k}/local_steps"] = np.array(r.truth.local_steps)
        for attack, rec in r.recon.items():
            for name in FIELDS:
                arrays[f"b{k}/recon/{attack}/{name}"] = np.asarray(rec[name])
    path = Path(run_dir) / FILENAME
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
    return path


def load_batches(run_dir: Path) -> list[BatchRecord]:
    """Read the batches saved by :func:`save_batches`; a clear error if the file is missing or damaged."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no {FILENAME}: it is not a drivepriv run folder, or the run was made by an older "
            "drivepriv or did not finish; run `drivepriv eval` again"
        )
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); run `drivepriv eval` again") from None
    records = []
    for k, (client, rnd) in enumerate(data.get("batches", np.zeros((0, 2), dtype=np.int64))):
        prefix = f"b{k}/"
        missing = [key for key in (*(f"{prefix}truth/{name}" for name in TRANSITION_FIELDS), prefix + "origins") if key not in data]
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(missing)}: it was not written whole; run `drivepriv eval` again")
        arrays = {name: data[f"{prefix}truth/{name}"] for name in TRANSITION_FIELDS}
        steps = int(data.get(prefix + "local_steps", 1))
        truth = GroundTruth(int(rnd), int(client), **arrays, origins=data[prefix + "origins"], local_steps=steps)
        recon: dict[str, dict[str, np.ndarray]] = {}
        for key, v in data.items():
            if key.startswith(prefix + "recon/"):
                _, _, attack, name = key.split("/", 3)
                recon.setdefault(attack, {})[name] = v
        records.append(BatchRecord(truth, recon))
    return records


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved configuration a run wrote; a clear error when the folder is not a run."""
    from drivepriv.scenarios import load_scenario  # the scenarios' YAML loader (it reads the run's own file)

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder; give the folder of a run (e.g. reports/merge/merge-seed0-<time>)")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: it is not a drivepriv run folder (or the run did not finish)")
    return load_scenario(str(path))


def read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(f"{path.parent} has no {path.name}: the run did not finish; run `drivepriv eval` again")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); run `drivepriv eval` again") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); run `drivepriv eval` again") from None

"""One root seed, split by stable ids (client, round, restart...) so every stream is reproducible."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(root: int, *ids: object) -> int:
    """A 31-bit seed that depends only on the root seed and the ids, e.g. ``derive_seed(0, "client", 3)``."""
    key = "/".join([str(root), *map(str, ids)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def torch_generator(root: int, *ids: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(root, *ids))
    return g


def numpy_rng(root: int, *ids: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(root, *ids))


def reproducible_torch() -> None:
    """torch as every drivepriv process runs it (the CLI, a run, each worker and Ray task).

    One intra-op thread: the networks are small, so a second thread buys almost nothing (on a
    shared 2-core machine thread contention made torch many times slower), and with two the
    reductions split differently between runs (rgia-k's choice among float-identical
    candidates moved its error by 1e-5 m). oneDNN off: its float32 kernels rounded differently
    from run to run (rgia-k's states moved by 1e-5 m); the plain CPU kernels do not."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False


def seed_everything(seed: int) -> None:
    """Seed the global generators (for libraries that use them); our own code uses derived streams."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)

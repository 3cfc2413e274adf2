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


def seed_everything(seed: int) -> None:
    """Seed the global generators (for libraries that use them); our own code uses derived streams."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)

"""The first-layer completion's bookkeeping of candidate terms: one term per direction
(``one_per_direction``, which screens in float32 and decides in float64) against the plain
row-by-row rule it implements, and ``Terms.put`` (amortised appends) against concatenation."""

from __future__ import annotations

import torch

from drivepriv.attacks.base import one_per_direction
from drivepriv.attacks.completion import Terms


def row_by_row(u: torch.Tensor, same: float) -> tuple[list[int], list[int]]:
    """The rule itself: each row joins the kept row it is most parallel to (|cos| >= same)."""
    cand: list[int] = []
    hits: list[int] = []
    for i in range(len(u)):
        if cand:
            c = (u[cand] @ u[i]).abs()
            j = int(c.argmax())
            if float(c[j]) >= same:
                hits[j] += 1
                continue
        cand.append(i)
        hits.append(1)
    return cand, hits


def directions(seed: int, n: int = 600, d: int = 48) -> torch.Tensor:
    """Unit rows: repeats of 150 directions with either sign, a third of them moved by about
    7e-8 (they join), a sixth by about 3e-3 (|cos| about 1 - 4e-6: inside the float32 screen's
    margin below a threshold of 1 - 1e-6, so decided in float64, and kept apart)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(150, d, generator=g, dtype=torch.float64)
    u = base[torch.randint(150, (n,), generator=g)]
    u = u / u.norm(dim=1, keepdim=True)
    pick = torch.rand(n, generator=g)
    step = torch.where(pick < 1 / 3, 1e-8, torch.where(pick < 1 / 2, 4e-4, 0.0)).double()
    u = u + step[:, None] * torch.randn(n, d, generator=g, dtype=torch.float64)
    u = u * torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0).double()
    return u / u.norm(dim=1, keepdim=True)


def test_one_per_direction_keeps_and_counts_as_the_row_by_row_rule() -> None:
    for seed in range(3):
        u = directions(seed)
        want = row_by_row(u, 1.0 - 1e-6)
        cand, hits, _ = one_per_direction(u, 1.0 - 1e-6, block=64)  # several blocks
        assert (cand, hits) == want
        assert 150 < len(cand) < len(u)  # some joined, the moved-by-3e-3 ones did not
        assert sum(hits) == len(u)


def test_one_per_direction_resumes_where_it_stood() -> None:
    """Merging the first rows, then resuming from the state at a mark with more rows, gives
    what one pass gives (the first-layer completion merges a pool that grows round by round)."""
    u = directions(1)
    want = one_per_direction(u, 1.0 - 1e-6, block=64)[:2]
    _, _, state = one_per_direction(u[:400], 1.0 - 1e-6, block=64, mark=250)
    assert state is not None and state.rows == 250
    assert one_per_direction(u, 1.0 - 1e-6, block=64, state=state)[:2] == want


def test_terms_put_appends_as_concatenation_does() -> None:
    g = torch.Generator().manual_seed(0)

    def some(n: int) -> Terms:
        return Terms(torch.randn(n, 5, generator=g), [torch.rand(n, 5, generator=g), torch.rand(n, 3, generator=g)], torch.randn(n, 2, generator=g))

    terms, parts = some(3), []
    grown, size = terms, len(terms)
    for k in range(9):
        part = some(1 + k % 2)
        parts.append(part)
        grown = grown.put(size, part)
        size += len(part)
    want = Terms.cat([terms, *parts])
    assert len(grown) >= size
    got = grown.take(torch.arange(size))
    assert torch.equal(got.u, want.u) and torch.equal(got.g, want.g)
    assert all(torch.equal(a, b) for a, b in zip(got.masks, want.masks))

"""How many coordinators a federation of M clouds needs, and how many faults it survives."""

from __future__ import annotations


def faults_tolerated(clouds: int) -> int:
    """f = ⌊(M − 1) / 3⌋ Byzantine coordinators (0 for M ≤ 3)."""
    if clouds < 1:
        raise ValueError(f"a federation has at least one cloud, not {clouds}")
    return (clouds - 1) // 3


def quorum_size(clouds: int) -> int:
    """q = ⌈(M + f + 1) / 2⌉: any two quorums share at least f + 1 coordinators."""
    f = faults_tolerated(clouds)
    return (clouds + f + 2) // 2


def tolerance_text(clouds: int) -> str:
    """One line for CLI output and logs, e.g. ``4 clouds: quorum 3, tolerates 1 faulty``."""
    f = faults_tolerated(clouds)
    q = quorum_size(clouds)
    plural = "cloud" if clouds == 1 else "clouds"
    what = "no faulty coordinator" if f == 0 else f"{f} faulty (Byzantine or crashed)"
    return f"{clouds} {plural}: quorum {q}, tolerates {what}"

"""One output form for every bench: rows of the README's speed table on stdout (what, rustko,
the reference measured in the same run, ratio and goal), everything else on stderr, so that
`./dev bench` prints the table as the README shows it."""

from __future__ import annotations

import sys

HEADER = "| what | rustko | reference | ratio (goal) |\n| --- | --- | --- | --- |"


def row(what: str, ours: float, ref: float, goal: float | None, ref_label: str = "") -> None:
    """One table row; `goal`: the ratio at most wanted (None: shown for information)."""
    ratio = ours / ref
    verdict = "" if goal is None else f" (<= {goal:g}x{'' if ratio <= goal else ', ABOVE GOAL'})"
    reference = f"{ref:.3g} s" + (f" {ref_label}" if ref_label else "")
    print(f"| {what} | {ours:.3g} s | {reference} | {ratio:.2f}x{verdict} |", flush=True)


def note(text: str) -> None:
    """What a row needs said (machine, kernel, runs), kept out of the table."""
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    print(HEADER)

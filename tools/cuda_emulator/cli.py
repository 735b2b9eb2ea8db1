"""The command line every checker shares: pick cases, build the driver, run, report."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tools.cuda_emulator import build as emu


@dataclass(frozen=True)
class Check:
    """One comparison: passes when ``error <= tol``. The reference comparisons give
    ``fastkd.testing.error_ratio`` (the error over what the judgement allows) with tol 1; the
    exact checks (split count, NaN, identical inputs) give 0 or 1 with tol 0."""

    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tol

    def __str__(self) -> str:
        return f"{self.name}={self.error:.1e}" + ("" if self.ok else f" (> {self.tol:.0e})")


def report(case, checks: Sequence[Check], out) -> str:
    """One line per case: ok/BAD, the case, every comparison, the driver's split count."""
    ok = all(c.ok for c in checks)
    return (
        f"{'ok ' if ok else 'BAD'} {case.id} "
        + " ".join(map(str, checks))
        + (f" splits={out.splits} launches={out.launches}")
    )


def main_for(
    description: str,
    op: str,
    cases: Sequence,
    run: Callable,
    verdicts: Callable,
    argv: Sequence[str] | None = None,
) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sanitize", choices=sorted(emu.SANITIZERS), default="address")
    parser.add_argument("--quick", action="store_true", help="the quick subset (what CI runs)")
    parser.add_argument("--cases", help="comma-separated case ids or indices into CASES")
    args = parser.parse_args(argv)
    picked = [c for c in cases if c.quick] if args.quick else list(cases)
    if args.cases:
        by_id = {c.id: c for c in cases}
        picked = [by_id[k] if k in by_id else cases[int(k)] for k in args.cases.split(",")]
    exe = emu.build(op, args.sanitize)
    failed = 0
    for case in picked:
        try:
            out = run(exe, case)
        except RuntimeError as err:
            print(f"FAILED {case.id}: {err}", flush=True)
            failed += 1
            continue
        checks = verdicts(case, out)
        failed += not all(c.ok for c in checks)
        print(report(case, checks, out), flush=True)
    print("all cases match the reference" if not failed else f"{failed} case(s) MISMATCH")
    return 1 if failed else 0

"""The doctor's report: one line per check, PASS / FAIL / SKIP with the reason.

A check is a plain function returning ``Check`` (or a list of them); ``run_check``
turns an unexpected exception into a FAIL line carrying its message, so one broken
part never hides the others.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, field

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
PARTS = ("environment", "correctness", "speed")


@dataclass
class Check:
    name: str
    status: str  # PASS / FAIL / SKIP
    detail: str  # the reason or the measured value, one line
    data: dict = field(default_factory=dict)  # numbers for --json
    seconds: float = 0.0


def skip(name: str, why: str, **data) -> Check:
    return Check(name, SKIP, why, data)


def run_check(name: str, fn, *args, **kwargs) -> list[Check]:
    """Call ``fn``; its Check(s) come back timed, an exception becomes one FAIL."""
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
        checks = out if isinstance(out, list) else [out]
    except Exception as e:  # the doctor reports, it does not crash
        last = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
        checks = [Check(name, FAIL, f"{type(e).__name__}: {' '.join(str(e).split())[:300]} ({where})")]
    dt = time.perf_counter() - t0
    for c in checks:
        c.seconds = round(dt / len(checks), 3)
    return checks


@dataclass
class Report:
    meta: dict = field(default_factory=dict)
    parts: dict = field(default_factory=lambda: {p: [] for p in PARTS})

    def add(self, part: str, checks: list[Check]) -> None:
        self.parts[part].extend(checks)

    def counts(self) -> dict:
        all_ = [c.status for checks in self.parts.values() for c in checks]
        return {s: all_.count(s) for s in (PASS, FAIL, SKIP)}

    def exit_code(self) -> int:
        return 1 if self.counts()[FAIL] else 0

    def to_json(self) -> str:
        return json.dumps({**self.meta, "parts": {p: [asdict(c) for c in cs] for p, cs in self.parts.items()},
                           "summary": self.counts(), "exit_code": self.exit_code()})

    def to_text(self) -> str:
        lines = [f"bt-fast doctor  {self.meta.get('host_line', '')}".rstrip()]
        for part, checks in self.parts.items():
            lines.append(f"\n{part.capitalize()}")
            for c in checks:
                lines.append(f"  {c.status}  {c.name:<28} {c.detail}")
        n = self.counts()
        lines.append(f"\n{n[PASS]} pass, {n[FAIL]} fail, {n[SKIP]} skip "
                     f"({self.meta.get('seconds', 0):.0f} s)")
        return "\n".join(lines)

"""The rows of the benchmark table and their Markdown/JSON forms."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

#: ``target(pass, size)``: the largest bn1d/peer ratio the issue accepts, or None.
Target = Callable[[str, str], "float | None"]

#: Bytes a pass must move at least, in units of the input's size: a forward or an
#: inference call reads x and writes y; forward+backward also reads x again, reads
#: dy and writes dx. "Effective GB/s" is that traffic over the median time.
TRAFFIC = {"train fwd": 2, "train fwd+bwd": 5, "inference": 2}
PASSES = tuple(TRAFFIC)


@dataclass
class Row:
    """One side-by-side measurement: bn1d against ``peer`` (medians, seconds)."""

    backend: str
    shape: tuple[int, ...]
    pass_: str
    variant: str
    peer: str
    bn1d_s: float
    peer_s: float
    input_bytes: int
    copy_s: float | None = None
    bn1d_peak: float | None = None  # bytes
    peer_peak: float | None = None
    memory: str = ""  # what the peaks measure
    target: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.bn1d_s / self.peer_s

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target

    def gbps(self, seconds: float | None) -> float | None:
        if seconds is None or self.pass_ not in TRAFFIC:
            return None
        return TRAFFIC[self.pass_] * self.input_bytes / seconds / 1e9

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pass"] = data.pop("pass_")
        data.update(
            ratio=self.ratio,
            met=self.met,
            bn1d_gbps=self.gbps(self.bn1d_s),
            peer_gbps=self.gbps(self.peer_s),
            copy_gbps=None if self.copy_s is None else 2 * self.input_bytes / self.copy_s / 1e9,
        )
        return data


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1e3:.3f}" if seconds < 1e-2 else f"{seconds * 1e3:.2f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _peak(row: Row, peak: float | None) -> str:
    return "" if peak is None else f"{peak / row.input_bytes:.2f}"


def _target(row: Row) -> str:
    if row.target is None:
        return ""
    return f"<= {row.target:g} {'yes' if row.met else 'NO'}"


HEADER = (
    "backend",
    "shape",
    "pass",
    "variant",
    "peer",
    "bn1d ms",
    "peer ms",
    "bn1d/peer",
    "target met",
    "bn1d GB/s",
    "peer GB/s",
    "copy GB/s",
    "bn1d peak (x input)",
    "peer peak (x input)",
)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        d = row.as_dict()
        cells = (
            row.backend,
            "x".join(map(str, row.shape)),
            row.pass_,
            row.variant,
            row.peer,
            _ms(row.bn1d_s),
            _ms(row.peer_s),
            f"{row.ratio:.2f}",
            _target(row),
            _num(d["bn1d_gbps"]),
            _num(d["peer_gbps"]),
            _num(d["copy_gbps"]),
            _peak(row, row.bn1d_peak),
            _peak(row, row.peer_peak),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_notes(rows: list[Row]) -> list[str]:
    seen: dict[str, str] = {}
    for row in rows:
        if row.memory:
            seen.setdefault(row.backend.split(" ")[0], row.memory)
    return [f"- {backend}: {what}" for backend, what in seen.items()]


def write_json(path: str, rows: list[Row], sweep: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [r.as_dict() for r in rows], "sweep": sweep}, f, indent=1, default=str)

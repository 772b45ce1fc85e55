"""Results and their table (plain text for the terminal, Markdown for the README).

Samples are always seconds: the time of one event, or for a throughput section
(``unit`` ending in ``/s``) the time per call, shown as its inverse (calls per second).
Ratios divide the values as shown, so in a throughput section "offload ÷ this" above 1x
means offload is faster.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

OFFLOAD = "offload"
# Rows that measure what something other than offload costs on its own (a floor that
# bounds a ratio), not a peer to compare offload with.
REFERENCE = "reference: "


@dataclass
class Row:
    """One contender in one measurement: its samples (seconds) or why it has none."""

    system: str
    samples: list[float] | None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def p99(self) -> float | None:
        """Nearest-rank 99th percentile (the maximum below 100 samples)."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Target:
    """The issue's target for offload's median: ``limit`` seconds, or ``limit`` times the
    floor's median when ``relative`` (the best peer's median with ``best_peer``). In a
    throughput section the median must reach the limit rather than stay under it."""

    text: str
    limit: float
    relative: bool = False
    best_peer: bool = False


@dataclass
class Section:
    title: str
    unit: str  # "µs", "ms", or a throughput: "calls/s", "items/s"
    rows: list[Row]
    floor: str | None = None  # the system whose median is the floor
    target: Target | None = None
    notes: list[str] = field(default_factory=list)
    #: The rows the target applies to; the first is the one "offload ÷ this" divides.
    subjects: tuple[str, ...] = (OFFLOAD,)

    @property
    def throughput(self) -> bool:
        return self.unit.endswith("/s")

    def row(self, system: str | None) -> Row | None:
        return next((r for r in self.rows if r.system == system), None)

    def value(self, row: Row | None) -> float | None:
        """The row's median as shown: seconds, or calls per second."""
        median = row.median if row else None
        if median is None or not self.throughput:
            return median
        return 1.0 / median if median > 0 else None

    def best_peer(self) -> Row | None:
        """The best row that is neither a subject, the floor nor another offload row."""
        peers = [
            (v, r)
            for r in self.rows
            if r.system not in self.subjects
            and r.system != self.floor
            and not r.system.startswith((OFFLOAD, REFERENCE))
            and (v := self.value(r)) is not None
        ]
        if not peers:
            return None
        pick = max if self.throughput else min
        return pick(peers, key=lambda pair: pair[0])[1]

    def verdict(self) -> list[str]:
        """``title: offload X — target Y — met/MISSED``, one per subject."""
        return [line for subject in self.subjects if (line := self._verdict(subject, self.target))]

    def _verdict(self, subject: str, target: Target | None) -> str | None:
        if target is None:
            return None
        value = self.value(self.row(subject))
        if value is None:
            return f"{self.title}: {subject} has no result — target {target.text} — MISSED"
        if target.relative:
            other = self.best_peer() if target.best_peer else self.row(self.floor)
            base = self.value(other)
            if not base or other is None:
                what = "no peer" if target.best_peer else "no floor"
                return f"{self.title}: {what} measured — target {target.text} — unknown"
            against = f"{other.system}: " if target.best_peer else ""
            achieved = f"{value / base:.2f}x ({self.show(value)} vs {against}{self.show(base)})"
            ok = value >= target.limit * base if self.throughput else value <= target.limit * base
        else:
            achieved = self.show(value)
            ok = value >= target.limit if self.throughput else value <= target.limit
        return f"{self.title}: {subject} {achieved} — target {target.text} — " + (
            "met" if ok else "MISSED"
        )

    def fmt(self, seconds: float | None) -> str:
        """A sample (seconds) as shown in this section."""
        if seconds is None:
            return "—"
        if self.throughput:
            return self.show(1.0 / seconds) if seconds > 0 else "—"
        return self.show(seconds)

    def show(self, value: float | None) -> str:
        """A value already in this section's terms (seconds, or calls per second)."""
        if value is None:
            return "—"
        if self.throughput:
            return f"{value:,.0f}/s"
        v = value * (1e6 if self.unit == "µs" else 1e3)
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
        return f"{v:.{digits}f} {self.unit}"


HEADERS = ("Measurement", "System", "median", "p99", "x floor", "offload ÷ this", "n / note")


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}x"


def table_rows(sections: list[Section]) -> list[list[str]]:
    """One list of cells per row, the measurement named on its first row only."""
    out: list[list[str]] = []
    for section in sections:
        floor_value = section.value(section.row(section.floor))
        my_value = section.value(section.row(section.subjects[0]))
        for i, row in enumerate(section.rows):
            value = section.value(row)
            if row.samples:
                note = f"n={len(row.samples)}" + (f"; {row.note}" if row.note else "")
            else:
                note = row.note
            out.append(
                [
                    section.title if i == 0 else "",
                    row.system,
                    section.show(value),
                    "—" if section.throughput else section.fmt(row.p99),
                    _ratio(value, floor_value) if section.floor else "—",
                    "—" if row.system in section.subjects else _ratio(my_value, value),
                    note,
                ]
            )
    return out


def render_text(sections: list[Section], header: str) -> str:
    rows = table_rows(sections)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "-" * len(line(HEADERS))
    lines = [header, "", line(HEADERS), rule]
    for row in rows:
        if row[0] and len(lines) > 4:
            lines.append(rule)
        lines.append(line(row))
    lines += [rule, "", *_footer(sections)]
    return "\n".join(lines)


def render_markdown(sections: list[Section], header: str) -> str:
    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [header, "", line(HEADERS), "|" + "---|" * 2 + "---:|" * 4 + "---|"]
    for row in table_rows(sections):
        cells = [f"**{row[0]}**" if row[0] else "", *row[1:]]
        lines.append(line(cells))
    lines += ["", *(f"- {text}" for text in _footer(sections))]
    return "\n".join(lines)


def _footer(sections: list[Section]) -> list[str]:
    lines = [v for s in sections for v in s.verdict()]
    if any(s.throughput for s in sections):
        lines.append(
            "Throughput rows (/s) are medians over runs, and their ratios divide throughputs: "
            "there, offload ÷ this above 1x means offload is faster."
        )
    lines += [f"{s.title}: {n}" for s in sections for n in s.notes]
    return lines

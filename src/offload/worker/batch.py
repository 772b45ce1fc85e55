"""Running a chunk of map items as one call (imported by reference into workers).

Each item's outcome is kept apart, so that ``Pool.map`` raises exactly at the item that
failed, with that item's own exception and traceback, while the items around it keep
their values.
"""

from __future__ import annotations

TYPE_CHECKING = False  # imported by workers at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

# An outcome is (True, value) or (False, exception-or-None, type name, message, traceback).
if TYPE_CHECKING:
    Outcome = tuple[Any, ...]


def run_chunk(fn: Callable[..., Any], items: Sequence[tuple[Any, ...]]) -> list[Outcome]:
    """Call ``fn(*args)`` for each ``args`` in ``items``; never raises."""
    from offload.serde import dumps, loads, type_name

    out: list[Outcome] = []
    for args in items:
        try:
            out.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - the item's own failure, whatever it is
            import traceback

            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            portable: BaseException | None = exc
            try:
                loads(*dumps(exc))
            except BaseException:  # noqa: BLE001 - travels as text instead
                portable = None
            try:
                message = str(exc)
            except BaseException:  # noqa: BLE001
                message = f"<unprintable {type_name(exc)}>"
            exc.__traceback__ = None  # the frames stay here
            out.append((False, portable, type_name(exc), message, tb))
    return out

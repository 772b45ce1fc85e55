"""Running a chunk of map items as one call (imported by reference into workers).

Each item's outcome is kept apart, so that ``Pool.map`` raises exactly at the item that
failed, with that item's own exception and traceback, while the items around it keep
their values.
"""

from __future__ import annotations

from itertools import starmap

TYPE_CHECKING = False  # imported by workers at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

# An outcome is (True, value) or (False, exception-or-None, type name, message, traceback).
if TYPE_CHECKING:
    Outcome = tuple[Any, ...]


def run_chunk(fn: Callable[..., Any], items: Sequence[Any], star: bool = True) -> tuple[bool, Any]:
    """Call ``fn(*item)`` (``star``) or ``fn(item)`` for each item, once each; never raises.

    Returns ``(True, values)`` when every item succeeded (the fast, common case: one
    list, no per-item wrapping), else ``(False, outcomes)`` with one outcome per item.
    """
    values: list[Any] = []
    try:
        # A C loop (map) appending into ``values``: when an item raises, list.extend
        # keeps what came before it, so len(values) is the index of the failed item.
        values.extend(starmap(fn, items) if star else map(fn, items))
        return True, values
    except BaseException as exc:  # noqa: BLE001 - the item at len(values) failed
        failed = len(values)
        outcomes: list[Outcome] = [(True, value) for value in values]
        outcomes.append(_failure(exc))
        rest = items[failed + 1 :]
        outcomes += _run_each(fn, rest if star else [(item,) for item in rest])
        return False, outcomes


def fold_chunk(
    map_fn: Callable[[Any], Any], reduce_fn: Callable[[Any, Any], Any], items: Iterable[Any]
) -> tuple[bool, list[Any]]:
    """Fold a chunk of a ``Pool.map_reduce``: ``(True, [partial])``, where the partial is
    ``reduce_fn(...reduce_fn(map_fn(x1), map_fn(x2))..., map_fn(xn))``; ``(True, [])``
    for no items. (The shape of :func:`run_chunk`'s answer, so a map's machinery
    carries it.)

    The fold starts from the first mapped item, not from the caller's ``initial``,
    which the caller folds in once (it need not be an identity element).

    Raises:
        whatever ``map_fn`` or ``reduce_fn`` raised: the call fails with it, as itself.
    """
    it = iter(items)
    for first in it:
        acc = map_fn(first)
        for item in it:
            acc = reduce_fn(acc, map_fn(item))
        return True, [acc]
    return True, []


def _run_each(fn: Callable[..., Any], items: Sequence[tuple[Any, ...]]) -> list[Outcome]:
    out: list[Outcome] = []
    for args in items:
        try:
            out.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - the item's own failure, whatever it is
            out.append(_failure(exc))
    return out


def _failure(exc: BaseException) -> Outcome:
    """An item's exception as an outcome that pickles (or its description if not)."""
    import traceback

    from offload.serde import dumps, loads, type_name

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
    return (False, portable, type_name(exc), message, tb)

"""The engine with no I/O: fake slots drive it through starts, results, crashes, kills,
timeouts and lost connections, and the futures and their errors are checked.

A :class:`FakeSlot` implements the slot interface (:class:`offload.client.slot.WorkerSlot`)
and records what the engine asked of it; the test reports events back the way a real
slot would (``host.worker_ready``, ``host.on_results``, ``host.process_exited``). A
:class:`FakeLoop` runs the engine's callbacks and timers when the test says so, on a
clock the test moves. No process, socket or thread is involved.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import offload
from offload import protocol as p
from offload.client import lifetime
from offload.client.engine import Engine
from offload.client.options import make_options
from offload.client.slot import ExitInfo, SlotHost
from offload.serde import dumps
from offload.transport.loop import Timer


class FakeLoop:
    """Callbacks and timers run when the test calls :meth:`run` or :meth:`advance`."""

    def __init__(self) -> None:
        self.now = 100.0
        self.ready: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.timers: list[Timer] = []

    def clock(self) -> float:
        return self.now

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.ready.append((callback, args))

    call_soon_from_anywhere = call_soon

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(when, callback, args)
        self.timers.append(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return self.call_at(self.now + delay, callback, *args)

    def in_loop(self) -> bool:
        return False

    def run(self) -> None:
        while self.ready:
            callback, args = self.ready.pop(0)
            callback(*args)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.run()
        due = sorted((t for t in self.timers if t.when <= self.now), key=lambda t: t.when)
        for timer in due:
            self.timers.remove(timer)
            if not timer.cancelled:
                timer.callback(*timer.args)
        self.run()


class FakeSlot:
    """A worker that does what the test says; records what the engine asked."""

    def __init__(self, host: SlotHost, slot: int, gen: int, name: str) -> None:
        self.host = host
        self.slot = slot
        self.gen = gen
        self.name = name
        self.ready = False
        self.expected_exit = False
        self.started = False
        self.sent: list[int] = []
        self.cancelled: list[int] = []
        self.killed = ""
        self.stopped = False
        self.exited = False

    pid = property(lambda self: 1000 * (self.slot + 1) + self.gen)
    local_pid = property(lambda self: self.pid if self.started and not self.exited else None)
    alive = property(lambda self: self.ready and not self.exited)
    launched = property(lambda self: self.started)

    def start(self) -> None:
        self.started = True

    def send_calls(self, calls: list[Any]) -> None:
        self.sent += [fields[0] for fields in calls]

    def flush(self) -> None:
        pass

    def pump(self, future: Any) -> None:
        pass

    def claim(self) -> bool:
        return False

    def pump_claimed(self, done: Callable[[], bool], window: float) -> None:
        pass

    def stop(self) -> None:
        self.expected_exit = True
        self.stopped = True

    def kill(self, reason: str = "") -> None:
        self.expected_exit = True
        self.killed = reason or "killed"

    def kill_call(self, call_id: int) -> None:
        self.cancelled.append(call_id)

    def rss(self) -> int:
        return 0

    # -- what the test makes happen -------------------------------------------------------

    def become_ready(self, capacity: int | None = None) -> None:
        self.ready = True
        self.host.worker_ready(self, capacity)

    def answer(self, call_id: int, value: Any = None, *, status: int = p.OK) -> None:
        payload, buffers = dumps(value)
        result = p.Result(
            call_id=call_id,
            status=status,
            elapsed=0.001,
            type_name=type(value).__name__ if status != p.OK else "",
            message=str(value) if status != p.OK else "",
            traceback="Traceback: in the worker" if status != p.OK else "",
            payload=payload,
            buffers=tuple(buffers),
        )
        self.host.on_results(self, [result])

    def exit(self, info: ExitInfo | None = None) -> None:
        self.exited = True
        self.host.process_exited(
            self,
            info or ExitInfo(self.name, self.pid, None, "SIGSEGV", "signal", "boom\n"),
        )
        self.host.loop.run()  # type: ignore[attr-defined]  # a FakeLoop: starts replacements


class Rig:
    """An engine on fake slots and a fake loop."""

    def __init__(self, slots: int = 1, *, independent: tuple[int, ...] = (), **options: Any):
        self.loop = FakeLoop()
        self.slots: list[FakeSlot] = []

        def factory(host: SlotHost, index: int, gen: int, name: str) -> FakeSlot:
            slot = FakeSlot(host, index, gen, name)
            self.slots.append(slot)
            return slot

        self.engine = Engine(
            make_options(**options),
            slots,
            keep_warm=True,
            label="rig",
            names=[f"w{i}" for i in range(slots)],
            slot_factory=factory,
            independent=independent,
            loop=self.loop,  # type: ignore[arg-type]
        )
        self.engine.start()
        self.loop.run()

    def current(self, index: int = 0) -> FakeSlot:
        return [s for s in self.slots if s.slot == index][-1]

    def submit(self, fn: Any = len, *args: Any, **kwargs: Any) -> offload.Future[Any]:
        future = self.engine.submit(fn, args or ("abc",), kwargs)
        self.loop.run()
        return future


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(*args: Any, **kwargs: Any) -> Rig:
        rig = Rig(*args, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:  # nothing of theirs is waited for at the interpreter's exit
        lifetime.forget(rig.engine)


def test_a_call_goes_to_the_ready_slot_and_its_value_resolves_the_future(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    slot = rig.current()
    assert slot.started
    fut = rig.submit(len, "abcd")
    assert slot.sent == [] and not fut.running()  # not ready yet: the call waits here
    slot.become_ready()
    (call_id,) = slot.sent
    assert fut.running()
    slot.answer(call_id, 4)
    assert fut.result(timeout=0) == 4
    assert rig.engine.stats_done == 1


def test_a_crash_fails_the_running_call_with_its_signal_and_stderr(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready()
    fut = rig.submit(len, "abcd")
    slot.exit()
    err = fut.exception(timeout=0)
    assert isinstance(err, offload.WorkerCrashed)
    assert err.signal == "SIGSEGV" and err.reason == "signal"
    assert "worker w0 (pid 1001) was killed by SIGSEGV while running len('abcd')" in str(err)
    assert "boom" in str(err) and err.stderr_tail == "boom\n"
    # The pool replaces the worker: a new generation starts.
    assert rig.current() is not slot and rig.current().started


def test_calls_sent_ahead_go_to_the_replacement_when_the_worker_dies(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready()
    first = rig.submit(len, "a")
    second = rig.submit(len, "bb")  # one slot: sent ahead (prefetch = capacity)
    assert len(slot.sent) == 2 and not second.running()
    slot.exit()
    assert isinstance(first.exception(timeout=0), offload.WorkerCrashed)
    assert not second.done()
    replacement = rig.current()
    replacement.become_ready()
    assert replacement.sent == [slot.sent[1]]
    replacement.answer(slot.sent[1], 2)
    assert second.result(timeout=0) == 2


def test_retries_rerun_a_call_whose_worker_crashed(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.current().become_ready()
    fut = rig.engine.submit(len, ("abc",), {}, retries=1)
    rig.loop.run()
    first = rig.current()
    (call_id,) = first.sent
    first.exit()
    assert not fut.done()
    second = rig.current()
    second.become_ready()
    assert second.sent == [call_id]
    second.answer(call_id, 3)
    assert fut.result(timeout=0) == 3


def test_a_timeout_kills_the_worker_and_fails_the_call_with_task_timeout(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready()
    fut = rig.engine.submit(len, ("abc",), {}, timeout=2.0)
    rig.loop.run()
    rig.loop.advance(1.0)
    assert not fut.done()
    rig.loop.advance(1.5)
    err = fut.exception(timeout=0)
    assert isinstance(err, offload.TaskTimeout) and isinstance(err, TimeoutError)
    assert err.timeout == 2.0
    assert "did not finish within its timeout of 2 s; worker w0 (pid 1001)" in str(err)
    assert slot.killed == "timeout"
    slot.exit()  # the killed process goes: that is no failure of any call
    assert rig.engine.stats_failed == 1


def test_kill_fails_the_call_with_worker_killed(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready()
    fut = rig.submit(len, "abc")
    assert fut.kill() is True
    err = fut.exception(timeout=0)
    assert isinstance(err, offload.WorkerKilled)
    assert str(err) == "len('abc') was killed on worker w0 (pid 1001)"
    assert slot.killed == "killed"


def test_cancel_withdraws_a_call_sent_ahead(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready()
    first = rig.submit(len, "a")
    second = rig.submit(len, "bb")
    waiter = concurrent.futures.wait([second], timeout=0)
    assert waiter.not_done == {second}
    assert second.cancel() is True
    assert slot.cancelled == [slot.sent[1]]  # the worker is told to skip it
    assert second.cancelled()
    assert first.cancel() is False  # it runs
    slot.answer(slot.sent[0], 1)
    assert first.result(timeout=0) == 1


def test_a_lost_connection_fails_a_remote_call_with_connection_lost(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(independent=(0,))
    slot = rig.current()
    slot.become_ready(capacity=4)
    futs = [rig.submit(len, "x" * i) for i in range(3)]
    assert len(slot.sent) == 3  # a server runs them all at once
    slot.exit(
        ExitInfo("gpu1:1111", 4242, None, None, "disconnected", "", "lost its connection", True)
    )
    for fut in futs:
        err = fut.exception(timeout=0)
        assert isinstance(err, offload.ConnectionLost)
        assert "worker server gpu1:1111 (pid 4242) lost its connection while running" in str(err)


def test_a_remote_timeout_kills_only_that_call(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(independent=(0,))
    slot = rig.current()
    slot.become_ready(capacity=2)
    slow = rig.engine.submit(len, ("abc",), {}, timeout=1.0)
    other = rig.submit(len, "de")
    rig.loop.run()
    rig.loop.advance(1.5)
    err = slow.exception(timeout=0)
    assert isinstance(err, offload.TaskTimeout)
    assert "it was killed on the worker server w0" in str(err)
    assert slot.cancelled == [slot.sent[0]] and slot.killed == ""
    slot.answer(slot.sent[1], 2)
    assert other.result(timeout=0) == 2


def test_a_start_that_fails_fails_the_queued_calls_with_start_error(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    fut = rig.submit(len, "abc")
    for _ in range(3):  # max_start_failures
        slot = rig.current()
        rig.engine.start_failed(slot, offload.StartError("exec failed", worker="w0"))
        rig.loop.advance(10.0)  # past the back-off
    err = fut.exception(timeout=0)
    assert isinstance(err, offload.StartError)
    assert "exec failed" in str(err)


def test_a_worker_dying_before_its_handshake_is_a_start_error(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    slot = rig.current()
    slot.exit(ExitInfo("w0", 1001, 3, None, "exit", "ImportError: no module x\n"))
    err = rig.engine._last_start_error[0]
    assert isinstance(err, offload.StartError)
    assert "exited with status 3 before finishing its handshake" in str(err)
    assert "ImportError" in str(err)


def test_a_task_exception_comes_back_as_itself(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready()
    fut = rig.submit(len, "abc")
    slot.answer(slot.sent[0], ValueError("bad input"), status=p.RAISED)
    err = fut.exception(timeout=0)
    assert type(err) is ValueError and err.args == ("bad input",)
    assert isinstance(err.__cause__, offload.RemoteTraceback)
    assert isinstance(fut.status(), offload.Raised)
    assert rig.engine.stats_failed == 1


def test_abort_cancels_queued_kills_running_and_starts_nothing(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready()
    running = rig.submit(len, "a")
    ahead = rig.submit(len, "b")
    queued = rig.submit(len, "c")
    with rig.engine.lock:
        deferred = rig.engine._apply(rig.engine.scheduler.abort(rig.loop.clock()))
    rig.engine._resolve(deferred)
    assert isinstance(running.exception(timeout=0), offload.WorkerKilled)
    assert ahead.cancelled() and queued.cancelled()
    assert slot.killed == "shutdown"
    slot.exit()
    rig.loop.run()
    assert rig.current() is slot  # no replacement after the abort
    assert not rig.engine.records


def test_an_error_handling_results_is_contained_by_the_slot_not_the_engine(
    rig_factory: Callable[..., Rig],
) -> None:
    """A stray result (an id nobody waits for) changes nothing."""
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready()
    fut = rig.submit(len, "abc")
    slot.answer(999_999, 1)
    assert not fut.done()
    slot.answer(slot.sent[0], 3)
    assert fut.result(timeout=0) == 3


def test_a_withdrawn_call_keeps_its_place_until_the_worker_answers(
    rig_factory: Callable[..., Rig],
) -> None:
    """The worker may run a call it read before the Cancel came: until it answers, the
    calls behind keep their places, so a crash is blamed on the right one."""
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready(capacity=1)
    first = rig.submit(len, "a")
    ahead = rig.submit(len, "bb")
    assert ahead.cancel() is True
    behind = rig.submit(len, "ccc")
    slot.answer(slot.sent[0], 1)
    assert first.result(timeout=0) == 1
    # The withdrawn call now holds the running place: the one behind is not running.
    assert not behind.running()
    slot.exit()  # the worker ran the withdrawn call after all, and it crashed
    assert not behind.done()  # not blamed: it goes to the replacement
    replacement = rig.current()
    replacement.become_ready()
    assert replacement.sent == [slot.sent[-1]]
    replacement.answer(slot.sent[-1], 3)
    assert behind.result(timeout=0) == 3
    assert ahead.cancelled()


def test_a_skipped_answer_frees_the_place_of_a_withdrawn_call(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    slot = rig.current()
    slot.become_ready(capacity=1)
    first = rig.submit(len, "a")
    ahead = rig.submit(len, "bb")
    assert ahead.cancel() is True
    slot.answer(slot.sent[0], 1)
    slot.answer(slot.sent[1], None, status=p.SKIPPED)
    behind = rig.submit(len, "ccc")
    assert behind.running()  # the slot is free again
    slot.answer(slot.sent[-1], 3)
    assert behind.result(timeout=0) == 3
    assert first.result(timeout=0) == 1 and ahead.cancelled()
    assert rig.engine.stats_failed == 0

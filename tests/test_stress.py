"""A randomized, seeded, bounded stress test of a pool under chaos, for each start method.

Each test runs rounds until its time budget is spent. A round makes
``offload.Pool(2, start_method=m, stderr="devnull")`` and starts

* three submitter threads, each with its own seeded ``random.Random``, submitting a random
  mix of calls: tiny ``ident(x)``, a 1 MB ``echo``, ``raise ValueError(x)``, a sleep of
  0-50 ms returning ``x``, crashes (``os._exit(3)``, SIGSEGV) and a 1 s sleep under a 0.05 s
  ``offload.task`` timeout. A submitter keeps a bounded number of calls in flight, checks
  each call's outcome as soon as it is done, now and then waits briefly on a call's
  ``result(timeout)`` or ``cancel()``s / ``kill()``s a call in flight, and stops at the
  ``RuntimeError`` that ``submit`` raises once the pool is shut down;
* one chaos thread that, at random intervals, SIGKILLs a live worker or SIGSTOPs it and
  SIGCONTs it a little later, and at a random moment calls ``pool.shutdown`` with random
  arguments (``wait=True`` with a timeout, ``cancel_futures=True``, ``kill=True``, or
  ``wait=False`` with more chaos while the pool drains). No process is ever left stopped:
  the chaos thread and the round's ``finally`` both SIGCONT everything still stopped.

Then every future must resolve (a bounded wait: a hang is a failure), and each outcome must
be one its kind allows: its own value (a value is always exactly the right one, never
another call's), the task's own exception, ``WorkerCrashed`` / ``WorkerKilled`` /
``TaskTimeout`` where chaos, crashes or shutdown explain them, ``StartError`` for a worker
chaos killed during its handshake, or ``CancelledError``; ``status()`` agrees. A crash is
never blamed on another call (workers run one call at a time); a ``cancel()`` or ``kill()``
that returned True is honoured (cancelled / ``WorkerKilled``, never a value). After a
``shutdown(wait=True)`` returns, every future is already done, the shutdown took no longer
than its bound, no worker is left and the stats show nothing queued or running. The autouse
``no_leaks`` fixture checks for leaked processes, threads and fds.

Environment:

* ``OFFLOAD_STRESS_SEED``: the base seed (default: a fixed seed per start method). Every
  failure message names the seed and round; the decisions (which calls, which chaos, when)
  replay from it, the thread interleavings do not.
* ``OFFLOAD_STRESS_SECONDS``: the time budget per start method (default 3).

Processes are only ever signalled through a pidfd opened on a pid from
``pool.worker_pids()`` and checked to be a descendant of this process.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest

import offload
import stress_tasks as st
from test_contract import START_METHODS

SECONDS = float(os.environ.get("OFFLOAD_STRESS_SECONDS", "3"))
SEED_OVERRIDE = os.environ.get("OFFLOAD_STRESS_SEED")
DEFAULT_SEEDS = {"spawn": 8101, "fork": 8202, "forkserver": 8303, "reexec": 8404}

WORKERS = 2
SUBMITTERS = 3
BIG = 1 << 20  # bytes of an echo call
MAX_ROUND = 1.0  # seconds from the first worker ready to the shutdown, at most
EARLY_SHUTDOWNS = 0.2  # this share of rounds shut down early, counted from the pool's creation
EARLY_ROUND = 0.3  # ... at most this many seconds after it (often before workers are ready)
START_BOUND = 20.0  # a worker of a new pool is ready within this, chaos or not
RESOLVE_TIMEOUT = 30.0  # every future resolves within this after the threads stopped
JOIN_TIMEOUT = 30.0  # every thread of the test ends within this
KILL_GRACE = 0.5  # the library's SIGTERM -> SIGKILL grace
SHUTDOWN_SLACK = 2.5  # "a little" over a shutdown's bound, on a loaded 2-core machine
DRAIN_BOUND = 15.0  # shutdown(wait=True) without a timeout: the running calls are short
USER_STOPS = 0.02  # share of submissions after which a submitter cancel()s or kill()s a call
# Weights of kill / stop / nothing for each chaos action; gentler while the pool starts,
# so that it gets to run calls (repeated start failures make it give up with StartError).
CHAOS = [35, 35, 30]
STARTING_CHAOS = [10, 20, 70]

TIMEOUT_TASK = offload.task(st.sleep_then, timeout=0.05)

# kind -> weight in the mix
MIX = {
    "tiny": 40,
    "big": 6,
    "raise": 12,
    "sleep": 20,
    "exit": 4,
    "segv": 3,
    "timeout": 3,
}
VALUE_KINDS = {"tiny", "big", "sleep"}


@dataclass
class Call:
    kind: str
    x: int
    fut: offload.Future[Any] | None  # None once checked (the result is dropped)
    digest: bytes = b""  # big: blake2b of the payload
    outcome: str = ""  # set once checked
    stopped: str = ""  # "cancel" / "kill" when the submitter's fut.cancel() / kill() said True
    notes: list[str] = field(default_factory=list)  # what the submitter did with it


@dataclass
class Round:
    method: str
    seed: int
    index: int
    pool: offload.Pool
    calls: list[list[Call]] = field(default_factory=lambda: [[] for _ in range(SUBMITTERS)])
    pending: list[list[Call]] = field(default_factory=lambda: [[] for _ in range(SUBMITTERS)])
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    shutdown_returned: threading.Event = field(default_factory=threading.Event)
    abort: threading.Event = field(default_factory=threading.Event)
    shutdown_desc: str = ""
    variant: str = ""
    shutdown_elapsed: float = -1.0
    chaos_log: list[str] = field(default_factory=list)
    submit_refused: int = 0
    stopped: dict[int, int] = field(default_factory=dict)  # pid -> pidfd (or -1)
    killed: set[int] = field(default_factory=set)  # pids chaos SIGKILLed (or tried to)

    @property
    def where(self) -> str:
        return (
            f"start_method={self.method} seed={self.seed} round={self.index} "
            f"(replay: OFFLOAD_STRESS_SEED={self.seed}); shutdown: {self.shutdown_desc}"
        )

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def _base_seed(method: str) -> int:
    return int(SEED_OVERRIDE) if SEED_OVERRIDE else DEFAULT_SEEDS.get(method, 8000)


# --------------------------------------------------------------------------------------- #
# Signalling workers safely
# --------------------------------------------------------------------------------------- #


def _is_descendant(pid: int) -> bool:
    """Whether ``pid`` is a child of this process or a child of one of its children (a
    forkserver template's worker)."""
    me = os.getpid()
    try:
        parent = psutil.Process(pid).ppid()
        return parent == me or psutil.Process(parent).ppid() == me
    except psutil.Error:
        return False


def _open_worker(pid: int) -> int | None:
    """A pidfd on ``pid`` if it is one of our descendants (-1 where pidfds do not exist),
    or None. Signals sent through the pidfd can only reach that very process, even if the
    pid is reused later."""
    fd = -1
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
    if not _is_descendant(pid):
        if fd >= 0:
            os.close(fd)
        return None
    return fd


def _send(pid: int, fd: int, sig: int) -> bool:
    try:
        if fd >= 0:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _resume(rnd: Round, pid: int) -> None:
    with rnd.lock:
        fd = rnd.stopped.pop(pid, None)
    if fd is None:
        return
    try:
        _send(pid, fd, signal.SIGCONT)
    finally:
        if fd >= 0:
            os.close(fd)


def _resume_all(rnd: Round) -> None:
    with rnd.lock:
        pids = list(rnd.stopped)
    for pid in pids:
        _resume(rnd, pid)


# --------------------------------------------------------------------------------------- #
# Submitting and checking
# --------------------------------------------------------------------------------------- #


def _submit(pool: offload.Pool, rng: random.Random, kind: str, x: int) -> Call:
    if kind == "tiny":
        return Call(kind, x, pool.submit(st.ident, x))
    if kind == "big":
        data = x.to_bytes(8, "little") + rng.randbytes(BIG - 8)
        digest = hashlib.blake2b(data, digest_size=16).digest()
        return Call(kind, x, pool.submit(st.echo, data), digest=digest)
    if kind == "raise":
        return Call(kind, x, pool.submit(st.raise_value_error, x))
    if kind == "sleep":
        return Call(kind, x, pool.submit(st.sleep_then, x, rng.uniform(0.0, 0.05)))
    if kind == "exit":
        return Call(kind, x, pool.submit(st.exit_hard, x))
    if kind == "segv":
        return Call(kind, x, pool.submit(st.segfault, x))
    assert kind == "timeout"
    return Call(kind, x, pool.submit(TIMEOUT_TASK, x, 1.0))


def _describe_value(value: Any) -> str:
    if isinstance(value, bytes) and len(value) > 64:
        head = int.from_bytes(value[:8], "little")
        return f"<{len(value)} bytes starting with x={head}>"
    return repr(value)[:200]


def _status_problem(fut: offload.Future[Any], kind: str) -> str | None:
    """``fut.status()`` must agree with how the future resolved."""
    status = fut.status()
    expected = {
        "cancelled": offload.Cancelled,
        "value": offload.Success,
        "raised": offload.Raised,
        "failed": offload.Failed,
    }[kind]
    if not isinstance(status, expected):
        return f"status() is {status!r}, expected {expected.__name__}"
    return None


def _judge(rnd: Round, call: Call) -> tuple[str, str | None]:
    """(outcome label, problem or None) for a done future."""
    fut = call.fut
    assert fut is not None and fut.done()
    what = f"{call.kind} call x={call.x}"
    if fut.cancelled():
        return "cancelled", _status_problem(fut, "cancelled")
    if call.stopped == "cancel":
        return "not-cancelled", f"{what}: cancel() returned True, but it was not cancelled"
    exc = fut.exception(timeout=0)
    if exc is None:
        value = fut.result(timeout=0)
        if call.kind not in VALUE_KINDS:
            return "value", f"{what} returned {_describe_value(value)} instead of failing"
        if call.kind == "big":
            ok = (
                isinstance(value, bytes)
                and len(value) == BIG
                and hashlib.blake2b(value, digest_size=16).digest() == call.digest
            )
        else:
            ok = type(value) is int and value == call.x
        if not ok:
            return "value", f"{what} returned the wrong value {_describe_value(value)}"
        if call.stopped == "kill":
            return "value", f"{what}: kill() returned True, but it returned a value"
        return "value", _status_problem(fut, "value")
    name = type(exc).__name__
    label, problem = name, None
    if call.stopped == "kill" and not isinstance(exc, offload.WorkerKilled):
        problem = f"{what}: kill() returned True, but it failed with {exc!r}"
    elif isinstance(exc, offload.TaskTimeout):
        if call.kind != "timeout":
            problem = f"{what} failed with {exc!r}, but it had no timeout"
    elif isinstance(exc, offload.WorkerKilled):
        pass
    elif isinstance(exc, offload.WorkerCrashed):
        # Workers run one call at a time: an exit status of 3 or a SIGSEGV belongs to the
        # call that caused it; any call may be running when chaos SIGKILLs its worker.
        own = (call.kind == "exit" and exc.exitcode == st.CRASH_EXIT_CODE) or (
            call.kind == "segv" and exc.signal == "SIGSEGV"
        )
        chaos = exc.signal == "SIGKILL" and exc.pid in rnd.killed
        label = f"{name}({exc.signal or exc.exitcode})"
        if not (own or chaos):
            problem = f"{what} was blamed for a crash it did not cause: {exc!r}"
    elif isinstance(exc, offload.StartError):
        # Chaos SIGKILLed a worker during its handshake, often enough in a row that the
        # pool gave up starting that slot for now (SPEC 6: no endless respawn loop).
        if not rnd.killed or (exc.pid is not None and exc.pid not in rnd.killed):
            problem = f"{what} failed with {exc!r}, but chaos did not kill pid {exc.pid}"
        return name, problem
    elif call.kind == "raise" and type(exc) is ValueError:
        if exc.args != (call.x,):
            problem = f"{what} raised ValueError{exc.args!r}, not its own"
        elif not isinstance(exc.__cause__, offload.RemoteTraceback):
            problem = f"{what}: ValueError without a RemoteTraceback cause"
        else:
            problem = _status_problem(fut, "raised")
        return name, problem
    else:
        return name, f"{what} failed with an unexpected {exc!r}"
    return label, problem or _status_problem(fut, "failed")


def _check_done(rnd: Round, call: Call) -> None:
    call.outcome, problem = _judge(rnd, call)
    call.fut = None  # drop the result (1 MB for echo calls)
    if problem:
        rnd.problem(f"{problem} [{call.outcome}]")


def _submitter(rnd: Round, i: int) -> None:
    rng = random.Random(f"{rnd.seed}:{rnd.index}:submitter:{i}")
    kinds, weights = list(MIX), list(MIX.values())
    max_in_flight = rng.randint(4, 40)
    pending = rnd.pending[i]
    n = 0
    try:
        while not rnd.abort.is_set():
            kind = rng.choices(kinds, weights)[0]
            x = i * 1_000_000 + n
            n += 1
            try:
                call = _submit(rnd.pool, rng, kind, x)
            except RuntimeError as exc:
                if "shutdown" not in str(exc):
                    raise
                with rnd.lock:
                    rnd.submit_refused += 1
                return
            returned = rnd.shutdown_returned.is_set()
            pending.append(call)
            rnd.calls[i].append(call)
            assert call.fut is not None
            if returned and not call.fut.done():
                rnd.problem(f"{kind} call x={x} was accepted but is not done after shutdown")
            # Check and release what is done; keep the number in flight bounded.
            still = []
            for c in pending:
                if c.fut is not None and c.fut.done():
                    _check_done(rnd, c)
                elif c.fut is not None:
                    still.append(c)
            pending[:] = still
            if len(pending) >= max_in_flight:
                concurrent.futures.wait(
                    [c.fut for c in pending if c.fut is not None],
                    timeout=0.2,
                    return_when=concurrent.futures.FIRST_COMPLETED,
                )
            r = rng.random()
            if r < USER_STOPS and pending:
                # The user's own chaos: cancel() or kill() a call in flight.
                victim = rng.choice(pending)
                vfut = victim.fut
                if vfut is not None:
                    how = rng.choice(["cancel", "kill"])
                    said = vfut.cancel() if how == "cancel" else vfut.kill()
                    victim.notes.append(f"{how}() -> {said}")
                    if said:
                        victim.stopped = how
            elif r < USER_STOPS + 0.05:
                # Block on the call just made, briefly (the waiting caller's path).
                call_fut = call.fut
                if call_fut is not None:
                    try:
                        call_fut.result(timeout=rng.uniform(0.0, 0.05))
                        call.notes.append("result(timeout) returned")
                    except BaseException as exc:  # noqa: BLE001 - any outcome will do here
                        call.notes.append(f"result(timeout) raised {type(exc).__name__}")
            elif r < 0.25:
                time.sleep(rng.uniform(0.0, 0.004))
    except BaseException as exc:
        rnd.problem(f"submitter {i} raised {exc!r}")
        raise


# --------------------------------------------------------------------------------------- #
# Chaos
# --------------------------------------------------------------------------------------- #


def _chaos_action(rnd: Round, rng: random.Random, now: float, weights: list[int]) -> None:
    pids = rnd.pool.worker_pids()
    action = rng.choices(["kill", "stop", "nothing"], weights)[0]
    if not pids or action == "nothing":
        return
    pid = rng.choice(pids)
    with rnd.lock:
        if pid in rnd.stopped and action == "stop":
            return
    fd = _open_worker(pid)
    if fd is None:
        return
    if action == "kill":
        rnd.killed.add(pid)  # before the signal: its victims may be judged at once
        try:
            if _send(pid, fd, signal.SIGKILL):
                rnd.chaos_log.append(f"{now:.3f} SIGKILL {pid}")
        finally:
            if fd >= 0:
                os.close(fd)
        return
    if not _send(pid, fd, signal.SIGSTOP):
        if fd >= 0:
            os.close(fd)
        return
    with rnd.lock:
        rnd.stopped[pid] = fd  # closed by _resume
    rnd.chaos_log.append(f"{now:.3f} SIGSTOP {pid}")


def _ready(pool: offload.Pool) -> bool:
    stats = pool.stats()
    return stats.idle + stats.busy > 0


def _chaos_until(
    rnd: Round, rng: random.Random, t0: float, end: float, until_ready: bool = False
) -> None:
    """Kill and stop/continue workers at random until ``end`` (monotonic) or, with
    ``until_ready``, until a worker of the pool is ready."""
    resume_at: dict[int, float] = {}
    next_action = time.monotonic() + rng.uniform(0.0, 0.1)
    while not rnd.abort.is_set():
        now = time.monotonic()
        with rnd.lock:  # every stopped worker is continued a little later
            for pid in rnd.stopped:
                resume_at.setdefault(pid, now + rng.uniform(0.005, 0.25))
        for pid, at in list(resume_at.items()):
            if at <= now:
                del resume_at[pid]
                _resume(rnd, pid)
                rnd.chaos_log.append(f"{now - t0:.3f} SIGCONT {pid}")
        if now >= end or (until_ready and _ready(rnd.pool)):
            return
        if now >= next_action:
            _chaos_action(rnd, rng, now - t0, STARTING_CHAOS if until_ready else CHAOS)
            next_action = now + rng.uniform(0.01, 0.12)
        wake = min([next_action, end, *resume_at.values()])
        rnd.abort.wait(max(0.0, wake - time.monotonic()))


def _check_after_wait(rnd: Round, bound: float, elapsed: float) -> None:
    """Checks right after a ``shutdown(wait=True)`` returned."""
    if elapsed > bound:
        rnd.problem(f"shutdown took {elapsed:.2f} s, more than its bound {bound:.2f} s")
    for i in range(SUBMITTERS):
        for call in list(rnd.pending[i]):
            fut = call.fut
            if fut is not None and not fut.done():
                rnd.problem(
                    f"{call.kind} call x={call.x} not done when shutdown(wait=True) returned"
                )
    pids = rnd.pool.worker_pids()
    if pids:
        rnd.problem(f"workers {pids} still alive after shutdown(wait=True) returned")


def _chaos(rnd: Round, t0: float) -> None:
    rng = random.Random(f"{rnd.seed}:{rnd.index}:chaos")
    early = rng.random() < EARLY_SHUTDOWNS
    delay = rng.uniform(0.0, EARLY_ROUND if early else MAX_ROUND)
    rnd.variant = rng.choices(["timeout", "cancel", "kill", "nowait"], [40, 20, 25, 15])[0]
    variant = rnd.variant
    try:
        if not early:
            # The moment counts from the first worker ready: slow starts (reexec re-runs
            # pytest) would otherwise make most rounds end before any call ran. Chaos
            # starts at once all the same (killing starting workers is part of it).
            _chaos_until(rnd, rng, t0, t0 + START_BOUND, until_ready=True)
            if not _ready(rnd.pool):
                rnd.problem(f"no worker was ready within {START_BOUND} s")
        shutdown_at = (t0 if early else time.monotonic()) + delay
        _chaos_until(rnd, rng, t0, shutdown_at)
        if rnd.abort.is_set():
            return
        pool = rnd.pool
        if variant == "cancel":
            # No timeout: the running calls must be able to finish.
            _resume_all(rnd)
            rnd.shutdown_desc = f"shutdown(cancel_futures=True) at {shutdown_at - t0:.3f} s"
            start = time.monotonic()
            pool.shutdown(cancel_futures=True)
            rnd.shutdown_elapsed = time.monotonic() - start
            rnd.shutdown_returned.set()
            _check_after_wait(rnd, DRAIN_BOUND, rnd.shutdown_elapsed)
        elif variant == "timeout":
            timeout = rng.uniform(0.05, 1.0)
            cancel = rng.random() < 0.3
            if rng.random() < 0.5:
                _resume_all(rnd)  # else stopped workers stay stopped through the shutdown
            rnd.shutdown_desc = (
                f"shutdown(wait=True, timeout={timeout:.3f}, cancel_futures={cancel}) "
                f"at {shutdown_at - t0:.3f} s"
            )
            start = time.monotonic()
            pool.shutdown(wait=True, timeout=timeout, cancel_futures=cancel)
            rnd.shutdown_elapsed = time.monotonic() - start
            rnd.shutdown_returned.set()
            _check_after_wait(rnd, timeout + KILL_GRACE + SHUTDOWN_SLACK, rnd.shutdown_elapsed)
        elif variant == "kill":
            # Stopped workers stay stopped: "kill the workers now" must not need them.
            rnd.shutdown_desc = f"shutdown(kill=True) at {shutdown_at - t0:.3f} s"
            start = time.monotonic()
            pool.shutdown(kill=True)
            rnd.shutdown_elapsed = time.monotonic() - start
            rnd.shutdown_returned.set()
            _check_after_wait(rnd, KILL_GRACE + SHUTDOWN_SLACK, rnd.shutdown_elapsed)
        else:
            cancel = rng.random() < 0.5
            rnd.shutdown_desc = (
                f"shutdown(wait=False, cancel_futures={cancel}) at {shutdown_at - t0:.3f} s, "
                "then chaos while it drains"
            )
            pool.shutdown(wait=False, cancel_futures=cancel)
            _chaos_until(rnd, rng, t0, time.monotonic() + rng.uniform(0.0, 0.3))
    except BaseException as exc:
        rnd.problem(f"chaos thread raised {exc!r}")
        raise
    finally:
        _resume_all(rnd)


# --------------------------------------------------------------------------------------- #
# A round
# --------------------------------------------------------------------------------------- #


def _describe_hung(call: Call) -> str:
    fut = call.fut
    assert fut is not None
    state = getattr(fut, "_state", "?")  # diagnostics only
    return f"{call.kind} x={call.x}: {fut!r} state={state} notes={call.notes}"


def _stops(rnd: Round) -> list[str]:
    """The last calls the submitters cancelled, killed or waited for (diagnostics)."""
    calls = [c for per in rnd.calls for c in per if c.notes]
    return [f"{c.kind} x={c.x}: {c.notes} -> {c.outcome or 'pending'}" for c in calls[-30:]]


def _not_done(rnd: Round) -> list[Call]:
    calls = [c for per in rnd.pending for c in list(per)]
    return [c for c in calls if c.fut is not None and not c.fut.done()]


def _stacks(threads: list[threading.Thread]) -> str:
    """Where the given threads are (for the message about threads that did not end, with
    offload's own threads)."""
    frames = sys._current_frames()
    out = []
    for t in threads:
        frame = frames.get(t.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame else "  (gone)\n"
        out.append(f"thread {t.name}:\n{stack}")
    return "".join(out)


def _run_round(method: str, seed: int, index: int, totals: Counter[str]) -> None:
    t0 = time.monotonic()
    pool = offload.Pool(WORKERS, start_method=method, stderr="devnull")
    rnd = Round(method, seed, index, pool)
    threads = [
        threading.Thread(target=_submitter, args=(rnd, i), name=f"stress-submit-{i}", daemon=True)
        for i in range(SUBMITTERS)
    ]
    threads.append(
        threading.Thread(target=_chaos, args=(rnd, t0), name="stress-chaos", daemon=True)
    )
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in threads if t.is_alive()]
        assert not stuck, (
            f"threads {[t.name for t in stuck]} did not end within {JOIN_TIMEOUT} s; "
            f"{rnd.where}; stats {pool.stats()}; calls not done: "
            f"{[_describe_hung(c) for c in _not_done(rnd)][:20]}; chaos: "
            f"{', '.join(rnd.chaos_log[-30:])}; the submitters' cancel(), kill() and "
            f"result(timeout) calls: {_stops(rnd)}\n"
            + _stacks(stuck + [t for t in threading.enumerate() if t.name.startswith("offload")])
        )
    finally:
        rnd.abort.set()
        _resume_all(rnd)
        for t in threads:
            t.join(JOIN_TIMEOUT)
        # After a wait=False shutdown (or a failure), wait for the workers, bounded.
        start = time.monotonic()
        pool.shutdown(wait=True, timeout=5.0)
        final_elapsed = time.monotonic() - start
        _resume_all(rnd)

    assert final_elapsed <= 5.0 + KILL_GRACE + SHUTDOWN_SLACK, (
        f"the final shutdown(wait=True, timeout=5) took {final_elapsed:.2f} s; {rnd.where}"
    )
    left = [c for calls in rnd.pending for c in calls if c.fut is not None]
    futs = [c.fut for c in left if c.fut is not None]
    _, not_done = concurrent.futures.wait(futs, timeout=RESOLVE_TIMEOUT)
    hung = [_describe_hung(c) for c in left if c.fut in not_done]
    assert not hung, (
        f"{len(hung)} futures not resolved {RESOLVE_TIMEOUT:g} s after the shutdown: "
        f"{hung[:20]}; {rnd.where}; stats {pool.stats()}; problems: {rnd.problems[:10]}; "
        f"chaos: {', '.join(rnd.chaos_log[-30:])}; the submitters' cancel(), kill() and "
        f"result(timeout) calls: {_stops(rnd)}"
    )
    for c in left:
        _check_done(rnd, c)

    stats = pool.stats()
    if stats.queued or stats.running or stats.busy:
        rnd.problem(f"stats after shutdown show calls still queued or running: {stats}")
    if pool.worker_pids():
        rnd.problem(f"workers {pool.worker_pids()} alive after shutdown")
    with pytest.raises(RuntimeError):
        pool.submit(st.ident, 0)

    calls = [c for per in rnd.calls for c in per]
    outcomes = Counter(f"{c.kind}:{c.outcome}" for c in calls)
    totals.update(outcomes)
    totals["rounds"] += 1
    totals[f"shutdown:{rnd.variant}"] += 1
    print(
        f"{method} round {index}: {len(calls)} calls, {rnd.shutdown_desc}, "
        f"took {rnd.shutdown_elapsed:.3f} s; chaos: {len(rnd.chaos_log)} signals"
    )
    assert not rnd.problems, (
        f"{len(rnd.problems)} problems; {rnd.where}:\n  "
        + "\n  ".join(rnd.problems[:30])
        + "\nchaos: "
        + ", ".join(rnd.chaos_log[-30:])
        + "\nthe submitters' cancel(), kill() and result(timeout) calls:\n  "
        + "\n  ".join(_stops(rnd))
    )
    assert all(c.outcome for c in calls), f"unchecked calls; {rnd.where}"


@pytest.mark.timeout(SECONDS * 3 + 120)
@pytest.mark.parametrize("method", START_METHODS)
def test_pool_survives_chaos_and_shutdown(method: str) -> None:
    seed = _base_seed(method)
    totals: Counter[str] = Counter()
    end = time.monotonic() + SECONDS
    index = 0
    while index == 0 or time.monotonic() < end:
        _run_round(method, seed, index, totals)
        index += 1
    print(f"{method} seed={seed}: {dict(sorted(totals.items()))}")

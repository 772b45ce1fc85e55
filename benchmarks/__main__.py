"""``python -m benchmarks [--quick] [--markdown] [--only NAME ...]``: run the benchmarks
and print one table (medians, p99, ratios against the floor and against each peer)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from benchmarks import make_importable

make_importable()

from benchmarks import (  # noqa: E402
    actors,
    channel_async,
    channels,
    coldstart,
    data,
    death,
    pool_coldstart,
    pool_failures,
    pool_throughput,
    remote,
    report,
    roundtrip,
    ssh,
    timeout,
    waiting,
)
from benchmarks.report import Section, Target  # noqa: E402

NAMES = (
    "roundtrip",
    "death",
    "timeout",
    "coldstart",
    "pool-coldstart",
    "fresh-program",
    "pool-submit",
    "pool-map",
    "pool-failure",
    "remote",
    "ssh",
    "actors",
    "data",
    "channels",
    "channel-async",
    "waiting",
    "by-value",
)


@dataclass(frozen=True)
class Plan:
    calls: int = 2000  # round trip: measured calls per contender
    warmup: int = 200
    rounds: int = 4  # round trip: contenders alternate this many times
    death_reps: int = 20
    timeout_reps: int = 10
    cold_reps: int = 10
    give_up: float = 2.0  # seconds before a call that should have failed counts as hung
    pool_calls: int = 20_000  # pool: tiny calls submitted at once, per run
    pool_reps: int = 5
    map_items: int = 200_000
    map_reps: int = 5
    chunksizes: tuple[int, ...] = (1, 100, 1000, 5000)  # tried for every peer's map
    pool_cold_reps: int = 10
    fresh_reps: int = 10  # fresh programs (whole processes) per contender
    pool_failure_reps: int = 10
    remote_pool_calls: int = 5000
    remote_reps: int = 3
    ssh_reps: int = 10  # worker starts over ssh per contender
    channel_items: int = 200_000  # tiny items per channel run, per direction
    channel_reps: int = 5
    data_reps: int = 10  # large data: 64 MiB round trips per contender
    limit: float = 60.0  # seconds before a batch of calls counts as hung


QUICK = Plan(
    calls=200,
    warmup=20,
    rounds=2,
    death_reps=3,
    timeout_reps=3,
    cold_reps=3,
    give_up=1.0,
    pool_calls=3000,
    pool_reps=1,
    map_items=40_000,
    map_reps=1,
    pool_cold_reps=3,
    fresh_reps=3,
    pool_failure_reps=3,
    remote_pool_calls=1000,
    remote_reps=1,
    ssh_reps=3,
    channel_items=20_000,
    channel_reps=1,
    data_reps=5,
    limit=30.0,
)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _header(plan: Plan, quick: bool) -> str:
    py = f"{platform.python_implementation()} {platform.python_version()}"
    host = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    peers = ", ".join(
        f"{d} {_version(d)}" for d in ("offload", "loky", "pebble", "mpire", "Pyro5", "rpyc")
    )
    run = "quick run" if quick else "full run"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"offload benchmarks ({run}, {when}): {py} on {host}; {peers}. "
        f"Round trip: {plan.calls} calls after {plan.warmup} warm-up; deaths: "
        f"{plan.death_reps} each; timeouts: {plan.timeout_reps}; cold starts: {plan.cold_reps}; "
        f"pool of 2: {_runs(plan.pool_reps)} of {plan.pool_calls} calls, map: "
        f"{_runs(plan.map_reps)} at the best chunk size; pool cold starts: "
        f"{plan.pool_cold_reps}; fresh programs: {plan.fresh_reps}; pool failures: "
        f"{plan.pool_failure_reps} each; remote pool: "
        f"{_runs(plan.remote_reps)} of {plan.remote_pool_calls} calls."
    )


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def _log(message: str) -> None:
    print(f"benchmarks: {message}", file=sys.stderr, flush=True)


def run(plan: Plan, only: set[str]) -> list[Section]:
    sections: list[Section] = []
    if "roundtrip" in only:
        _log("round trip...")
        sections.append(
            Section(
                "Round trip, abs(-1) on a warm worker",
                "µs",
                roundtrip.run(plan.calls, plan.warmup, plan.rounds),
                floor="raw socketpair (floor)",
                target=Target("≤ 1.5x the raw floor", 1.5, relative=True),
            )
        )
    if "death" in only:
        _log("worker death...")
        by_mode = death.run(plan.death_reps, plan.give_up)
        for mode, rows in by_mode.items():
            sections.append(
                Section(
                    death.MODES[mode],
                    "ms",
                    rows,
                    floor=rows[0].system,
                    target=Target("≤ 5 ms", 0.005),
                )
            )
    if "timeout" in only:
        _log("per-call timeout...")
        sections.append(
            Section(
                "Timeout 100 ms on sleep(10): lateness",
                "ms",
                timeout.run(plan.timeout_reps, plan.give_up),
                target=Target("≤ 10 ms after the deadline", 0.010),
            )
        )
    if "coldstart" in only:
        _log("cold start...")
        sections.append(
            Section(
                "Cold start: create worker → first result",
                "ms",
                coldstart.run(plan.cold_reps),
                floor=coldstart.FLOOR,
                target=Target("≤ 1.5x bare python -c pass", 1.5, relative=True),
                notes=[note] if (note := coldstart.stale_bytecode_note()) else [],
            )
        )
    sections += _pool_sections(plan, only)
    if "remote" in only:
        _log("remote...")
        round_trip, throughput, notes = remote.run(
            plan.calls,
            plan.warmup,
            plan.rounds,
            pool_calls=plan.remote_pool_calls,
            reps=plan.remote_reps,
            limit=plan.limit,
        )
        sections.append(
            Section(
                "Remote round trip, abs(-1) over loopback",
                "µs",
                round_trip,
                floor=remote.LOCAL,
                subjects=(remote.CONNECT,),
                target=Target("≤ 2x the local round trip", 2.0, relative=True),
                notes=notes,
            )
        )
        sections.append(
            Section(
                f"Remote pool: {plan.remote_pool_calls} tiny calls submitted at once",
                "calls/s",
                throughput,
                floor=remote.LOCAL_POOL,
                subjects=(remote.HOSTS_POOL,),
            )
        )
    if "actors" in only:
        sections += _actor_sections(plan)
    if "channels" in only:
        sections += _channel_sections(plan)
    if "channel-async" in only:
        sections.append(_channel_async_section(plan))
    if "data" in only:
        sections += _data_sections(plan)
    if "waiting" in only:
        _log("every way of waiting...")
        sections += waiting.waiting_sections(
            plan.pool_calls, plan.pool_reps, plan.calls, plan.warmup, plan.rounds
        )
    if "by-value" in only:
        _log("functions that travel by value...")
        sections += waiting.function_sections(plan.calls, plan.warmup, plan.rounds)
    if "ssh" in only:
        _log("worker start over ssh...")
        sections.append(
            Section(
                "Worker start over ssh → first result (a new ssh connection each)",
                "ms",
                ssh.run(plan.ssh_reps),
                floor=ssh.FLOOR,
                subjects=(ssh.INSTALLED, ssh.ZERO_INSTALL),
                target=Target("≤ 1.5x bare ssh host python -c pass", 1.5, relative=True),
            )
        )
    return sections


def _data_sections(plan: Plan) -> list[Section]:
    _log("large data...")
    arrays, blobs = data.run_local(plan.data_reps)
    _log("large data over loopback...")
    remote_rows = data.run_remote(plan.data_reps)
    moved = "128 MiB moved per round trip"
    return [
        Section(
            "64 MiB NumPy array round trip to a local worker (MB/s)",
            "MB/s",
            arrays,
            floor=data.MEMCPY,
            target=Target("≥ 50% of an in-process memcpy (warm buffer)", 0.5, relative=True),
            notes=[moved],
        ),
        Section(
            "64 MiB bytes round trip to a local worker (MB/s)",
            "MB/s",
            blobs,
            floor=data.FRESH_BYTES,
            target=Target("≥ 50% of an in-process bytes(b) (fresh)", 0.5, relative=True),
            notes=[moved + "; a received bytes is a new object: bytes(b) is its floor"],
        ),
        Section(
            "64 MiB bytes round trip over loopback, offload serve (MB/s)",
            "MB/s",
            remote_rows,
            floor=data.RAW_TCP,
            subjects=(data.OFFLOAD_TCP, data.OFFLOAD_TLS),
            target=Target("≥ 70% of a raw TCP socket", 0.7, relative=True),
            notes=[moved],
        ),
    ]


def _channel_sections(plan: Plan) -> list[Section]:
    _log("channels...")
    rows = channels.run(plan.channel_items, plan.channel_reps)
    by_name = {row.system: row for row in rows}
    return [
        Section(
            f"Channel, {plan.channel_items} tiny items, {direction}",
            "items/s",
            [by_name[mine], by_name[theirs]],
            floor=theirs,
            subjects=(mine,),
            target=Target("≥ 2x multiprocessing.Queue", 2.0, relative=True),
            notes=[f"both bounded at {channels.MAXSIZE} items"],
        )
        for direction, mine, theirs in (
            ("worker → parent", channels.OFFLOAD_UP, channels.QUEUE_UP),
            ("parent → worker", channels.OFFLOAD_DOWN, channels.QUEUE_DOWN),
        )
    ]


def _channel_async_section(plan: Plan) -> Section:
    _log("async for over a channel in a call...")
    return Section(
        f"Channel, {plan.channel_items} tiny items, parent → a call's async for",
        "items/s",
        channel_async.run(plan.channel_items, plan.channel_reps),
        floor=channel_async.SYNC,
        subjects=(channel_async.ASYNC_INLINE, channel_async.ASYNC_THREADED),
        target=Target("≥ 0.5x a plain for loop in the call", 0.5, relative=True),
        notes=[f"bounded at {channel_async.MAXSIZE} items; no thread per item"],
    )


def _actor_sections(plan: Plan) -> list[Section]:
    _log("actors...")
    rows = actors.run(plan.calls, plan.warmup, plan.rounds)
    return [
        Section(
            "Actor call round trip, echo(1), sequential",
            "µs",
            rows,
            floor=actors.POOL,
            # The creator's calls take the worker's own channel: the target is theirs. A
            # holder's go through the actor's listener (TCP, a session, a thread).
            subjects=(actors.ACTOR,),
            target=Target("≤ a pool call to one worker", 1.0, relative=True),
        ),
        Section(
            "Actor calls/s, sequential (against Ray actors)",
            "calls/s",
            rows,
            floor=actors.RAY,
            subjects=(actors.ACTOR, actors.HOLDER),
            target=Target("≥ 2x Ray's (round trip ≤ half Ray's)", 2.0, relative=True),
        ),
    ]


def _pool_sections(plan: Plan, only: set[str]) -> list[Section]:
    sections: list[Section] = []
    if "pool-coldstart" in only:
        _log("pool: cold start...")
        sections.append(
            Section(
                "Pool of 2 cold start → first result: fresh interpreters",
                "ms",
                pool_coldstart.run_spawn(plan.pool_cold_reps),
                floor=pool_coldstart.SPAWN_FLOOR,
                subjects=("offload (spawn)",),
                target=Target("≤ 1.5x two bare python starts", 1.5, relative=True),
                # Said once: the single-worker cold start above carries the same note.
                notes=[note]
                if "coldstart" not in only and (note := coldstart.stale_bytecode_note())
                else [],
            )
        )
        sections.append(
            Section(
                "Pool of 2 cold start → first result: forks",
                "ms",
                pool_coldstart.run_fork(plan.pool_cold_reps),
                floor=pool_coldstart.FORK_FLOOR,
                subjects=("offload (fork)", "offload (forkserver, warm)"),
                target=Target("≤ 2x two bare forks", 2.0, relative=True),
            )
        )
    if "fresh-program" in only:
        sections += _fresh_sections(plan)
    if "pool-submit" in only:
        _log("pool: submit all, then wait all...")
        sections.append(
            Section(
                f"Pool of 2: {plan.pool_calls} tiny calls submitted at once",
                "calls/s",
                pool_throughput.run_submit(plan.pool_calls, plan.pool_reps, plan.limit),
                floor=pool_throughput.SUBMIT_FLOOR,
                subjects=("offload (spawn)", "offload (fork)"),
                target=Target("≥ 2x the best peer", 2.0, relative=True, best_peer=True),
            )
        )
    if "pool-map" in only:
        _log("pool: map...")
        rows = pool_throughput.run_map(plan.map_items, plan.map_reps, plan.chunksizes, plan.limit)
        sections.append(
            Section(
                f"Pool of 2: map over {plan.map_items} tiny items",
                "items/s",
                rows,
                floor=pool_throughput.MAP_FLOOR,
                target=Target("≥ the best peer", 1.0, relative=True, best_peer=True),
                notes=[
                    f"peers: the best of chunksize {', '.join(map(str, plan.chunksizes))}; "
                    f"sizes below {pool_throughput.SMALL_CHUNK} tried on a tenth of the items"
                ],
            )
        )
    if "pool-failure" in only:
        _log("pool: kill and timeout in a forkserver pool...")
        by_mode = pool_failures.run(plan.pool_failure_reps, plan.give_up)
        for mode, what in (("kill", "SIGKILL"), ("timeout", "timeout 100 ms")):
            errors, answers = by_mode[mode]
            since = "the kill" if mode == "kill" else "the deadline"
            sections.append(
                Section(
                    f"Forkserver pool of 1: {what} → error",
                    "ms",
                    errors,
                    target=Target(f"≤ 10 ms after {since}", 0.010),
                )
            )
            sections.append(
                Section(
                    f"Forkserver pool of 1: {what} → replacement answers",
                    "ms",
                    answers,
                    target=Target(f"≤ 20 ms after {since}", 0.020),
                )
            )
    return sections


def _fresh_sections(plan: Plan) -> list[Section]:
    _log("fresh programs (whole processes)...")
    rows = pool_coldstart.run_fresh(plan.fresh_reps)
    return [
        Section(
            "Fresh program: import offload (whole process)",
            "ms",
            rows["import"],
            floor=pool_coldstart.BARE,
            subjects=(pool_coldstart.IMPORT_LESS_BARE,),
            target=Target("≤ 10 ms", 0.010),
            notes=[note] if (note := coldstart.stale_bytecode_note()) else [],
        ),
        Section(
            "Fresh program: import, Pool(2), first result, shutdown; fork (whole process)",
            "ms",
            rows["fork"],
            floor=pool_coldstart.PPE_FORK,
            subjects=(pool_coldstart.OFFLOAD_FORK,),
            target=Target("≤ 1.2x ProcessPoolExecutor(2), same program", 1.2, relative=True),
        ),
        Section(
            "Fresh program: import, Pool(2), first result, shutdown; spawn (whole process)",
            "ms",
            rows["spawn"],
            floor=pool_coldstart.SPAWN_FLOOR,
            subjects=(pool_coldstart.OFFLOAD_SPAWN,),
            target=Target("≤ 1.5x two bare python starts", 1.5, relative=True),
        ),
    ]


def _reap_leftovers() -> None:
    """Kill (by pid) any process this run started that is still alive."""
    try:
        import psutil
    except ImportError:
        return
    # multiprocessing's and loky's resource trackers are meant to outlive their pools:
    # they exit by themselves when this process exits (end of file on their pipe).
    # So are the forkserver templates (offload's and multiprocessing's): they exit when
    # their control channel from this process closes.
    children = [
        proc
        for proc in psutil.Process().children(recursive=True)
        if not any("resource_tracker" in part or "forkserver" in part for part in _cmdline(proc))
    ]
    if not children:
        return
    _, alive = psutil.wait_procs(children, timeout=1.0)
    for proc in alive:
        try:
            _log(f"killing leftover process {proc.pid} ({' '.join(proc.cmdline())[:80]})")
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2.0)


def _cmdline(proc: Any) -> list[str]:
    try:
        return list(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone or not ours to read
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure offload against its peers and a raw floor; print one table.",
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--only", action="append", choices=NAMES, help="run only this benchmark (repeatable)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    started = time.perf_counter()
    try:
        sections = run(plan, set(args.only or NAMES))
    finally:
        _reap_leftovers()
    header = _header(plan, args.quick)
    render = report.render_markdown if args.markdown else report.render_text
    print(render(sections, header))
    _log(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

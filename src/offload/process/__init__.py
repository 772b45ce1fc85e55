"""Starting, watching, killing and reaping worker processes.

Each module stands above what it imports (no import runs back up)::

    launch      LaunchSpec and launch(): the switch on the start method
    forkserver  the template process that forks workers on request   (uses fork)
    spawn       spawn and reexec: a fresh interpreter, started as Popen would
    forkexec    start_process(): Popen's fork_exec without importing subprocess
    fork        fork, and become_worker(), which a forked child runs
    child       ChildProcess: pidfd, output pipes, killing, reaping;
                popen() and the popen/fork lock
    spec        LaunchSpec itself (the forkserver's template unpickles it)
"""

"""The worker side: what runs inside a worker process. Imports nothing from the client.

``loop`` (the main loop: reading calls, running them, sending results) stands above
``execution`` (running one call, no I/O), ``lifeline`` (dying with the parent, taking
the tasks' subprocesses along) and ``settings`` (what the parent tells the worker);
``batch`` runs a chunk of ``Pool.map`` items as one call.
"""

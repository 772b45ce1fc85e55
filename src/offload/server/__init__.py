"""The worker server (``offload serve``): authenticated remote clients, isolated calls.

* ``main.py``: the process around it: serve until SIGTERM/SIGINT, drain, exit status.
* ``server.py``: :class:`~offload.server.server.Server`: listening, admission, the
  registry of sessions, the drain, the status report.
* ``gate.py``: accepting connections and driving every handshake in one thread.
* ``session.py``: one authenticated client: its calls relayed, its answers relabelled.
* ``inline.py``: ``--isolation inline``: calls run on threads of the server process.

Imports point one way: ``main`` → ``server`` → ``gate``, ``session``, ``inline``; those
import nothing of the server's. The server depends on the client side (its pool of
child workers is an ``Engine``), on the worker side (the inline runner's
``Execution``) and on the transport; nothing depends on it but the CLI and
``offload.program``.
"""

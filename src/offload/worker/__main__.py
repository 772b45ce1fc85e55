"""Entry point of a ``spawn`` worker: ``python -m offload.worker``; with arguments
(``--connect HOST:PORT --token-file F``), a worker started by hand
(:mod:`offload.worker.attach`)."""

import sys

if len(sys.argv) > 1:
    from offload.worker.attach import main

    main()
else:
    from offload.worker.loop import run_worker

    run_worker()

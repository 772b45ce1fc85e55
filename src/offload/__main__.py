"""``python -m offload``: the ``offload`` command (:mod:`offload.cli`), for where the
console script is not on ``PATH``, and for ``python -m pdb -m offload replay FILE``."""

import sys

from offload.cli import main

if __name__ == "__main__":
    sys.exit(main())

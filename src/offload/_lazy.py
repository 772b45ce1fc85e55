"""Type checks that do not import the type's module.

``import offload`` and a fresh program's first local pool stay fast because the modules
only some programs need (remote servers, ssh, TLS, tasks) are imported when first used.
Code on the common path still has to ask "is this value an ``offload.SSH``?"; a value
can only be an instance of a class whose module has been imported already, so
:func:`instance_of` answers from :data:`sys.modules` without importing anything.
"""

from __future__ import annotations

import sys


def instance_of(value: object, module: str, name: str) -> bool:
    """``isinstance(value, module.name)``, False without importing ``module`` when no
    one has imported it yet (then no instance of its classes can exist)."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, name))

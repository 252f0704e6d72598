"""Sub-commands of the ``blindspot`` CLI: each module has ``register(subparsers)``; see :mod:`blindspot.cli`."""

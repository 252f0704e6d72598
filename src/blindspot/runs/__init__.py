"""Run layer: run folders, record loops and the Python entry points behind the commands (fnaf, invariances, audit)."""

"""The devices of the ``gdbstub run`` machine, one module each (pure classes, no VM calls)."""

"""Run the ``gdbstub`` command with the hvf backend bound to the C shim (tests only).

    python tests/shim/run_stub.py run KERNEL --backend hvf ...

The shim (``hvshim.c``) exports Hypervisor.framework's C symbols and forwards them to KVM, so
``gdbstub run`` exercises the ctypes binding in ``gdbstub/hv/hvf.py`` end to end on Linux.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

from shim import hvshim  # noqa: E402

from gdbstub.__main__ import main  # noqa: E402

if __name__ == "__main__":
    os.environ["GDBSTUB_HVF_LIBRARY"] = str(hvshim.load(1100))
    sys.exit(main(sys.argv[1:]))

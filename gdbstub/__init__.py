"""gdbstub: a GDB/LLDB remote stub for x86-64 guests on Hypervisor.framework vCPUs.

``gdbstub.hv`` is the framework API (on hvf, KVM or a software vCPU); the debug target,
the RSP server and the ``gdbstub run`` machine are built on it.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

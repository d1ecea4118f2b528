"""HvError: a framework status other than HV_SUCCESS, raised by every ``gdbstub.hv`` call."""

from __future__ import annotations

from .constants import HV_RETURN_NAMES


class HvError(Exception):
    """A ``hv_*`` call returned a status other than HV_SUCCESS.

    ``code`` is the ``hv_return_t`` (an unsigned 32-bit value such as ``HV_BAD_ARGUMENT``),
    ``call`` the name of the framework call, ``detail`` what went wrong in words.
    """

    def __init__(self, code: int, call: str, detail: str = "") -> None:
        self.code = code & 0xFFFFFFFF
        self.call = call
        self.detail = detail
        name = HV_RETURN_NAMES.get(self.code, f"0x{self.code:08x}")
        message = f"{call}: {name}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)

    @property
    def name(self) -> str:
        """The symbolic name of ``code`` (``HV_BAD_ARGUMENT``...)."""
        return HV_RETURN_NAMES.get(self.code, f"0x{self.code:08x}")

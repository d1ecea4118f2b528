"""Fixtures shared by the test modules: ``hv_backend`` runs a gdbstub.hv test on every backend.

A test that requests ``hv_backend`` (directly, through ``pytestmark = usefixtures(...)``, or
through ``hvguest.hv_vm``) runs once per backend :func:`hvguest.backend_params` lists: ``kvm``,
``emu`` and ``hvf-shim`` (gdbstub.hv.hvf over tests/shim, forwarding to KVM) on this machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hvguest import backend_params

from gdbstub import hv


@pytest.fixture(scope="module", params=backend_params())
def _backend_param(request: pytest.FixtureRequest) -> str:
    """Module-scoped so that pytest groups a module's tests by backend."""
    return str(request.param)


@pytest.fixture
def hv_backend(_backend_param: str) -> Iterator[str]:
    """Make ``_backend_param`` the ``gdbstub.hv`` backend for one test; yields its name."""
    hv._reset_for_tests()
    if _backend_param != "hvf-shim":
        hv.select_backend(_backend_param)
        try:
            yield _backend_param
        finally:
            hv._reset_for_tests()
        return
    from shim import hvshim

    try:
        with hvshim.installed(1100):
            yield _backend_param
        assert not hvshim.HOST.unexpected, "\n".join(hvshim.HOST.unexpected)
    finally:
        hvshim.HOST.unexpected.clear()
        hvshim.HOST.reset_kvm()  # the next test starts on a fresh KVM behind the shim
        hv._reset_for_tests()

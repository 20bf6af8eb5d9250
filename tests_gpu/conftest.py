"""GPU tests: with flash-attn-4 installed, ``backend="auto"`` runs its CuTe DSL kernels in most tests,
and that DSL stack raises DeprecationWarnings of its own while it compiles a kernel (seen with 4.0.0b15
and nvidia-cutlass-dsl 4.4.2). pyproject turns warnings into errors; here, and only with flash-attn-4
importable, DeprecationWarnings are ignored. The CPU suite, which never imports it, keeps them errors."""

import importlib.util

import pytest


def pytest_collection_modifyitems(items):
    try:
        flash = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:
        flash = False
    if flash:
        for item in items:
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))

"""pytest plugin: run stable-pretraining's own tests with distprobe's OnlineProbe in place of its own.

``python -m pytest -p tests.compat.spt_substitute <stable_pretraining/tests/...>``: every way those tests reach the
class (``stable_pretraining.callbacks.OnlineProbe``, ``...callbacks.probe.OnlineProbe``, ``stable_pretraining.
OnlineProbe``) then yields distprobe's, and stable-pretraining's own subclass ``OnlineImageDecoder`` is defined again
over it. The report header names the class in use, so a run can be checked.
"""

from __future__ import annotations

import importlib

import pytest
from tests.compat.torchvision_cpu_ops import install

_CLASS = pytest.StashKey[type]()


def substitute() -> type:
    """Put distprobe's OnlineProbe wherever stable-pretraining exposes its own; return it."""
    install()
    import stable_pretraining as spt
    import stable_pretraining.callbacks as callbacks
    import stable_pretraining.callbacks.probe as probe

    from distprobe.callbacks import OnlineProbe

    callbacks.OnlineProbe = OnlineProbe
    probe.OnlineProbe = OnlineProbe
    spt.OnlineProbe = OnlineProbe  # a real attribute: the package's lazy __getattr__ is no longer asked
    # Its subclass OnlineImageDecoder bound the class at import: defined again, it subclasses distprobe's.
    import stable_pretraining.callbacks.image_decoder as image_decoder

    callbacks.OnlineImageDecoder = importlib.reload(image_decoder).OnlineImageDecoder
    return OnlineProbe


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_CLASS] = substitute()


def pytest_report_header(config: pytest.Config) -> str:
    cls = config.stash[_CLASS]
    return f"OnlineProbe substituted: {cls.__module__}.{cls.__qualname__}"

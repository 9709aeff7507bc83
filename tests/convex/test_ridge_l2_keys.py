"""Two lambdas that format alike (``l2={l2:g}``, 6 significant digits) are refused where they are given.

Before: ``l2=(1e-4, 1.000001e-4, 1.0)`` was accepted; online, the second lambda's top-1 overwrote the first's under
``eval/ridge/l2=0.0001_top1`` (one number logged for two solutions), and the service published two rows of the same
(probe, head, metric), which the store's primary key refuses.
"""

from __future__ import annotations

import pytest

from distprobe.callbacks import OnlineRidge
from distprobe.convex import RidgeConfig
from distprobe.service.config import EvalConfig, ServiceConfigError

ALIKE = (1e-4, 1.000001e-4, 1.0)
MESSAGE = r"ridge 'ridge': argument 'l2' got .*0.0001 and 0.0001000001 share the logged key 'l2=0.0001'.*drop all"


def test_the_config_refuses_two_lambdas_logged_under_one_key():
    with pytest.raises(ValueError, match=MESSAGE):
        RidgeConfig(name="ridge", num_classes=3, l2=ALIKE)
    assert RidgeConfig(name="ridge", num_classes=3, l2=(1e-4, 1.00001e-4)).l2 == (1e-4, 1.00001e-4)


def test_the_callback_refuses_them():
    with pytest.raises(ValueError, match=MESSAGE):
        OnlineRidge(None, "ridge", input="embedding", target="label", num_classes=3, l2=ALIKE)


def test_the_service_refuses_them_when_the_file_is_loaded():
    stand_in = {"_target_": "tests.service.models.labeled"}
    options = {"num_classes": 3, "backbone": stand_in, "data": {"train": stand_in, "val": stand_in}}
    with pytest.raises(ServiceConfigError, match=r"eval.yaml: probes.ridge: " + MESSAGE):
        EvalConfig.from_dict({**options, "probes": {"ridge": {"l2": list(ALIKE)}}}, source="eval.yaml")

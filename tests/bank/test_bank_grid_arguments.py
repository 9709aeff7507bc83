"""The grid arguments of banks, kNNs and ridge probes as users write them: numpy and torch numbers, single values.

Before the fix ``weight_decay=np.float32(0.0)`` raised ``TypeError: 'numpy.float32' object is not iterable``,
``normalization=True`` ``TypeError: 'bool' object is not iterable``, ``lr="0.1"`` a ``could not convert string to
float: '.'`` (the string iterated character by character), and ``k=torch.tensor(3)`` or ``l2=torch.tensor(1.0)``
``TypeError: iteration over a 0-d tensor``: none named the probe or the argument. Numbers of any kind are now taken
as numbers; the rest is refused by name, with what is expected. Configs only: no Trainer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distprobe.bank import BankConfig
from distprobe.convex.ridge_config import RidgeConfig
from distprobe.knn.config import KNNConfig


def _bank(**grid) -> BankConfig:
    return BankConfig(name="grid", inputs=["embedding"], num_classes=3, **grid)


@pytest.mark.parametrize(
    ("grid", "lr", "weight_decay"),
    [
        ({"lr": np.float32(0.5), "weight_decay": np.float32(0.0)}, [0.5], [0.0]),
        ({"lr": torch.tensor(0.5), "weight_decay": torch.tensor([0.0, 1e-4])}, [0.5], [0.0, 1e-4]),
        ({"lr": np.logspace(-2, -1, 2), "weight_decay": 0}, [0.01, 0.1], [0.0]),
    ],
    ids=["numpy_scalars", "torch_tensors", "numpy_array"],
)
def test_a_bank_takes_numbers_of_any_kind(grid, lr, weight_decay):
    config = _bank(**grid)
    assert config.lr == pytest.approx(lr) and config.weight_decay == pytest.approx(weight_decay)
    assert all(type(v) is float for v in [*config.lr, *config.weight_decay])


@pytest.mark.parametrize(
    ("argument", "value"),
    [("lr", "0.1"), ("lr", [0.1, "fast"]), ("lr", math.inf), ("lr", True), ("weight_decay", None), ("lr", [0.1, 0.1])],
)
def test_a_bank_refuses_what_is_not_a_list_of_numbers_by_name(argument, value):
    with pytest.raises(
        ValueError, match=rf"^bank 'grid': argument '{argument}' got .*; expected a number or a non-empty"
    ):
        _bank(**{argument: value})


def test_a_bank_refuses_a_normalization_that_is_neither_a_name_nor_a_list():
    with pytest.raises(
        ValueError, match=r"^bank 'grid': argument 'normalization' got True; expected None, 'batchnorm'"
    ):
        _bank(normalization=True)
    assert _bank(normalization=("batchnorm",)).normalization == ["batchnorm"]


@pytest.mark.parametrize("k", [torch.tensor(3), np.array([3, 5]), np.int64(3), "10"])
def test_a_knn_refuses_k_that_is_not_python_ints_by_name(k):
    # numpy and torch integers are refused as every count is (distprobe.arguments); the message says how to convert.
    convert = r" \(numpy or torch integers: convert them with int\(\)\)\." if not isinstance(k, str) else r"\."
    with pytest.raises(ValueError, match=rf"^kNN 'knn': argument 'k' got .*; expected an int >= 1 .*{convert}$"):
        KNNConfig(name="knn", num_classes=3, queue_length=64, k=k)


def test_a_ridge_takes_numpy_numbers_and_refuses_a_tensor_or_a_bool_by_name():
    assert RidgeConfig(name="ridge", num_classes=3, l2=np.float32(0.5)).l2 == (0.5,)
    for l2 in (torch.tensor(1.0), True, "1"):
        with pytest.raises(ValueError, match=r"^ridge 'ridge': argument 'l2' got .*; expected one or more finite"):
            RidgeConfig(name="ridge", num_classes=3, l2=l2)


def test_a_bank_given_an_optimizer_instance_names_its_type_and_what_it_takes():
    # The message printed the optimizer's repr, a dozen lines of its param group.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(
        ValueError, match=r"^bank 'grid': argument 'optimizer' got a SGD; expected one of .* no optimizer"
    ) as err:
        _bank(optimizer=optimizer)
    assert "\n" not in str(err.value)

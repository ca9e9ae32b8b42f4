"""The built-in tensor handler and loading handlers by import path."""

from __future__ import annotations

import pytest
import torch

import weightbank as wb
from weightbank.serving import TensorHandler, load_handler
from weightbank.serving.handler import Handler, count_nonfinite, load_object
from weightbank.serving.tiers import OutOfMemoryError


def handler() -> TensorHandler:
    return TensorHandler(lambda info: torch.nn.Linear(2, 3), input_shape=(None, 2))


def test_round_trip() -> None:
    h = handler()
    x = h.decode([[1, 2], [3.5, 4]])
    assert x.dtype == torch.float32 and x.shape == (2, 2)
    out = h.encode(h.predict(torch.nn.Identity(), x))
    assert out == [[1.0, 2.0], [3.5, 4.0]]
    assert h.encode((torch.ones(1), {"a": torch.zeros(1)})) == [[1.0], {"a": [0.0]}]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ([[1, 2, 3]], "shape"),
        ([1, 2], "shape"),
        ([[1, 2], [3]], "ragged"),
        ([[True, 2]], "numbers only"),
        ([[None, 2]], "numbers only"),
        ([["a", 2]], "nested lists"),
        ({"x": 1}, "nested lists"),
        ("[[1, 2]]", "nested lists"),
        ([[float("nan"), 1]], "finite"),
        ([[[[[[[[[[1]]]]]]]]]], "deeper"),
        ([[10**400, 1]], "do not fit float32"),  # an int beyond float range: OverflowError before
        ([[1e300, 1]], "finite in float32"),  # a finite double that is inf in float32
        ([[-(10**39), 1]], "finite in float32"),
    ],
)
def test_bad_inputs_are_invalid_requests(payload: object, match: str) -> None:
    with pytest.raises(wb.InvalidRequest, match=match):
        handler().decode(payload)


def test_integer_inputs_must_fit_the_dtype() -> None:
    h = TensorHandler(lambda info: torch.nn.Embedding(8, 2), dtype=torch.long)
    assert h.decode([[1, 7]]).dtype == torch.long
    for payload in ([[2**63, 1]], [[10**400, 1]]):
        with pytest.raises(wb.InvalidRequest, match="do not fit int64"):
            h.decode(payload)
    with pytest.raises(wb.InvalidRequest, match="rejected"):  # a token id past the vocabulary
        h.predict(torch.nn.Embedding(8, 2), h.decode([[1, 9]]))


class Hungry(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise OutOfMemoryError("CUDA out of memory (simulated)")


def test_out_of_memory_is_not_the_requests_fault() -> None:
    h = handler()
    with pytest.raises(OutOfMemoryError):
        h.predict(Hungry(), h.decode([[1, 2]]))


def test_out_of_memory_on_a_torch_without_torch_out_of_memory_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "OutOfMemoryError")  # as before torch 2.5, which the package supports
    h = handler()
    with pytest.raises(OutOfMemoryError):  # not an AttributeError from the except clause
        h.predict(Hungry(), h.decode([[1, 2]]))


def test_count_nonfinite() -> None:
    assert count_nonfinite([[1.0, 2.0], {"a": "x", "b": None, "c": True}]) == 0
    assert count_nonfinite([[float("nan"), float("-inf")], (float("inf"),)]) == 3
    with pytest.raises(TypeError, match="JSON"):
        count_nonfinite([{1, 2}])
    with pytest.raises(TypeError, match="key"):
        count_nonfinite({1: 2.0})


def test_element_limit_and_model_rejection() -> None:
    h = TensorHandler(lambda info: torch.nn.Linear(2, 2), max_elements=4)
    with pytest.raises(wb.InvalidRequest, match="limit"):
        h.decode([[1, 2, 3, 4, 5]])
    with pytest.raises(wb.InvalidRequest, match="rejected"):
        h.predict(torch.nn.Linear(2, 2), h.decode([[1, 2, 3]]))


def test_load_handler_by_import_path() -> None:
    h = load_handler("weightbank.serving.handler:_example_handler")
    assert isinstance(h, Handler) and isinstance(h, TensorHandler)
    assert load_object("math:pi") > 3
    for spec in ("nope", "no_such_module_xyz:H", "math:nothing", "math:pi", ":x"):
        with pytest.raises(wb.InvalidName):
            load_handler(spec)

"""Moving tensors between tiers, and the device out-of-memory error on every supported torch."""

from __future__ import annotations

import pytest
import torch

from weightbank.serving.tiers import OutOfMemoryError, out_of_memory_error, parse_device, to_device, to_host


def test_out_of_memory_error_is_torchs_top_level_name_when_it_has_one() -> None:
    if not hasattr(torch, "OutOfMemoryError"):
        pytest.skip("this torch predates torch.OutOfMemoryError (2.5)")
    assert out_of_memory_error() is torch.OutOfMemoryError
    assert OutOfMemoryError is torch.OutOfMemoryError


def test_out_of_memory_error_falls_back_to_torch_cuda_before_torch_2_5(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    assert out_of_memory_error() is torch.cuda.OutOfMemoryError
    try:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    except OutOfMemoryError as e:  # the clause itself works without torch.OutOfMemoryError
        assert "simulated" in str(e)


def test_cpu_tiers_share_one_tensor() -> None:
    dev = parse_device("cpu")
    t = torch.ones(3)
    assert to_host(t, dev) is t and to_device(t, dev) is t

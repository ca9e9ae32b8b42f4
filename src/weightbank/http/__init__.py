"""The HTTP server: a thin FastAPI shell over :class:`~weightbank.serving.ModelService`.

Example:
    >>> import torch, weightbank as wb
    >>> from fastapi.testclient import TestClient
    >>> from weightbank.http import create_app
    >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(2, 2).state_dict(), tags=["prod"])
    >>> svc = wb.ModelService(bank, wb.TensorHandler(lambda info: torch.nn.Linear(2, 2)), poll=0)
    >>> r = TestClient(create_app(svc, token="s3cret")).post("/v1/predict", json={"ref": "prod", "input": [[1, 2]]})
    >>> r.status_code, r.json()["checkpoint"] == bank.resolve("prod")
    (200, True)
"""

from __future__ import annotations

from .app import create_app
from .auth import load_token
from .metrics import ServingMetrics

__all__ = ["ServingMetrics", "create_app", "load_token"]

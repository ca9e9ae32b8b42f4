"""ModelService: a handler, a cache, routes and live tags — everything one request needs, without HTTP.

The HTTP app is a thin shell over this class; so is any in-process server.
Per request: pick a route's arm (if a route is named), resolve the ref through
the live tag snapshot, lease the checkpoint, run the handler, and return the
output with the id of the checkpoint that produced it.

Every failure of a request is a :class:`~weightbank.errors.WeightbankError`:
what the handler or the model raises is sorted into the request's fault
(InvalidRequest) or a server fault (HandlerError) as the
:mod:`~weightbank.serving.handler` module says, and an output holding NaN or
infinities is refused (NonFiniteOutput), so a server never answers with a
traceback or a silent ``null``.

Example:
    >>> import torch, weightbank as wb
    >>> from weightbank.serving import ModelService, TensorHandler
    >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(2, 2).state_dict(), tags=["prod"])
    >>> svc = ModelService(bank, TensorHandler(lambda info: torch.nn.Linear(2, 2)), poll=0)
    >>> _ = svc.router.set("ab", {"prod": 1})
    >>> p = svc.predict([[1.0, 2.0]], route="ab", key="user-1")
    >>> p.arm, len(p.output[0]), p.checkpoint == bank.resolve("prod")
    ('prod', 2, True)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..bank.bank import Bank
from ..bank.results import TagEvent
from ..errors import HandlerError, InvalidRequest, NonFiniteOutput, WeightbankError
from .cache import ModelCache
from .handler import Handler, count_nonfinite
from .live import LiveTags
from .results import Prediction
from .router import Router
from .tiers import OutOfMemoryError

__all__ = ["ModelService"]

RequestListener = Callable[[Prediction], None]

# What a handler raises that is the request's fault (a 4xx), by stage; anything else is a server fault.
_BAD_INPUT: tuple[type[Exception], ...] = (ValueError, TypeError, KeyError, IndexError, OverflowError)
_REJECTED_INPUT: tuple[type[Exception], ...] = (ValueError, IndexError, OverflowError)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


class ModelService:
    """Serve predictions for many checkpoints of one bank through one handler.

    Keyword arguments other than ``poll`` go to :class:`~weightbank.ModelCache`.
    ``poll`` is the tag-watch interval in seconds (0: only on ``refresh_tags``).
    """

    def __init__(self, bank: Bank, handler: Handler, *, poll: float = 1.0, **cache_options: Any) -> None:
        self.bank = bank
        self.handler = handler
        self.cache = ModelCache(bank, build=handler.build, **cache_options)
        self.router = Router()
        warmup = getattr(handler, "warmup", None)
        self.live = LiveTags(bank, self.cache, poll=poll, warmup=warmup if callable(warmup) else None)
        self._listeners: list[RequestListener] = []
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}

    def predict(
        self,
        payload: Any,
        *,
        ref: str | None = None,
        route: str | None = None,
        key: str | None = None,
        arm: str | None = None,
    ) -> Prediction:
        """Run one request on ``ref`` or on an arm of ``route``; a ``ref`` that names a route is that route.

        Example:
            >>> import torch, weightbank as wb
            >>> from weightbank.serving import ModelService, TensorHandler
            >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["v1"])
            >>> svc = ModelService(bank, TensorHandler(lambda info: torch.nn.Linear(1, 1)), poll=0)
            >>> svc.predict([[0.5]], ref="v1").ref
            'v1'
        """
        t0 = time.perf_counter()
        if ref is not None and route is None and ref in self.router:
            ref, route = None, ref
        if (ref is None) == (route is None):
            raise InvalidRequest("name exactly one of ref (a checkpoint or tag) and route", "ref")
        if arm is not None and route is None:
            raise InvalidRequest("arm overrides a route's draw; name a route too", "arm")
        try:
            inputs = self.handler.decode(payload)
        except WeightbankError:
            raise
        except _BAD_INPUT as e:
            raise InvalidRequest(f"bad input: {_short(e)}", "input") from None
        except Exception as e:
            raise HandlerError("decode", type(e).__name__, _short(e)) from e
        chosen = arm
        if route is not None:
            pick = self.router.pick(route, key=key, arm=arm)
            ref, chosen = pick.arm, pick.arm
        if ref is None:  # for the type checker; a route always picks an arm
            raise InvalidRequest("no ref", "ref")
        cid = self.live.resolve(ref)
        t1 = time.perf_counter()
        lease = self.cache.lease(cid)
        with lease as model:
            t2 = time.perf_counter()
            outputs = self._run(model, inputs, cid)
        output = self._encode(outputs, cid)
        t3 = time.perf_counter()
        result = Prediction(
            output=output,
            checkpoint=cid,
            ref=ref,
            route=route,
            arm=chosen,
            timings={"resolve": t1 - t0, "lease": t2 - t1, "model": t3 - t2},
        )
        with self._lock:
            self.requests[cid] = self.requests.get(cid, 0) + 1
            listeners = list(self._listeners)
        for listener in listeners:
            listener(result)
        return result

    def _run(self, model: nn.Module, inputs: Any, cid: str) -> Any:
        try:
            return self.handler.predict(model, inputs)
        except WeightbankError:
            raise
        except OutOfMemoryError as e:
            raise HandlerError("predict", type(e).__name__, _short(e), checkpoint=cid, transient=True) from e
        except _REJECTED_INPUT as e:
            raise InvalidRequest(f"the model rejected the input: {_short(e)}", "input") from None
        except Exception as e:
            raise HandlerError("predict", type(e).__name__, _short(e), checkpoint=cid) from e

    def _encode(self, outputs: Any, cid: str) -> Any:
        try:
            output = self.handler.encode(outputs)
            nonfinite = count_nonfinite(output)
        except WeightbankError:
            raise
        except Exception as e:
            raise HandlerError("encode", type(e).__name__, _short(e), checkpoint=cid) from e
        if nonfinite:
            raise NonFiniteOutput(nonfinite, cid)
        return output

    def on_request(self, listener: RequestListener) -> None:
        """Call ``listener(prediction)`` after every successful request (for metrics)."""
        with self._lock:
            self._listeners.append(listener)

    # -- tags --------------------------------------------------------------------------
    def set_tag(self, name: str, ref: str, *, why: str = "", expect: Any = None) -> TagEvent:
        """Move tag ``name`` to ``ref`` in the bank, then warm the target and flip traffic to it.

        ``expect`` (an id) makes the move conditional on the tag's current target.
        """
        kwargs: dict[str, Any] = {"why": why}
        if expect is not None:
            kwargs["expect"] = expect
        event = self.bank.tag(name, ref, **kwargs)
        self.live.refresh()
        return event

    def rollback_tag(self, name: str, steps: int = 1, *, why: str = "") -> TagEvent:
        """Roll tag ``name`` back ``steps`` targets in the bank, then warm and flip."""
        event = self.bank.rollback(name, steps, why=why)
        self.live.refresh()
        return event

    def served_tags(self) -> Mapping[str, str]:
        """Tag → checkpoint as requests resolve them right now."""
        return self.live.snapshot()

    def close(self) -> None:
        """Stop the tag watcher and release every checkpoint."""
        self.live.close()
        self.cache.close()

"""Routes: sticky by key, weights respected, overrides, validation."""

from __future__ import annotations

from collections import Counter

import pytest

import weightbank as wb
from weightbank.serving import Router


def test_same_key_same_arm_while_weights_are_unchanged() -> None:
    r = Router()
    r.set("tts", {"prod": 90, "canary": 10})
    first = {f"user-{i}": r.pick("tts", key=f"user-{i}").arm for i in range(500)}
    for _ in range(3):
        assert {k: r.pick("tts", key=k).arm for k in first} == first
    assert all(r.pick("tts", key=k).how == "sticky" for k in list(first)[:5])
    fresh = Router()
    fresh.set("tts", {"prod": 90, "canary": 10})  # another replica agrees
    assert {k: fresh.pick("tts", key=k).arm for k in first} == first


def test_weights_are_respected() -> None:
    r = Router()
    r.set("ab", {"a": 70, "b": 20, "c": 10})
    keyed = Counter(r.pick("ab", key=str(i)).arm for i in range(20000))
    drawn = Counter(r.pick("ab").arm for _ in range(20000))
    for counts in (keyed, drawn):
        assert counts["a"] / 20000 == pytest.approx(0.7, abs=0.02)
        assert counts["b"] / 20000 == pytest.approx(0.2, abs=0.02)
        assert counts["c"] / 20000 == pytest.approx(0.1, abs=0.02)


def test_zero_weight_arm_is_never_drawn_but_can_be_forced() -> None:
    r = Router()
    r.set("ab", {"prod": 1, "shadow": 0})
    assert {r.pick("ab", key=str(i)).arm for i in range(2000)} == {"prod"}
    pick = r.pick("ab", arm="shadow")
    assert (pick.arm, pick.how) == ("shadow", "override")


def test_shifting_weight_moves_only_some_keys() -> None:
    r = Router()
    r.set("ab", {"prod": 90, "canary": 10})
    before = {str(i): r.pick("ab", key=str(i)).arm for i in range(2000)}
    r.set("ab", {"prod": 80, "canary": 20})
    after = {k: r.pick("ab", key=k).arm for k in before}
    assert all(after[k] == "canary" for k, v in before.items() if v == "canary")  # canary keys stay
    moved = sum(before[k] != after[k] for k in before)
    assert 0.05 < moved / 2000 < 0.15


@pytest.mark.parametrize(
    "arms",
    [
        {},
        {"a": -1},
        {"a": 0},
        {"a": float("nan")},
        {"a": float("inf")},
        {"a": True},
        {"a": "1"},
        {"a": "90"},
        {"a": None},
        {"": 1},
        {"a": 1e308, "b": 1e308},  # each finite, the sum overflows
        {"a": 10**400},  # an int beyond float range
    ],
)
def test_bad_routes_are_refused(arms: dict[str, object]) -> None:
    with pytest.raises(wb.InvalidRequest):
        Router().set("r", arms)  # type: ignore[arg-type]


def test_huge_but_summable_weights_split_by_share() -> None:
    r = Router()
    r.set("ab", {"a": 8e307, "b": 8e307})  # sum 1.6e308 is finite: an even split
    keyed = Counter(r.pick("ab", key=str(i)).arm for i in range(4000))
    assert keyed["a"] / 4000 == pytest.approx(0.5, abs=0.05)


def test_names_lookup_and_delete() -> None:
    r = Router()
    with pytest.raises(wb.InvalidName):
        r.set("../x", {"a": 1})
    with pytest.raises(wb.RouteNotFound) as err:
        r.pick("missing")
    assert isinstance(err.value, KeyError)
    r.set("x", {"a": 1})
    with pytest.raises(wb.InvalidRequest, match="not an arm"):
        r.pick("x", arm="b")
    assert [route.name for route in r.routes()] == ["x"] and "x" in r
    assert r.delete("x").weights == {"a": 1.0}
    with pytest.raises(wb.RouteNotFound):
        r.delete("x")

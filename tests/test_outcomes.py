"""A handler's return value or exception, mapped to what happens to the message (issue 2)."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor_driver import Fail, Result, Retry
from conveyor_driver.outcomes import (
    BACKOFF_CAP,
    Action,
    Kind,
    Outcome,
    backoff,
    from_exception,
    from_return,
)


def test_result_constructors() -> None:
    assert Result.ok() == Result(True, "", None)
    assert Result.ok("built", data={"a": 1}) == Result(True, "built", {"a": 1})
    assert Result.fail("broken") == Result(False, "broken", None)
    assert Result.fail("broken", data=[1]) == Result(False, "broken", [1])


@pytest.mark.parametrize(
    "result",
    [Result.ok("built", data={"image": "app:1"}), Result.fail("red", data={"code": 2})],
)
def test_returned_result_is_published_as_is(result: Result) -> None:
    kind = Kind.SUCCESS if result.success else Kind.FAILURE
    assert from_return(result) == Outcome(kind, Action.ACK, result)


def test_none_is_success_with_an_empty_message() -> None:
    assert from_return(None) == Outcome(Kind.SUCCESS, Action.ACK, Result(True, "", None))


@pytest.mark.parametrize("value", [{"image": "app:1"}, [1, 2], "text", 0, False, 1.5])
def test_other_json_value_is_success_with_it_as_data(value: Any) -> None:
    assert from_return(value) == Outcome(Kind.SUCCESS, Action.ACK, Result(True, "", value))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (object(), "data: object of type object is not JSON"),
        ({1, 2}, "data: object of type set is not JSON"),
        (Result.ok(data=object()), "data: object of type object is not JSON"),
        ({"o": object()}, 'data["o"]: object of type object is not JSON'),
        ({"a": [1, {"b": {3}}]}, 'data["a"][1]["b"]: object of type set is not JSON'),
        ({"n": [2**70]}, 'data["n"][0]: integer exceeds 64-bit range'),
        ({"m": {1: "x"}}, 'data["m"]: key 1 of type int is not a string'),
    ],
)
def test_data_that_is_not_json_is_a_failure_naming_the_path(value: Any, problem: str) -> None:
    outcome = from_return(value)
    assert outcome == Outcome(
        Kind.FAILURE,
        Action.ACK,
        Result(False, f"handler returned data that is not JSON: {problem}", None),
    )


def test_fail_with_data_that_is_not_json_keeps_its_message_and_names_the_path() -> None:
    outcome = from_exception(Fail("bad spec", data={"why": object()}), 1, 3)
    assert outcome == Outcome(
        Kind.FAILURE,
        Action.ACK,
        Result(
            False,
            'bad spec (data dropped, not JSON: data["why"]: object of type object is not JSON)',
            None,
        ),
    )


def test_fail_publishes_a_failure_and_acks() -> None:
    outcome = from_exception(Fail("bad spec", data={"field": "repo"}), 1, 3)
    assert outcome == Outcome(
        Kind.FAILURE, Action.ACK, Result(False, "bad spec", {"field": "repo"})
    )


def test_fail_on_the_last_attempt_is_still_a_plain_failure() -> None:
    outcome = from_exception(Fail("bad spec"), 3, 3)
    assert outcome == Outcome(Kind.FAILURE, Action.ACK, Result(False, "bad spec", None))


def test_fail_with_data_that_is_not_json_drops_the_data() -> None:
    outcome = from_exception(Fail("bad", data=object()), 1, 3)
    assert outcome.result == Result(
        False, "bad (data dropped, not JSON: data: object of type object is not JSON)", None
    )
    assert outcome.action is Action.ACK


@pytest.mark.parametrize("delay", [0.0, 2.5, 60.0])
def test_retry_with_a_delay_naks_with_that_delay_and_publishes_nothing(delay: float) -> None:
    outcome = from_exception(Retry("not ready", delay=delay), 1, 3)
    assert outcome == Outcome(Kind.RETRY, Action.NAK, None, delay)


def test_retry_with_a_negative_delay_is_clamped_to_zero() -> None:
    assert from_exception(Retry(delay=-5), 1, 3).delay == 0.0


@pytest.mark.parametrize(("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0)])
def test_retry_without_delay_uses_the_backoff(attempt: int, expected: float) -> None:
    outcome = from_exception(Retry("later"), attempt, 10)
    assert outcome == Outcome(Kind.RETRY, Action.NAK, None, expected)


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0)]
)
def test_other_exception_naks_with_exponential_backoff(attempt: int, expected: float) -> None:
    outcome = from_exception(RuntimeError("flaky"), attempt, 100)
    assert outcome == Outcome(Kind.RETRY, Action.NAK, None, expected)


def test_backoff_is_capped() -> None:
    assert backoff(9) == 256.0
    assert backoff(10) == BACKOFF_CAP
    assert backoff(50) == BACKOFF_CAP
    assert from_exception(RuntimeError(), 40, 100).delay == BACKOFF_CAP


def test_backoff_never_goes_below_the_base() -> None:
    assert backoff(0) == 1.0


def test_exception_at_max_attempts_gives_up_naming_the_exception() -> None:
    outcome = from_exception(ValueError("bad repo url"), 3, 3)
    assert outcome == Outcome(
        Kind.GAVE_UP,
        Action.TERM,
        Result(False, "gave up after 3 attempts: ValueError: bad repo url", None),
    )


def test_exception_without_text_is_named_by_its_type() -> None:
    outcome = from_exception(KeyError(), 1, 1)
    assert outcome.result == Result(False, "gave up after 1 attempt: KeyError", None)
    assert outcome.action is Action.TERM


def test_attempts_beyond_max_also_give_up() -> None:
    outcome = from_exception(RuntimeError("boom"), 5, 3)
    assert outcome.kind is Kind.GAVE_UP
    assert outcome.action is Action.TERM


@pytest.mark.parametrize("retry", [Retry("not ready"), Retry("not ready", delay=5)])
def test_retry_at_the_last_attempt_gives_up_too(retry: Retry) -> None:
    outcome = from_exception(retry, 3, 3)
    assert outcome == Outcome(
        Kind.GAVE_UP,
        Action.TERM,
        Result(False, "gave up after 3 attempts: Retry: not ready", None),
    )


def test_giving_up_names_every_attempt_that_really_ran() -> None:
    earlier = ("ValueError: first", "the driver stopped mid-run (no outcome recorded)")
    outcome = from_exception(ValueError("third"), 3, 3, earlier)
    assert outcome == Outcome(
        Kind.GAVE_UP,
        Action.TERM,
        Result(
            False,
            "gave up after 3 attempts: attempt 1: ValueError: first; "
            "attempt 2: the driver stopped mid-run (no outcome recorded); "
            "attempt 3: ValueError: third",
            None,
        ),
    )

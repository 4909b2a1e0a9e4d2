"""`daemon.policy.RetryPolicy`: which failed attempt is retried, after how long, and the message
of one that gives up. Pure: one row per case. (`classify` has its own table in
tests/daemon/test_failure_classifier.py.)"""

from __future__ import annotations

import pytest

from daemon.config import Settings
from daemon.policy import Failure, GiveUp, Retry, RetryPolicy

OOM = Failure(code="cuda_oom", transient=True)
CRASH = Failure(code="worker_crash", transient=True)
BAD = Failure(code="bad_input", transient=False)
POLICY = RetryPolicy(max_attempts=3, backoff_s=10.0, backoff_max_s=25.0)

DECISIONS: list[tuple[str, Failure, int, Retry | GiveUp]] = [
    ("first-transient-retries", OOM, 1, Retry(10.0)),
    ("second-doubles", CRASH, 2, Retry(20.0)),
    ("last-attempt-gives-up", OOM, 3, GiveUp("boom (gave up after 3 attempts)")),
    ("past-the-cap-gives-up", OOM, 7, GiveUp("boom (gave up after 7 attempts)")),
    ("permanent-gives-up-at-once", BAD, 1, GiveUp("boom")),
    ("permanent-keeps-its-message", BAD, 2, GiveUp("boom")),
]


@pytest.mark.parametrize(
    ("failure", "attempts", "expected"), [c[1:] for c in DECISIONS], ids=[c[0] for c in DECISIONS]
)
def test_decide(failure: Failure, attempts: int, expected: Retry | GiveUp) -> None:
    assert POLICY.decide(failure, attempts, "boom") == expected


@pytest.mark.parametrize(
    ("attempts", "delay_s"),
    [(0, 10.0), (1, 10.0), (2, 20.0), (3, 25.0), (40, 25.0)],
)
def test_backoff_doubles_up_to_the_cap(attempts: int, delay_s: float) -> None:
    assert POLICY.delay_s(attempts) == delay_s


def test_one_attempt_never_retries() -> None:
    once = RetryPolicy(max_attempts=1, backoff_s=10.0, backoff_max_s=600.0)
    assert once.decide(OOM, 1, "x") == GiveUp("x (gave up after 1 attempts)")


def test_from_settings_reads_the_three_keys() -> None:
    s = Settings(max_attempts=5, retry_backoff_s=2.0, retry_backoff_max_s=7.0)
    assert RetryPolicy.from_settings(s) == RetryPolicy(max_attempts=5, backoff_s=2.0, backoff_max_s=7.0)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (
            {"max_attempts": 0, "backoff_s": 1.0, "backoff_max_s": 1.0},
            "max_attempts must be at least 1, got 0",
        ),
        ({"max_attempts": 2, "backoff_s": -1.0, "backoff_max_s": 1.0}, "backoff_s -1.0"),
    ],
)
def test_bad_values_are_named(kwargs: dict[str, float], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]

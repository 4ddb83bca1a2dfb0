"""What the E2B SDK's errors mean to autopause: a call's outcome, and what a failed access check says."""

from __future__ import annotations

import httpx
import pytest
from e2b.exceptions import (
    AuthenticationException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    ServiceBusyException,
)
from e2b.exceptions import TimeoutException as E2BTimeout

from consumer.e2b_adapter import Access, AccessCheck, CallOutcome, access_of, classify
from consumer.errors import ConfigError, E2BError
from consumer.runner import access_problem


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (SandboxNotFoundException("x"), CallOutcome.GONE),
        (SandboxException("404: gone", status_code=404), CallOutcome.GONE),
        (AuthenticationException("401"), CallOutcome.FAILED),
        (RateLimitException("429"), CallOutcome.RETRYABLE),  # type: ignore[no-untyped-call]
        (ServiceBusyException("503"), CallOutcome.RETRYABLE),
        (SandboxException("500: boom", status_code=500), CallOutcome.RETRYABLE),
        (SandboxException("502: bad gateway", status_code=502), CallOutcome.RETRYABLE),
        (SandboxException("400: bad", status_code=400), CallOutcome.FAILED),
        (SandboxException("409: conflict", status_code=409), CallOutcome.FAILED),
        (E2BTimeout("timed out"), CallOutcome.RETRYABLE),
        (httpx.ReadTimeout("timed out"), CallOutcome.RETRYABLE),
        (httpx.ConnectError("refused"), CallOutcome.RETRYABLE),
        (httpx.RemoteProtocolError("eof"), CallOutcome.RETRYABLE),
        (TimeoutError(), CallOutcome.RETRYABLE),
        (ConnectionRefusedError(), CallOutcome.RETRYABLE),
        (ValueError("surprise"), CallOutcome.FAILED),
    ],
)
def test_classify(exc: BaseException, outcome: CallOutcome) -> None:
    assert classify(exc) is outcome


def _status(code: int) -> SandboxException:
    error = SandboxException(f"{code}: refused")
    error.status_code = code
    return error


@pytest.mark.parametrize(
    ("error", "access"),
    [
        (AuthenticationException("401: Unauthorized"), Access.BAD_KEY),
        (_status(403), Access.BAD_KEY),
        (httpx.ConnectError("Connection refused"), Access.UNREACHABLE),
        (httpx.ConnectTimeout("timed out"), Access.UNREACHABLE),
        (_status(404), Access.NOT_E2B),
        (_status(405), Access.NOT_E2B),
        (RateLimitException("429"), Access.UNSURE),  # type: ignore[no-untyped-call]
        (ServiceBusyException("503"), Access.UNSURE),
        (_status(500), Access.UNSURE),
        (httpx.ReadTimeout("timed out"), Access.UNSURE),
    ],
)
def test_what_an_access_check_error_says_of_the_key_and_url(error: Exception, access: Access) -> None:
    assert access_of(error) is access


def test_a_refused_key_is_a_setting_and_an_absent_api_a_service() -> None:
    url = "https://api.e2b.app"
    bad_key = access_problem(AccessCheck(Access.BAD_KEY, "401"), url)
    assert isinstance(bad_key, ConfigError) and "AUTOPAUSE_E2B_API_KEY" in str(bad_key)
    for access in (Access.UNREACHABLE, Access.NOT_E2B):
        problem = access_problem(AccessCheck(access, "x"), url)
        assert isinstance(problem, E2BError) and not isinstance(problem, ConfigError)
        assert "AUTOPAUSE_E2B_API_URL" in str(problem) and url in str(problem)
    assert access_problem(AccessCheck(Access.OK), url) is None
    assert access_problem(AccessCheck(Access.UNSURE, "503"), url) is None  # the pauses retry on their own

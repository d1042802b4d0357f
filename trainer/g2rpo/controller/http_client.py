"""The trainer's side of the controller service: a synchronous `GuidanceClient` over HTTP.

Rank 0 calls it once per step (the trainer is synchronous, so this is plain urllib: no event
loop, no dependency beyond the standard library). Transient failures (connection refused or
reset, timeouts, 5xx such as "still loading") are retried with exponential backoff and jitter
for at most `total_timeout` seconds; step reports are idempotent on the server, so a retry
after a lost answer is safe. Past that budget the client raises `ControllerUnavailable`: the
trainer must stop rather than train on with a stale guidance length.

Answers that retrying cannot fix fail at once, with the exceptions the in-process client raises:
409 is `StepConflict` (as `GuidanceController.report` raises it), other 4xx are
`ControllerRejected` (a ValueError naming the field).

The wire itself (bearer header, JSON, no proxy) is `ControllerConnection` (connection.py), which
the operator uses too.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.error
from collections.abc import Mapping
from http.client import HTTPException
from pathlib import Path
from typing import Any

from g2rpo.api.names import CONTROLLER_TOKEN_ENV, CONTROLLER_TOKEN_FILE_ENV, CONTROLLER_URL_ENV, GUIDANCE_PATH
from g2rpo.controller.connection import ControllerConnection
from g2rpo.controller.core import StepConflict

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def read_token(path: str | Path | None = None, env: Mapping[str, str] = os.environ) -> str:
    """The bearer token: from `path`, else the file named by $G2RPO_CONTROLLER_TOKEN_FILE, else
    $G2RPO_CONTROLLER_TOKEN. Surrounding whitespace (a Secret file's newline) is dropped."""
    path = path or env.get(CONTROLLER_TOKEN_FILE_ENV)
    token = Path(path).read_text().strip() if path else env.get(CONTROLLER_TOKEN_ENV, "").strip()
    if not token:
        where = f"the token file {path}" if path else f"${CONTROLLER_TOKEN_ENV} (or ${CONTROLLER_TOKEN_FILE_ENV})"
        raise ValueError(f"no controller token: {where} is empty or unset")
    return token


class ControllerUnavailable(RuntimeError):
    """The controller did not answer within the retry budget; the trainer must not go on."""

    def __init__(self, url: str, elapsed: float, attempts: int, last_error: str):
        self.url, self.last_error = url, last_error
        super().__init__(
            f"guidance controller {url} unavailable for {elapsed:.1f}s ({attempts} attempts); last error: "
            f"{last_error}. Stopping rather than training with a stale guidance length."
        )


class ControllerRejected(ValueError):
    """A 4xx answer other than a step conflict: the request is wrong and a retry would not help."""

    def __init__(self, status: int, message: str, field: str | None):
        self.status, self.field = status, field
        super().__init__(f"controller answered {status}" + (f" for field {field!r}" if field else "") + f": {message}")


class HttpGuidanceClient:
    """GuidanceClient (g2rpo.controller.client) backed by the controller service at `url`."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        total_timeout: float = 300.0,
        request_timeout: float = 10.0,
        initial_backoff: float = 0.2,
        max_backoff: float = 10.0,
    ):
        self.url = url.rstrip("/")
        self.total_timeout = total_timeout
        self.request_timeout = request_timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._connection = ControllerConnection(self.url, token)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **kwargs: Any) -> HttpGuidanceClient:
        """From $G2RPO_CONTROLLER_URL and the token variables (what the operator sets on rank 0)."""
        if not env.get(CONTROLLER_URL_ENV):
            raise ValueError(f"${CONTROLLER_URL_ENV} is not set")
        return cls(env[CONTROLLER_URL_ENV], read_token(env=env), **kwargs)

    def current(self) -> tuple[int, int]:
        answer = self._call("GET", GUIDANCE_PATH)
        return answer["step"], answer["length"]

    def report(self, step: int, reward: float, metrics: dict[str, float]) -> int:
        return self._call("POST", "/v1/steps", {"step": step, "reward": reward, "metrics": metrics})["nextLength"]

    def rewind(self, step: int) -> int:
        return self._call("POST", "/v1/rewind", {"step": step})["length"]

    def snapshot(self) -> dict[str, Any]:
        return self._call("GET", "/v1/state")["snapshot"]

    def restore(self, snapshot: dict[str, Any]) -> int:
        return self._call("POST", "/v1/restore", {"snapshot": snapshot})["length"]

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.url + path
        start = time.monotonic()
        deadline = start + self.total_timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                return self._connection.call(
                    method, path, body, timeout=max(0.05, min(self.request_timeout, remaining))
                )
            except urllib.error.HTTPError as exc:
                error = _error_body(exc)
                if exc.code == 409:
                    raise StepConflict(error.get("error", exc.reason)) from None
                if exc.code not in RETRYABLE_STATUS:
                    raise ControllerRejected(
                        exc.code, error.get("error", str(exc.reason)), error.get("field")
                    ) from None
                last_error = f"HTTP {exc.code}: {error.get('error', exc.reason)}"
            except (urllib.error.URLError, HTTPException, OSError) as exc:
                last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            delay = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControllerUnavailable(url, time.monotonic() - start, attempt, last_error)
            log.warning("%s %s failed (%s); retrying in %.2fs", method, url, last_error, min(delay, remaining))
            time.sleep(min(delay, remaining))


def _error_body(exc: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        body = json.loads(exc.read())
    except (ValueError, OSError):
        return {}
    return body if isinstance(body, dict) else {}

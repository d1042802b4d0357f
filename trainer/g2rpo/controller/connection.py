"""One small HTTP client for the controller's JSON API, shared by the trainer and the operator.

Standard library only: the operator imports this module, and its image holds neither torch nor the
trainer's other dependencies. A call sends the bearer token and JSON, and answers the decoded JSON.
The opener ignores http_proxy and friends: the controller is in-cluster (or on loopback), and a
proxy set for the internet must not see its token. Retrying is the caller's policy: the trainer
retries for minutes (http_client.py), the operator asks again at its next reconcile.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ControllerConnection:
    """The controller at base URL `url`, called with bearer `token`."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None, *, timeout: float) -> Any:
        """One request and its decoded JSON answer.

        An error status raises urllib.error.HTTPError (its body is the API's {"error", "field"}),
        no answer raises OSError (URLError, a timeout) or http.client.HTTPException, and an answer
        that is not JSON raises ValueError.
        """
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers)
        with _OPENER.open(request, timeout=timeout) as response:
            return json.loads(response.read())

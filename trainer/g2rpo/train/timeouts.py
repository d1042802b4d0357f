"""Timeouts that turn a hang of the trainer into an error, all derived from spec.runPolicy.stallTimeoutSeconds.

The most reported failure of GRPO with a vLLM server is a hang that never raises: a rank waits forever in
a collective, or rank 0 waits forever on an HTTP answer from vLLM. Two timeouts bound them in process:

- Collectives: the process group's timeout (transformers' `ddp_timeout`, 1800 s by default). It must reach
  the *first* `PartialState()`: accelerate builds the process group once and ignores the timeout of every
  later `PartialState(...)` (accelerate/state.py: `if not self.initialized`), and `build_trainer` asks for
  the world size before TrainingArguments does.
- vLLM requests: TRL 1.16's VLLMClient (trl/generation/vllm_client.py) sends every request through a
  `requests.Session` with no timeout (its `connection_timeout` only bounds the first /health check), and
  retries reads up to `Retry.read` times. `bound_vllm_requests` gives the session's adapters a timeout, so
  that all attempts together end within the stall timeout.

What neither can bound is an NCCL weight broadcast to vLLM that blocks inside CUDA (vLLM's own communicator,
not a torch process group): the operator's stall detection (runPolicy.stallTimeoutSeconds) restarts the gang
then.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from g2rpo.api.spec import G2RPOJobSpec

if TYPE_CHECKING:
    import requests

DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 1800
"""transformers' TrainingArguments.ddp_timeout default, for jobs that turn stall detection off."""
CONNECT_TIMEOUT_SECONDS = 10.0
"""Opening a TCP connection to the rollout Service: seconds at most, or the server is gone."""


def collective_timeout_seconds(spec: G2RPOJobSpec) -> int:
    """How long a rank waits in a collective: a step that would not complete within the stall timeout has hung."""
    return spec.run_policy.stall_timeout_seconds or DEFAULT_COLLECTIVE_TIMEOUT_SECONDS


def collective_timeout(spec: G2RPOJobSpec) -> timedelta:
    return timedelta(seconds=collective_timeout_seconds(spec))


def vllm_read_timeout_seconds(spec: G2RPOJobSpec, read_retries: int) -> float:
    """Per attempt, so that the first attempt and its `read_retries` retries together end within the stall
    timeout (backoff sleeps aside, seconds against an hour)."""
    return collective_timeout_seconds(spec) / (1 + read_retries)


def bound_vllm_requests(session: requests.Session, spec: G2RPOJobSpec) -> float:
    """Give every adapter of `session` (TRL's VLLMClient.session) a default timeout, keeping its retry policy
    and pool size; returns the read timeout chosen."""
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        """An HTTPAdapter whose requests without a timeout get `timeout` (requests has no session-wide one)."""

        def __init__(self, timeout: tuple[float, float], **kwargs: Any):
            self.default_timeout = timeout
            super().__init__(**kwargs)

        def send(self, request, timeout=None, **kwargs):  # type: ignore[override]  # requests' signature
            return super().send(request, timeout=self.default_timeout if timeout is None else timeout, **kwargs)

    read = 0.0
    for prefix, adapter in list(session.adapters.items()):
        if not isinstance(adapter, HTTPAdapter):
            continue
        retries = adapter.max_retries
        read = vllm_read_timeout_seconds(spec, int(retries.read or 0))
        bounded = TimeoutAdapter(
            (CONNECT_TIMEOUT_SECONDS, read),
            max_retries=retries,
            pool_connections=adapter._pool_connections,
            pool_maxsize=adapter._pool_maxsize,
        )
        session.mount(prefix, bounded)
    return read

"""What the operator reads from a job's guidance controller (g2rpo.controller.service).

One GET /v1/guidance (bearer token), through the client the trainer uses too
(g2rpo.controller.connection, standard library only), gives the step, the next guidance length and
the last step still in the history: its reward r_k, the schedule's driving reward (the accuracy
reward unless the job drives the schedule with another), and, for jobs with a code reward, which of
the sandbox's layers hold. A controller that does not answer yields None: the status keeps its
last known values. One that refuses the token raises TokenRefused: the token Secret its pod mounted is
not the one the operator wrote (the operator never reads it back: tokens.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from http.client import HTTPException
from urllib.error import HTTPError

from g2rpo.api.names import GUIDANCE_PATH
from g2rpo.controller.connection import ControllerConnection


@dataclass(frozen=True)
class ControllerReport:
    step: int
    length: int
    reward: float | None
    sandbox_layers: dict[str, bool] | None = None
    """Jobs with a code reward, once a step was reported: which of the sandbox's layers hold."""


class TokenRefused(Exception):
    """The controller answered 401 to the token the operator derives for the job."""


def read_controller(base_url: str, token: str, timeout: float) -> ControllerReport | None:
    try:
        guidance = ControllerConnection(base_url, token).call("GET", GUIDANCE_PATH, timeout=timeout)
        # A controller from before lastStep existed (mid-upgrade) still gives the step and the length.
        last = guidance.get("lastStep")
        return ControllerReport(
            step=int(guidance["step"]),
            length=int(guidance["length"]),
            reward=float(last["reward"]) if last else None,
            sandbox_layers=dict(last["sandboxLayers"]) if last and last["sandboxLayers"] else None,
        )
    except HTTPError as exc:
        if exc.code == 401:
            raise TokenRefused(f"{base_url} refused the job's token") from None
        return None
    except (OSError, HTTPException, ValueError, KeyError, TypeError):
        return None

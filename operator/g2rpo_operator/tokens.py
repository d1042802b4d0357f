"""The controllers' bearer tokens, derived, so that the operator never reads a job's Secret back.

Each job's token is HMAC-SHA256(signing key, "namespace/name/uid"): the operator computes it whenever
it calls the job's controller, and writes it once into the job's Secret (`<job>-token`), which the
controller and the trainer pods mount (the kubelet reads it, not the operator). Its RBAC therefore
grants `create` on Secrets and no read of any (get, list, watch, and patch or delete, whose answers
carry the object): the operator cannot read the cluster's Secrets. The one exception is its signing
key: a Secret in the operator's own namespace, read by name only (a Role with resourceNames), created
by the first replica that finds none. A Secret deleted by hand is created again with the same token,
so pods already running keep working; a new key (the key Secret deleted) gives every job a new token,
which running controllers refuse until their job restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from g2rpo_operator.kube import SECRETS, KubeApi, KubeError, Manifest

KEY_FIELD = "key"
KEY_BYTES = 32


def job_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    """The job's bearer token: 43 URL-safe characters, a different one for every job (uid included, so a
    job deleted and created again under its name gets a new token)."""
    digest = hmac.new(key, f"{namespace}/{name}/{uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def key_secret(namespace: str, name: str, key: bytes) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "g2rpo", "app.kubernetes.io/component": "operator"},
        },
        "type": "Opaque",
        "data": {KEY_FIELD: base64.b64encode(key).decode()},
    }


def load_signing_key(api: KubeApi, namespace: str, name: str) -> bytes:
    """The signing key from Secret `name` in `namespace`, created with a random key if absent (two
    replicas racing: the second one's create answers 409 and it reads the first one's key)."""
    for _ in range(2):
        found = api.get(SECRETS, namespace, name)
        if found is not None:
            return _decoded(found, namespace, name)
        try:
            api.create(key_secret(namespace, name, secrets.token_bytes(KEY_BYTES)))
        except KubeError as exc:
            if exc.status != 409:
                raise
    raise KubeError(0, f"Secret {namespace}/{name} (the token signing key) exists but cannot be read")


def _decoded(secret: Manifest, namespace: str, name: str) -> bytes:
    encoded = (secret.get("data") or {}).get(KEY_FIELD)
    key = base64.b64decode(encoded) if encoded else b""
    if len(key) < KEY_BYTES:
        raise KubeError(
            0,
            f"Secret {namespace}/{name} holds no usable token signing key (data.{KEY_FIELD}: at least {KEY_BYTES} "
            "bytes, base64); delete it and the operator creates a new one",
        )
    return key

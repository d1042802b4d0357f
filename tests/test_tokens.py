"""Controller tokens without reading Secrets (g2rpo_operator/tokens.py): the operator derives each job's
token from a signing key, creates the job's Secret once and never reads it back; the key is the one
Secret it reads, by name. KMock (tests/kmock_support.py) stands in for the API server, with the
dry-run create the operator uses to ask whether a user's Secret exists."""

from __future__ import annotations

import asyncio
import base64
import re

import pytest
from test_operator_kmock import all_children, condition, make_available, token, wait_for

from g2rpo.api.spec import parse_spec
from g2rpo.controller.service import GuidanceService, ServiceConfig, start_server
from g2rpo.guidance.schedule import ScheduleParams
from g2rpo_operator.kube import KubeApi, KubeError
from g2rpo_operator.settings import OperatorSettings
from g2rpo_operator.tokens import KEY_BYTES, job_token, key_secret, load_signing_key

from kmock_support import SECRETS, free_port
from operator_fixtures import NAMESPACE, job_manifest

KEY = bytes(range(KEY_BYTES))

pytestmark = pytest.mark.asyncio


async def test_a_token_is_per_job_and_per_key():
    first = job_token(KEY, "ml", "qwen", "uid-1")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", first)
    assert job_token(KEY, "ml", "qwen", "uid-1") == first  # recreating the Secret gives the same token
    others = {
        job_token(KEY, "ml", "qwen", "uid-2"),  # the job deleted and created again under its name
        job_token(KEY, "ml", "llama", "uid-1"),
        job_token(KEY, "other", "qwen", "uid-1"),
        job_token(bytes(KEY_BYTES), "ml", "qwen", "uid-1"),
    }
    assert len(others) == 4 and first not in others


async def test_the_signing_key_is_created_once_and_shared(cluster):
    api, again = KubeApi.for_url(cluster.url), KubeApi.for_url(cluster.url)
    key = await asyncio.to_thread(load_signing_key, api, "g2rpo-system", "g2rpo-operator-token-key")
    assert len(key) == KEY_BYTES
    assert await asyncio.to_thread(load_signing_key, again, "g2rpo-system", "g2rpo-operator-token-key") == key
    creates = cluster.emulator[lambda r: r.method == "POST" and r.resource == SECRETS]
    assert len(creates) == 1


async def test_a_broken_signing_key_is_named_with_the_fix(cluster):
    broken = key_secret("g2rpo-system", "g2rpo-operator-token-key", b"short")
    await cluster.emulator.create_object(SECRETS, "g2rpo-system", broken)
    with pytest.raises(KubeError, match=r"g2rpo-system/g2rpo-operator-token-key holds no usable.*delete it"):
        await asyncio.to_thread(
            load_signing_key, KubeApi.for_url(cluster.url), "g2rpo-system", "g2rpo-operator-token-key"
        )


async def test_the_job_secret_holds_the_derived_token_and_comes_back_the_same(cluster, start_operator):
    """The Secret the pods mount holds exactly the token the operator derives (its calls to the controller
    present that one: test_operator_kmock's controller tests read the Secret's), and a Secret deleted by
    hand is created again, with the same token, at the next full pass."""
    await cluster.create_claim()
    running = await start_operator()
    job = await cluster.apply(job_manifest())
    await all_children(cluster)
    stored = cluster.emulator.stored(SECRETS, "g2rpo-system", OperatorSettings().token_key_secret)
    key = base64.b64decode(stored["data"]["key"])
    expected = job_token(key, NAMESPACE, "demo", job["metadata"]["uid"])
    assert token(cluster) == expected
    await cluster.emulator.delete_object(SECRETS, NAMESPACE, "demo-token")
    reconciler = running.operator.reconciler
    await asyncio.to_thread(reconciler.reconcile, cluster.job(), True)  # a resync pass
    assert token(cluster) == expected


async def test_env_from_secret_is_found_without_reading_it(cluster, start_operator):
    """spec.envFromSecret is looked up by a dry-run create: missing until the user creates it, and the
    operator neither reads it nor creates it."""
    await cluster.create_claim()
    await start_operator()
    await cluster.apply(job_manifest(envFromSecret="hf-token"))
    await wait_for(lambda: condition(cluster, "ReferencesResolved").get("status") == "False", what="missing")
    assert cluster.emulator.stored(SECRETS, NAMESPACE, "hf-token") is None  # the dry run stored nothing
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "data": {"HF_TOKEN": "eA=="}}
    await cluster.emulator.create_object(SECRETS, NAMESPACE, secret)
    await all_children(cluster)
    await wait_for(lambda: condition(cluster, "ReferencesResolved").get("status") == "True", what="resolved")
    operator_asked = [
        (r.method, r.params.get("dryRun"))
        for r in cluster.emulator[lambda r: r.resource == SECRETS]
        if not r.headers.get("User-Agent", "").startswith("kmock")
        and (r.name == "hf-token" or (isinstance(r.data, dict) and r.data["metadata"]["name"] == "hf-token"))
    ]
    assert operator_asked and set(operator_asked) == {("POST", "All")}
    assert cluster.emulator.stored(SECRETS, NAMESPACE, "hf-token")["data"] == {"HF_TOKEN": "eA=="}


async def test_a_foreign_token_secret_is_reported_as_a_conflict(cluster, start_operator, tmp_path):
    """A Secret of the token's name that was there before the job: the operator cannot read it, but the
    job's controller (the real service), started with the token it holds, refuses the operator's
    derived token, and the job says which object is in the way."""
    port = free_port()
    labels = {"app.kubernetes.io/instance": "demo"}  # e.g. left by a tool copying an old job's objects
    foreign = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-token", "labels": labels}}
    foreign["data"] = {"token": base64.b64encode(b"xyz").decode()}
    await cluster.emulator.create_object(SECRETS, NAMESPACE, foreign)
    await cluster.create_claim()
    await start_operator(controller_url_template=f"http://127.0.0.1:{port}")
    manifest = job_manifest()
    await cluster.apply(manifest)
    await all_children(cluster)
    params = ScheduleParams.from_spec(parse_spec(manifest["spec"]).guidance)
    config = ServiceConfig(job="demo", params=params, token=token(cluster), state_dir=tmp_path)
    assert token(cluster) == "xyz"  # the kubelet mounts the Secret that is there
    server = await start_server(GuidanceService(config), "127.0.0.1", port)
    try:
        await make_available(cluster, "demo-controller", "demo-rollout")
        await wait_for(lambda: condition(cluster, "Ready").get("reason") == "ChildConflict", what="the conflict")
        assert "Secret demo-token exists and is not owned by this job" in condition(cluster, "Ready")["message"]
    finally:
        await server.close()

"""Reconciliation: what a G2RPOJob should have, what it has, and the status that follows.

Level-triggered: every pass reads the children afresh and moves them one step towards the
desired state, so a pass interrupted anywhere (operator killed between two creates) is completed
by the next one — creates that already happened answer 409 and are recognised as ours by their
ownerReference, nothing is created twice and nothing is left without an owner.

Decisions are pure functions over dicts: admission.py (can the spec run, which edits apply),
lifecycle.py (the phase, restarts, disruptions, the deadline), conditions.py (the status).
`Reconciler` is the thin shell around them: it reads the children and writes what they decide.

Rules worth knowing (the decisions' own are in their modules):
- The gang starts in order: the trainer Job is created only once the controller and the rollout
  Deployments are Available (with the current gang epoch), Ready=False WaitingForRollout until
  then. Under Volcano the Job is created with the rollout (the PodGroup must see every pod) and the
  trainer waits in process (vllm_server_timeout = rollout.startupTimeoutSeconds).
- The checkpoint claim must exist (or is created from checkpoint.volumeSize), must request
  ReadWriteMany when trainer.replicas > 1 (nothing is created otherwise) and is reported until Bound
  (condition StorageReady; pods are still created, since WaitForFirstConsumer classes bind only
  for a pod).
- Under Kueue (runPolicy.gangScheduler kueue) one Workload holds the GPU gang: the rollout
  Deployment and the trainer Job exist only while Kueue admits it (Ready=False Queued until then),
  and an eviction stops the gang as a disruption, then hands the quota back (kueue.py). A suspended
  or finished job's Workload is deleted, which returns its quota.
- Passes read through a watch-fed cache (cache.py) except every settings.resync_seconds, when they
  read everything from the API.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from kopf import append_owner_reference
from pydantic import ValidationError

from g2rpo.api.names import TOKEN_KEY
from g2rpo.api.spec import G2RPOJobSpec
from g2rpo_operator.admission import refused_edits, validate
from g2rpo_operator.builders import JobContext, child_keys, children, config
from g2rpo_operator.builders.common import GANG_EPOCH_ANNOTATION, child_name, job_labels
from g2rpo_operator.builders.gang import kueue_queue, trainer_waits_in_process
from g2rpo_operator.builders.storage import checkpoint_claim
from g2rpo_operator.cache import ObjectCache, View
from g2rpo_operator.conditions import Facts, claim_problems, invalid_status, job_status, pod_problems, status_patch
from g2rpo_operator.controller_client import ControllerReport, read_controller
from g2rpo_operator.kube import (
    CONFIGMAPS,
    DEPLOYMENTS,
    JOBS,
    PODS,
    PRIORITY_CLASSES,
    PVCS,
    SECRETS,
    KubeApi,
    KubeError,
    Manifest,
    Resource,
    resource_flavors,
    resource_of,
    resource_of_kind,
    workloads,
)
from g2rpo_operator.kueue import (
    Admission,
    Placement,
    admission_of,
    assigned_flavors,
    placements,
    pods_ready,
    release_quota,
)
from g2rpo_operator.lifecycle import Progress, deployment_available, progress, ready_count
from g2rpo_operator.settings import OperatorSettings

log = logging.getLogger(__name__)


def owned_by(obj: Manifest, uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller") for ref in obj["metadata"].get("ownerReferences") or [])


def _key(res: Resource, name: str) -> tuple[str, str]:
    return (res.kind, name)


class Reconciler:
    """One reconcile pass per call; safe to call again at any time (see the module docstring)."""

    def __init__(
        self,
        api: KubeApi,
        settings: OperatorSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        cache: ObjectCache | None = None,
    ):
        self.api = api
        self.settings = settings
        self.clock = clock
        self.cache = cache if cache is not None else ObjectCache()
        self.workloads = workloads(settings.kueue_api_version)
        self.flavors = resource_flavors(settings.kueue_api_version)

    def reconcile(self, body: Manifest, fresh: bool = True) -> Manifest | None:
        """Bring the job's children one step closer to its spec; returns the status patch (None: unchanged).
        `fresh` reads everything from the API; otherwise watched kinds come from the cache (cache.py)."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return None  # the garbage collector removes the children through their ownerReferences
        view = View(self.api, self.cache, fresh)
        name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
        prev = body.get("status") or {}
        now = self.clock()
        spec, errors = validate(name, body.get("spec"), self.settings)
        configmap = view.get(CONFIGMAPS, namespace, child_name(name, "config"))
        accepted = self._accepted(name, namespace, configmap)
        if spec is None and accepted is None:
            return status_patch(invalid_status(errors, prev, now, generation), prev)
        ctx, refused = self._effective(name, namespace, spec, accepted)
        observed = self._observe(view, ctx, configmap)
        ctx, missing = self._with_workload_priority(view, ctx)
        missing += self._missing_references(view, ctx)
        claim = (
            view.get(PVCS, namespace, ctx.spec.checkpoint.volume_claim) if ctx.spec.checkpoint.volume_claim else None
        )
        storage = claim_problems(claim, ctx.spec.checkpoint.volume_claim or "", ctx.spec.trainer.replicas)
        job = observed.get(_key(JOBS, ctx.child("trainer")))
        pods = view.list(PODS, namespace, job_labels(name))
        trainer_pods = [pod for pod in pods if job is not None and owned_by(pod, job["metadata"]["uid"])]
        workload = observed.get(_key(self.workloads, ctx.child("gang")))
        kueue = admission_of(workload, kueue_queue(ctx)) if ctx.spec.run_policy.gang_scheduler == "kueue" else None
        prog = progress(ctx.spec, prev, job, trainer_pods, now, evicted=kueue.evicted if kueue else None)
        waiting_for = self._waiting_for(ctx, observed, prog.gang_epoch)
        token = self._token(observed.get(_key(SECRETS, ctx.token_name)), body["metadata"]["uid"])
        blocked = bool(missing) or (storage is not None and storage[0] == "ClaimNotShared")
        conflicts = self._apply(
            view,
            ctx,
            body,
            observed,
            prog,
            token or secrets.token_urlsafe(32),
            create=not blocked,
            with_trainer=trainer_waits_in_process(ctx) or not waiting_for,
            admitted=self._admitted(view, workload, kueue),
        )
        if kueue and kueue.evicted is not None and workload is not None:
            self._release_when_stopped(view, ctx, observed, workload, now)
        elif kueue and kueue.admitted and workload is not None and prog.active:
            self._patch_workload_status(view, workload, pods_ready(workload, prog.phase == "Running", now))
        report = self._read_controller(ctx, observed, token)
        facts = Facts(
            progress=prog,
            spec=ctx.spec,
            checkpoint_dir=ctx.checkpoint_dir,
            generation=generation,
            spec_errors=errors,
            refused=refused,
            missing=missing,
            conflicts=conflicts,
            storage=storage,
            problems=pod_problems(pods) if prog.active else [],
            waiting_for=waiting_for if job is None else [],
            trainer_ready=f"{ready_count(job)}/{ctx.spec.trainer.replicas}" if job is not None else "",
            report=report,
            kueue=kueue if prog.active else None,
        )
        return status_patch(job_status(facts, prev, now), prev)

    def _admitted(self, view: View, workload: Manifest | None, kueue: Admission | None) -> dict[str, Placement] | None:
        """What `children` needs of Kueue: the placement per pod set once admitted, else None (no gang)."""
        if kueue is None:
            return {}
        if not kueue.admitted or workload is None:
            return None
        return placements(workload, {name: view.get(self.flavors, "", name) for name in assigned_flavors(workload)})

    def _release_when_stopped(
        self, view: View, ctx: JobContext, observed: dict[tuple[str, str], Manifest], workload: Manifest, now: datetime
    ) -> None:
        """Hand an evicted Workload's quota back once neither the trainer Job nor the rollout Deployment
        (deleted in the foreground: their pods go first) is left; Kueue then requeues it."""
        if _key(JOBS, ctx.child("trainer")) in observed or _key(DEPLOYMENTS, ctx.child("rollout")) in observed:
            return
        self._patch_workload_status(view, workload, release_quota(workload, "evicted", now))

    def _patch_workload_status(self, view: View, workload: Manifest, patch: Manifest | None) -> None:
        """Write the Workload's status only over the version this pass read (its conditions are replaced
        whole, and Kueue writes them too); on a conflict the change's watch event brings another pass."""
        if patch is None:
            return
        meta = workload["metadata"]
        try:
            view.patch(
                self.workloads,
                meta["namespace"],
                meta["name"],
                {"metadata": {"resourceVersion": meta.get("resourceVersion")}, **patch},
                "status",
            )
        except KubeError as exc:
            if exc.status != 409:
                raise

    def _effective(
        self, name: str, namespace: str, spec: G2RPOJobSpec | None, accepted: JobContext | None
    ) -> tuple[JobContext, list[str]]:
        """What runs, and the refused edits: the proposed spec, unless it is invalid or edits a fixed
        field; then the accepted one, as a whole (never half of an edit)."""
        if spec is None:
            assert accepted is not None
            return accepted, []
        proposed = JobContext.resolve(name, namespace, spec, self.settings)
        if accepted is None:
            return proposed, []
        refused = refused_edits(accepted.spec, proposed.spec)
        return (accepted, refused) if refused else (proposed, [])

    def _read_controller(
        self, ctx: JobContext, observed: dict[tuple[str, str], Manifest], token: str | None
    ) -> ControllerReport | None:
        """The controller's report, asked only once its Deployment is available (no pointless timeouts)."""
        if not token or not deployment_available(observed.get(_key(DEPLOYMENTS, ctx.child("controller")))):
            return None
        template = self.settings.controller_url_template
        url = template.format(name=ctx.name, namespace=ctx.namespace) if template else ctx.controller_url
        return read_controller(url, token, self.settings.http_timeout_seconds)

    def _accepted(self, name: str, namespace: str, configmap: Manifest | None) -> JobContext | None:
        document = config.accepted_spec(configmap) if configmap else None
        if document is None:
            return None
        try:
            return JobContext(name, namespace, G2RPOJobSpec.model_validate(document), self.settings)
        except ValidationError:
            log.warning(
                "job %s/%s: its ConfigMap's accepted spec no longer parses; using the current spec", namespace, name
            )
            return None

    def _observe(self, view: View, ctx: JobContext, configmap: Manifest | None) -> dict[tuple[str, str], Manifest]:
        found = {_key(CONFIGMAPS, ctx.config_name): configmap} if configmap else {}
        for key in child_keys(ctx, active=True):
            res = resource_of_kind(key[0], self.settings.kueue_api_version)
            if key not in found and res is not CONFIGMAPS:
                obj = view.get(res, ctx.namespace, key[1])
                if obj is not None:
                    found[key] = obj
        return found

    def _with_workload_priority(self, view: View, ctx: JobContext) -> tuple[JobContext, list[str]]:
        """A Kueue job naming a PriorityClass: its Workload carries the class's value, read here (the
        class is cluster-scoped; a missing one is reported like any missing reference)."""
        name = ctx.spec.run_policy.priority_class_name
        if not name or ctx.spec.run_policy.gang_scheduler != "kueue":
            return ctx, []
        found = view.get(PRIORITY_CLASSES, "", name)
        if found is None:
            return ctx, [
                f"PriorityClass {name!r} (spec.runPolicy.priorityClassName) not found; "
                f"retrying every {self.settings.poll_seconds:g} s"
            ]
        return replace(ctx, workload_priority=int(found.get("value") or 0)), []

    def _missing_references(self, view: View, ctx: JobContext) -> list[str]:
        """Objects the spec names but the job does not own: they must exist before any pod can start.
        A missing claim with checkpoint.volumeSize is created instead (see checkpoint_claim)."""
        checkpoint = ctx.spec.checkpoint
        if (
            checkpoint.volume_claim
            and checkpoint.volume_size
            and view.get(PVCS, ctx.namespace, checkpoint.volume_claim) is None
        ):
            try:
                view.create(checkpoint_claim(ctx))
            except KubeError as exc:
                if exc.status != 409:
                    raise
        wanted = [
            (PVCS, checkpoint.volume_claim, "spec.checkpoint.volumeClaim"),
            (SECRETS, ctx.spec.env_from_secret, "spec.envFromSecret"),
            (SECRETS, checkpoint.credentials_secret, "spec.checkpoint.credentialsSecret"),
        ]
        return [
            f"{res.kind} {name!r} ({field}) not found in namespace {ctx.namespace!r}; "
            f"retrying every {self.settings.poll_seconds:g} s"
            for res, name, field in wanted
            if name and view.get(res, ctx.namespace, name) is None
        ]

    @staticmethod
    def _token(secret: Manifest | None, uid: str) -> str | None:
        """The controller token from the job's own Secret (never from a same-named foreign one)."""
        if secret is None or not owned_by(secret, uid):
            return None
        encoded = (secret.get("data") or {}).get(TOKEN_KEY)
        return base64.b64decode(encoded).decode() if encoded else None

    @staticmethod
    def _waiting_for(ctx: JobContext, observed: dict[tuple[str, str], Manifest], gang_epoch: int) -> list[str]:
        """The Deployments the trainer must wait for: the controller, and the rollout of this gang epoch."""
        epochs = {"controller": None, "rollout": gang_epoch}
        return [
            f"{component} Deployment {ctx.child(component)}"
            for component, epoch in epochs.items()
            if not deployment_available(observed.get(_key(DEPLOYMENTS, ctx.child(component))), epoch)
        ]

    def _apply(
        self,
        view: View,
        ctx: JobContext,
        owner: Manifest,
        observed: dict[tuple[str, str], Manifest],
        prog: Progress,
        token: str,
        create: bool,
        with_trainer: bool,
        admitted: dict[str, Placement] | None,
    ) -> list[str]:
        """Create what is missing, update what may change, delete the trainer when due (and, under Kueue,
        the gang and the Workload when they may not run); returns conflicts."""
        uid = owner["metadata"]["uid"]
        desired = children(ctx, token, prog.active, prog.gang_epoch, with_trainer and not prog.delete_trainer, admitted)
        retired = [(JOBS, ctx.child("trainer"))] if prog.delete_trainer else []
        if ctx.spec.run_policy.gang_scheduler == "kueue":
            wanted = {_key(resource_of(m), m["metadata"]["name"]) for m in desired}
            retired += [
                (res, name)
                for res, name in ((DEPLOYMENTS, ctx.child("rollout")), (self.workloads, ctx.child("gang")))
                if _key(res, name) not in wanted
            ]
        for res, name in retired:
            current = observed.get(_key(res, name))
            if current is not None and owned_by(current, uid) and not current["metadata"].get("deletionTimestamp"):
                # Foreground: the object disappears only after its pods, so a new attempt never overlaps the old one.
                view.delete(res, ctx.namespace, name, propagation="Foreground")
        conflicts: list[str] = []
        for manifest in desired:
            res = resource_of(manifest)
            name = manifest["metadata"]["name"]
            current = observed.get(_key(res, name))
            if current is None:
                if not create:
                    continue
                current = self._create(view, manifest, owner)
                if current is None:
                    continue
            if not owned_by(current, uid):
                conflicts.append(f"{res.kind} {name}")
            else:
                self._update(view, res, current, manifest)
        return conflicts

    def _create(self, view: View, manifest: Manifest, owner: Manifest) -> Manifest | None:
        """Create; on 409 return what is there (ours from an interrupted pass, or a conflict to report).

        Ownership is kopf.append_owner_reference, not kopf.adopt: adopt also copies the job's labels
        onto its children, and a Kueue queue label on a job would then make Kueue manage them all.
        """
        append_owner_reference(manifest, owner=owner)  # type: ignore[arg-type]  # kopf types a Body but reads only .get(): a dict works
        try:
            view.create(manifest)
            return None
        except KubeError as exc:
            if exc.status != 409:
                raise
        meta = manifest["metadata"]
        return View(view.api, view.cache, fresh=True).get(resource_of(manifest), meta["namespace"], meta["name"])

    def _update(self, view: View, res: Resource, current: Manifest, desired: Manifest) -> None:
        """Only what may change on a live child: Deployment scale, the rollout's gang epoch, and the
        ConfigMap's accepted spec.

        Pod templates are otherwise never rewritten: that would restart vLLM or the controller mid-run
        (and a Job's template is immutable); placement fields are therefore not in MUTABLE_FIELDS.
        The gang-epoch annotation is the one deliberate exception: raising it replaces the vLLM pod.
        """
        meta = current["metadata"]
        if res is DEPLOYMENTS:
            patch: Manifest = {}
            if current["spec"].get("replicas") != desired["spec"]["replicas"]:
                patch["replicas"] = desired["spec"]["replicas"]
            wanted = (desired["spec"]["template"]["metadata"].get("annotations") or {}).get(GANG_EPOCH_ANNOTATION)
            have = (current["spec"]["template"]["metadata"].get("annotations") or {}).get(GANG_EPOCH_ANNOTATION)
            if wanted is not None and wanted != have:
                patch["template"] = {"metadata": {"annotations": {GANG_EPOCH_ANNOTATION: wanted}}}
            if patch:
                view.patch(res, meta["namespace"], meta["name"], {"spec": patch})
        elif res is CONFIGMAPS and current.get("data") != desired["data"]:
            view.patch(res, meta["namespace"], meta["name"], {"data": desired["data"]})

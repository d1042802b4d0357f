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
  then. Under Volcano and Kueue the Job is created with the rollout (the PodGroup must see every pod;
  Kueue's waitForPodsReady times the whole gang) and the trainer waits in process
  (vllm_server_timeout = rollout.startupTimeoutSeconds); Running then also needs the rollout Available.
- The checkpoint claim must exist (or is created from checkpoint.volumeSize), must request
  ReadWriteMany (nothing is created otherwise: see claim_problems) and is reported until Bound
  (condition StorageReady; pods are still created, since WaitForFirstConsumer classes bind only
  for a pod).
- Under Kueue (runPolicy.gangScheduler kueue) one Workload holds the GPU gang: the rollout
  Deployment and the trainer Job exist only while Kueue admits it (Ready=False Queued until then),
  and an eviction stops the gang as a disruption, then hands the quota back (kueue.py). A suspended
  or finished job's Workload is deleted, which returns its quota.
- Stopping keeps vLLM for the trainer's last step: while an unfinished trainer Job exists (being
  deleted in the foreground, its pods finishing a step and a save within
  runPolicy.terminationGracePeriodSeconds), the rollout Deployment is neither scaled down, deleted nor
  replaced (a new gang epoch); that happens on the pass after the Job is gone (or has finished).
- Passes read through a watch-fed cache (cache.py) except every settings.resync_seconds, when they
  read everything from the API.
- Every pass brings the owned children back to what the builders render, where the API allows it
  (drift.py): a manual edit or an operator settings change reaches Services, NetworkPolicies, the
  PodGroup and a Workload Kueue holds no quota for, as it reaches the Deployments' scale.
- A write the API server refuses (RBAC, an admission webhook or policy, a quota: `KubeError.refused`)
  does not fail the pass: it is reported (ChildrenSynced=False, APIRefused, naming the object and
  the server's message), nothing later in creation order is created, and the daemon retries with a
  growing delay (handlers.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from kopf import append_owner_reference
from pydantic import ValidationError

from g2rpo.api.spec import G2RPOJobSpec
from g2rpo_operator.admission import refused_edits, validate
from g2rpo_operator.builders import JobContext, child_keys, children, config
from g2rpo_operator.builders.common import COMPONENT_LABEL, child_name, job_labels, placement_hints
from g2rpo_operator.builders.gang import kueue_queue, trainer_waits_in_process
from g2rpo_operator.builders.storage import checkpoint_claim
from g2rpo_operator.cache import ObjectCache, View
from g2rpo_operator.conditions import (
    Facts,
    claim_problems,
    creating,
    invalid_status,
    job_status,
    mount_problems,
    pod_problems,
    status_patch,
)
from g2rpo_operator.controller_client import ControllerReport, TokenRefused, read_controller
from g2rpo_operator.drift import drift_patch
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
    queued_by_kueue,
    release_quota,
)
from g2rpo_operator.lifecycle import Progress, deployment_available, progress, ready_count, trainer_outcome
from g2rpo_operator.settings import OperatorSettings
from g2rpo_operator.tokens import job_token, load_signing_key

log = logging.getLogger(__name__)


def owned_by(obj: Manifest, uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller") for ref in obj["metadata"].get("ownerReferences") or [])


def _key(res: Resource, name: str) -> tuple[str, str]:
    return (res.kind, name)


def refusal(verb: str, kind: str, name: str, exc: KubeError) -> str:
    """A refused write, for the ChildrenSynced condition: the object and the API server's own words."""
    return f"the API server refused to {verb} {kind} {name!r} (HTTP {exc.status}): {exc.detail}"


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
        self._signing_key: bytes | None = None
        self._signing_key_lock = threading.Lock()

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
        refusals: list[str] = []
        missing += self._missing_references(view, ctx, refusals)
        claim = (
            view.get(PVCS, namespace, ctx.spec.checkpoint.volume_claim) if ctx.spec.checkpoint.volume_claim else None
        )
        storage = claim_problems(claim, ctx.spec.checkpoint.volume_claim or "", ctx.spec.trainer.replicas)
        job = observed.get(_key(JOBS, ctx.child("trainer")))
        pods = view.list(PODS, namespace, job_labels(name))
        trainer_pods = [pod for pod in pods if job is not None and owned_by(pod, job["metadata"]["uid"])]
        rollout_pods = [pod for pod in pods if pod["metadata"].get("labels", {}).get(COMPONENT_LABEL) == "rollout"]
        workload = observed.get(_key(self.workloads, ctx.child("gang")))
        kueue = admission_of(workload, kueue_queue(ctx)) if ctx.spec.run_policy.gang_scheduler == "kueue" else None
        token = job_token(self.signing_key(), namespace, name, body["metadata"]["uid"])
        report, foreign = self._read_controller(ctx, observed, token)
        in_process = trainer_waits_in_process(ctx)
        epoch = int(prev.get("restarts") or 0) + int(prev.get("disruptions") or 0)
        rollout = observed.get(_key(DEPLOYMENTS, ctx.child("rollout")))
        prog = progress(
            ctx.spec,
            prev,
            job,
            trainer_pods,
            now,
            evicted=kueue.evicted if kueue else None,
            step=report.step if report else None,
            rollout_ready=not in_process or deployment_available(rollout, epoch),
            rollout_pods=rollout_pods,
        )
        waiting_for = self._waiting_for(ctx, observed, prog.gang_epoch)
        blocked = bool(missing) or (storage is not None and storage[0] == "ClaimNotShared")
        conflicts = self._apply(
            view,
            ctx,
            body,
            observed,
            prog,
            token,
            create=not blocked,
            with_trainer=in_process or not waiting_for,
            admitted=self._admitted(view, workload, kueue),
            refusals=refusals,
        )
        if kueue and kueue.evicted is not None and workload is not None:
            self._release_when_stopped(view, ctx, observed, workload, now, refusals)
        elif kueue and kueue.admitted and workload is not None and prog.active:
            self._patch_workload_status(view, workload, pods_ready(workload, prog.phase == "Running", now), refusals)
        facts = Facts(
            progress=prog,
            spec=ctx.spec,
            checkpoint_dir=ctx.checkpoint_dir,
            generation=generation,
            spec_errors=errors,
            refused=refused,
            missing=missing,
            conflicts=conflicts + foreign,
            storage=storage,
            problems=pod_problems(pods, placement_hints(ctx)) + self._mount_problems(namespace, pods)
            if prog.active
            else [],
            waiting_for=waiting_for if job is None or in_process else [],
            trainer_ready=f"{ready_count(job)}/{ctx.spec.trainer.replicas}" if job is not None else "",
            report=report,
            kueue=kueue if prog.active else None,
            api_refusals=tuple(refusals),
            queued_by_kueue=queued_by_kueue(
                [obj for key, obj in observed.items() if key[0] in ("Job", "Deployment")], namespace
            ),
        )
        return status_patch(job_status(facts, prev, now), prev)

    def _mount_problems(self, namespace: str, pods: list[Manifest]) -> list[tuple[str, str]]:
        """Why pods stay in ContainerCreating: their mount events, read (from the API, events are not
        watched) only while some pod of the job is there."""
        stuck = [pod for pod in pods if creating(pod)]
        if not stuck:
            return []
        events = self.api.list_events(namespace, [pod["metadata"]["name"] for pod in stuck])
        return [problem for pod in stuck for problem in mount_problems(pod, events)]

    def _admitted(self, view: View, workload: Manifest | None, kueue: Admission | None) -> dict[str, Placement] | None:
        """What `children` needs of Kueue: the placement per pod set once admitted, else None (no gang)."""
        if kueue is None:
            return {}
        if not kueue.admitted or workload is None:
            return None
        return placements(workload, {name: view.get(self.flavors, "", name) for name in assigned_flavors(workload)})

    def _release_when_stopped(
        self,
        view: View,
        ctx: JobContext,
        observed: dict[tuple[str, str], Manifest],
        workload: Manifest,
        now: datetime,
        refusals: list[str],
    ) -> None:
        """Hand an evicted Workload's quota back once neither the trainer Job nor the rollout Deployment
        (deleted in the foreground: their pods go first) is left; Kueue then requeues it."""
        if _key(JOBS, ctx.child("trainer")) in observed or _key(DEPLOYMENTS, ctx.child("rollout")) in observed:
            return
        self._patch_workload_status(view, workload, release_quota(workload, "evicted", now), refusals)

    def _patch_workload_status(
        self, view: View, workload: Manifest, patch: Manifest | None, refusals: list[str]
    ) -> None:
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
            if exc.refused:
                refusals.append(refusal("update the status of", "Workload", meta["name"], exc))
            elif exc.status != 409:
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

    def signing_key(self) -> bytes:
        """The key the controller tokens are derived from (tokens.py), read once (created if absent)."""
        with self._signing_key_lock:
            if self._signing_key is None:
                settings = self.settings
                self._signing_key = load_signing_key(self.api, settings.operator_namespace, settings.token_key_secret)
            return self._signing_key

    def _read_controller(
        self, ctx: JobContext, observed: dict[tuple[str, str], Manifest], token: str
    ) -> tuple[ControllerReport | None, list[str]]:
        """The controller's report, asked only once its Deployment is available (no pointless timeouts),
        and the conflict a refused token reveals: a Secret of the token's name that was there before the
        job (its create answered 409), which the operator cannot read to tell."""
        if not deployment_available(observed.get(_key(DEPLOYMENTS, ctx.child("controller")))):
            return None, []
        template = self.settings.controller_url_template
        url = template.format(name=ctx.name, namespace=ctx.namespace) if template else ctx.controller_url
        try:
            return read_controller(url, token, self.settings.http_timeout_seconds), []
        except TokenRefused:
            return None, [f"Secret {ctx.token_name}"]

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
            if key not in found and res is not CONFIGMAPS and res is not SECRETS:  # Secrets: never read
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

    def _missing_references(self, view: View, ctx: JobContext, refusals: list[str]) -> list[str]:
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
                if exc.refused:
                    refusals.append(refusal("create", PVCS.kind, checkpoint.volume_claim, exc))
                elif exc.status != 409:
                    raise
        missing = []
        if checkpoint.volume_claim and view.get(PVCS, ctx.namespace, checkpoint.volume_claim) is None:
            missing.append(("PersistentVolumeClaim", checkpoint.volume_claim, "spec.checkpoint.volumeClaim"))
        for secret, field in (
            (ctx.spec.env_from_secret, "spec.envFromSecret"),
            (checkpoint.credentials_secret, "spec.checkpoint.credentialsSecret"),
        ):
            # Asked by a dry-run create, the operator having no read access to Secrets (tokens.py).
            probe = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret, "namespace": ctx.namespace}}
            if secret and not view.exists_unread(probe, create=False):
                missing.append(("Secret", secret, field))
        return [
            f"{kind} {name!r} ({field}) not found in namespace {ctx.namespace!r}; "
            f"retrying every {self.settings.poll_seconds:g} s"
            for kind, name, field in missing
        ]

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
        refusals: list[str],
    ) -> list[str]:
        """Create what is missing, update what may change, delete the trainer when due (and, under Kueue,
        the gang and the Workload when they may not run); returns conflicts, and adds each write the API
        server refused to `refusals`. After a refused create nothing more is created in this pass: the
        children come in creation order, so what follows mounts, guards or joins what is missing."""
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
        # The trainer finishes its step and saves on SIGTERM (runPolicy.terminationGracePeriodSeconds), and a
        # step needs vLLM: the rollout is neither stopped nor replaced while a trainer Job is still there.
        trainer = observed.get(_key(JOBS, ctx.child("trainer")))
        hold_rollout = trainer is not None and trainer_outcome(trainer) is None
        for res, name in retired:
            if hold_rollout and (res, name) == (DEPLOYMENTS, ctx.child("rollout")):
                continue
            current = observed.get(_key(res, name))
            if current is not None and owned_by(current, uid) and not current["metadata"].get("deletionTimestamp"):
                try:
                    # Foreground: the object disappears only after its pods, so a new attempt never overlaps the old one.
                    view.delete(res, ctx.namespace, name, propagation="Foreground")
                except KubeError as exc:
                    if not exc.refused:
                        raise
                    refusals.append(refusal("delete", res.kind, name, exc))
        conflicts: list[str] = []
        for manifest in desired:
            res = resource_of(manifest)
            name = manifest["metadata"]["name"]
            current = observed.get(_key(res, name))
            try:
                if res is SECRETS:  # the token: created, never read back (its value is derived, tokens.py)
                    if create:
                        verb = "create"
                        append_owner_reference(manifest, owner=owner)  # type: ignore[arg-type]  # as in _create
                        view.exists_unread(manifest, create=True)
                    continue
                if current is None:
                    if not create:
                        continue
                    verb = "create"
                    current = self._create(view, manifest, owner)
                    if current is None:
                        continue
                if not owned_by(current, uid):
                    conflicts.append(f"{res.kind} {name}")
                elif not (hold_rollout and res is DEPLOYMENTS and name == ctx.child("rollout")):
                    verb = "update"
                    self._update(view, res, current, manifest)
            except KubeError as exc:
                if not exc.refused:
                    raise
                refusals.append(refusal(verb, res.kind, name, exc))
                create = create and verb != "create"
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
        """Bring the live child back to the rendered one where the API allows it (drift.py says which
        fields, per kind: never a pod template but the rollout's gang epoch, never an immutable field)."""
        patch = drift_patch(current, desired)
        if patch:
            meta = current["metadata"]
            view.patch(res, meta["namespace"], meta["name"], patch)

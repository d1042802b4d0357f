"""The job name's limits, derived again from the children the builders render.

g2rpo.api.spec.job_name_errors states the limits as numbers (the CRD's CEL rules, the operator and
`g2rpo validate` use them); g2rpo_operator.child_names checks every rendered child's names against the
API server's rules (apimachinery IsDNS1035Label, IsDNS1123Label, IsDNS1123Subdomain, IsValidLabelValue,
and batch validateJob's Indexed-Job hostname). These tests render the children of every gang scheduler
for names and trainer sizes around each limit and require the two to agree, and the limits to be tight:
a new child with a longer name, or a new label carrying the name, fails here.
"""

from __future__ import annotations

import pytest
from test_cel import admit

from g2rpo.api.spec import DNS_LABEL_MAX, MAX_NAME_LENGTH, job_name_errors, parse_spec
from g2rpo_operator.builders import JobContext, children
from g2rpo_operator.child_names import DNS1035_LABEL, constrained_names, invalid_child_names
from g2rpo_operator.settings import OperatorSettings

from operator_fixtures import job_manifest

GANGS = (None, "volcano", "kueue")
SETTINGS = OperatorSettings(kueue_enabled=True, kueue_queue="gpu")


def rendered(name: str, replicas: int = 2, gang: str | None = None) -> list[dict]:
    """Every child the operator would create for the job (the Workload too under Kueue)."""
    spec = job_manifest(name=name, trainer={"replicas": replicas})["spec"]
    if gang:
        spec["runPolicy"] = {"gangScheduler": gang}
    ctx = JobContext.resolve(name, "default", parse_spec(spec), SETTINGS)
    return children(ctx, token="t", active=True)


def label_bound(name: str, replicas: int, gang: str | None) -> int:
    """The longest value, among the children's names, that must stay a DNS label or a label value."""
    return max(
        len(value)
        for child in rendered(name, replicas, gang)
        for where, value, rule in constrained_names(child)
        if rule != "DNS-1123 subdomain"
    )


CASES = [
    (length, replicas)
    for replicas in (1, 2, 10, 11, 100, 101, 1000, 1001)
    for length in (1, MAX_NAME_LENGTH - 2, MAX_NAME_LENGTH - 1, MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1, DNS_LABEL_MAX)
]


@pytest.mark.parametrize("gang", GANGS)
@pytest.mark.parametrize("length, replicas", CASES)
def test_the_stated_limits_are_the_builders_limits(gang, length, replicas):
    name = "j" * length
    stated = job_name_errors(name, replicas)
    derived = invalid_child_names(rendered(name, replicas, gang))
    assert bool(stated) == bool(derived), (stated, derived)


@pytest.mark.parametrize("gang", GANGS)
def test_the_limits_are_tight(gang):
    """At the longest admitted name some child's name is exactly a full DNS label (the limit refuses nothing
    that would work), for the Services and, with many trainer pods, for the last pod's hostname."""
    assert label_bound("j" * MAX_NAME_LENGTH, 2, gang) == DNS_LABEL_MAX
    assert label_bound("j" * (MAX_NAME_LENGTH - 1), 1000, gang) == DNS_LABEL_MAX  # <name>-trainer-999


@pytest.mark.parametrize(
    "name",
    ["qwen2.5-math", "qwen-", "9lives", "Qwen", "qwen_math", "a.b", "-a", "a", "a-9", "a--b", "qwen3-1p7b-math"],
)
def test_every_form_is_judged_alike_by_admission_the_model_and_the_children(name):
    """A custom resource's own name may hold dots (a DNS subdomain), but the Service `<name>-controller`
    may not: the CRD's CEL rules, job_name_errors and the rendered children agree on each form."""
    derived = invalid_child_names(rendered(name))
    stated = job_name_errors(name, 2)
    refused = [m for m in admit(job_manifest(name=name)) if m.startswith("metadata.name:")]
    assert bool(derived) == bool(stated) == bool(refused), (derived, stated, refused)
    assert bool(stated) == (DNS1035_LABEL.fullmatch(name) is None)


def test_a_refusal_names_the_child_and_the_rule():
    lines = invalid_child_names(rendered("qwen2.5-math"))
    service = "Service 'qwen2.5-math-controller'"
    assert (
        f"{service}: metadata.name 'qwen2.5-math-controller' is not a valid DNS-1035 label (at most 63 characters)"
        in lines
    )

"""The operator's watch-fed cache keeps the newest version of each object whatever order the API's
answers and watch events arrive in (cache.py; the race in the operator itself is
test_operator_kmock.py::test_answers_that_arrive_after_later_events_do_not_roll_the_job_back)."""

from __future__ import annotations

import pytest

from g2rpo_operator import cache as cache_module
from g2rpo_operator.cache import ObjectCache
from g2rpo_operator.handlers import Operator
from g2rpo_operator.kube import JOBS, compare_versions, older_than


def job(version: str, uid: str = "a", **status: int) -> dict:
    meta = {"name": "demo-trainer", "namespace": "ns", "uid": uid, "resourceVersion": version}
    return {"metadata": meta, "status": status}


def cached(cache: ObjectCache) -> dict | None:
    return cache.get(JOBS, "ns", "demo-trainer")


def test_an_answer_older_than_the_watch_event_does_not_replace_it():
    cache = ObjectCache()
    cache.store(JOBS, job("12", ready=2))  # the watch: pods ready
    cache.store(JOBS, job("11"))  # then the answer to the creation, read late
    assert cached(cache) == job("12", ready=2)
    cache.store(JOBS, job("13", ready=1))
    assert cached(cache) == job("13", ready=1)


def test_the_same_version_again_replaces_it():
    """View.delete stores its own copy of the cached version, marked as being deleted."""
    cache = ObjectCache()
    cache.store(JOBS, job("12"))
    marked = job("12")
    marked["metadata"]["deletionTimestamp"] = "requested"
    cache.store(JOBS, marked)
    assert cached(cache) == marked


def test_a_late_answer_does_not_bring_a_deleted_object_back():
    cache = ObjectCache()
    cache.store(JOBS, job("12"))
    cache.forget(JOBS, "ns", "demo-trainer", deleted=job("14"))
    cache.store(JOBS, job("13"))
    assert cached(cache) is None
    cache.store(JOBS, job("20", uid="b"))  # created again under the same name
    assert cached(cache) == job("20", uid="b")


def test_a_late_answer_of_the_deleted_version_itself_stays_deleted():
    """A DELETED event may carry the object's last version (KMock's do), the one a late answer holds."""
    cache = ObjectCache()
    cache.forget(JOBS, "ns", "demo-trainer", deleted=job("14"))
    cache.store(JOBS, job("14"))
    assert cached(cache) is None


def test_the_deletion_of_an_earlier_object_of_that_name_keeps_the_new_one():
    """The operator recreated the trainer Job (a gang restart) and read the answer before the watch
    delivered the old Job's DELETED event."""
    cache = ObjectCache()
    cache.store(JOBS, job("20", uid="b"))
    cache.forget(JOBS, "ns", "demo-trainer", deleted=job("14", uid="a"))
    assert cached(cache) == job("20", uid="b")


def test_a_forget_without_the_deleted_object_always_forgets():
    """A fresh list that no longer holds the object: the list is current, there is nothing to compare."""
    cache = ObjectCache()
    cache.store(JOBS, job("20"))
    cache.forget(JOBS, "ns", "demo-trainer")
    assert cached(cache) is None
    cache.store(JOBS, job("3"))
    assert cached(cache) == job("3")


def test_the_cache_remembers_a_bounded_number_of_deletions(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cache_module, "TOMBSTONES", 2)
    cache = ObjectCache()
    for name in ("a", "b", "c"):
        cache.forget(JOBS, "ns", name, deleted={"metadata": {"name": name, "namespace": "ns", "resourceVersion": "9"}})
    for name in ("a", "b", "c"):
        cache.store(JOBS, {"metadata": {"name": name, "namespace": "ns", "resourceVersion": "5"}})
    assert [cache.get(JOBS, "ns", name) is not None for name in ("a", "b", "c")] == [True, False, False]


@pytest.mark.parametrize(
    ("candidate", "current", "comparison"),
    [
        ("9", "10", -1),  # integers, not strings: "9" > "10" as text
        ("10", "10", 0),
        ("11", "10", 1),
        ("", "10", None),  # cannot tell: not older, so the answer is kept, as before the guard
        ("abc", "10", None),
        ("9", "xyz", None),
    ],
)
def test_resource_versions_compare_as_integers(candidate: str, current: str, comparison: int | None):
    assert compare_versions(job(candidate), job(current)) == comparison
    assert older_than(job(candidate), job(current)) is (comparison == -1)


def test_the_operator_keeps_the_newest_body_of_a_job():
    """The daemon's status patch answer and the job's watch events arrive in either order."""
    operator = Operator(reconciler=None, settings=None, metrics=None)  # type: ignore[arg-type]
    key = ("ns", "demo")
    operator.remember(key, job("7", ready=1))
    operator.remember(key, job("6"))
    assert operator.latest[key] == job("7", ready=1)
    operator.remember(key, job("8"))
    assert operator.latest[key] == job("8")

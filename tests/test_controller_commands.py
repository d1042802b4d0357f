"""The controller's mutations as typed commands (g2rpo.controller.commands) behind DurableController.

A refused command changes nothing and journals nothing; a journal written in the record format of
the `op`-dict store (before the commands) replays to the same state, byte for byte; every
timestamp comes from the clock the controller is given.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from g2rpo.controller.commands import decode, encode
from g2rpo.controller.core import StepConflict
from g2rpo.controller.store import JOURNAL_FILE, SNAPSHOT_FILE, DurableController
from g2rpo.guidance import schedule as sched

PARAMS = sched.ScheduleParams(schedule="adaptive", initial_length=256, min_length=4, max_length=512, window=2)

# Written by hand in the store's record format: compact JSON, keys "seq", "at", "op", then the op's
# fields; ScheduleParams as their snake_case dict. A restore, reports, an override of length and
# parameters, a rewind, an override of parameters alone, and a report of a rewound step again.
WINDOW_3 = (
    '{"schedule":"adaptive","initial_length":256,"min_length":4,"max_length":512,"window":3,"total_steps":null,'
    '"power":2.0,"decay":0.5,"interval":50,"zero_reward_growth":2.0,"reward_ema":0.0,"max_change_factor":null}'
)
MAX_200 = (
    '{"schedule":"adaptive","initial_length":200,"min_length":4,"max_length":200,"window":3,"total_steps":null,'
    '"power":2.0,"decay":0.5,"interval":50,"zero_reward_growth":2.0,"reward_ema":0.0,"max_change_factor":null}'
)
CHECKPOINT = (
    '{"params":{"schedule":"adaptive","initial_length":256,"min_length":4,"max_length":512,"window":2,'
    '"total_steps":null,"power":2.0,"decay":0.5,"interval":50,"zero_reward_growth":2.0,"reward_ema":0.0,'
    '"max_change_factor":null},"state":{"step":1,"length":256.0,"rewards":[0.5],"lengths":[256.0]},'
    '"history":[{"step":0,"reward":0.5,"length_used":256,"next_length":256,"metrics":{"accuracy":0.5},'
    '"reported_at":999.0}],"events":[]}'
)
OLD_JOURNAL = [
    f'{{"seq":1,"at":1000.0,"op":"restore","snapshot":{CHECKPOINT}}}',
    '{"seq":2,"at":1001.0,"op":"report","step":1,"reward":0.25,"metrics":{"accuracy":0.25,"decoded_tokens":900.0}}',
    '{"seq":3,"at":1002.0,"op":"report","step":2,"reward":0.4,"metrics":{}}',
    f'{{"seq":4,"at":1003.0,"op":"override","length":300.0,"params":{WINDOW_3},"reason":"more guidance"}}',
    '{"seq":5,"at":1004.0,"op":"report","step":3,"reward":0.6,"metrics":{"accuracy":0.6}}',
    '{"seq":6,"at":1005.0,"op":"rewind","step":2}',
    f'{{"seq":7,"at":1006.0,"op":"override","length":null,"params":{MAX_200},"reason":""}}',
    '{"seq":8,"at":1007.0,"op":"report","step":2,"reward":0.45,"metrics":{}}',
]
# The state the op-dict store reached from those records.
OLD_STATE = {
    "params": json.loads(MAX_200),
    "state": {"step": 3, "length": 166.66666666666666, "rewards": [0.5, 0.25, 0.45], "lengths": [256.0, 256.0, 200.0]},
    "history": [
        {
            "step": 0,
            "reward": 0.5,
            "length_used": 256,
            "next_length": 256,
            "metrics": {"accuracy": 0.5},
            "reported_at": 999.0,
        },
        {
            "step": 1,
            "reward": 0.25,
            "length_used": 256,
            "next_length": 512,
            "metrics": {"accuracy": 0.25, "decoded_tokens": 900.0},
            "reported_at": 1001.0,
        },
        {"step": 2, "reward": 0.45, "length_used": 200, "next_length": 167, "metrics": {}, "reported_at": 1007.0},
    ],
    "events": [
        {"event": "restore", "step": 1, "length": 256, "at": 1000.0},
        {
            "event": "override",
            "step": 3,
            "length": 300.0,
            "reason": "more guidance",
            "at": 1003.0,
            "params": json.loads(WINDOW_3),
        },
        {"event": "rewind", "step": 2, "at": 1005.0},
        {"event": "override", "step": 2, "length": None, "reason": "", "at": 1006.0, "params": json.loads(MAX_200)},
    ],
}


class Ticks:
    """A clock that reads 1000.0, 1001.0, ... one tick per call."""

    def __init__(self) -> None:
        self.ticks = itertools.count(1000.0)

    def __call__(self) -> float:
        return next(self.ticks)


def test_a_journal_in_the_op_record_format_replays_to_the_same_state(tmp_path):
    (tmp_path / JOURNAL_FILE).write_text("\n".join(OLD_JOURNAL) + "\n")
    replayed = DurableController.open("j", PARAMS, tmp_path)
    assert replayed.controller.snapshot() == OLD_STATE
    assert replayed.seq == 8
    replayed.close()
    assert json.loads((tmp_path / SNAPSHOT_FILE).read_text())["controller"] == OLD_STATE


@pytest.mark.parametrize("line", OLD_JOURNAL, ids=[json.loads(line)["op"] for line in OLD_JOURNAL])
def test_a_command_encodes_to_the_record_it_was_decoded_from(line):
    record = json.loads(line)
    encoded = encode(decode(record), record["seq"])
    assert json.dumps(encoded, separators=(",", ":"), allow_nan=False) == line


def test_the_live_path_writes_the_same_records(tmp_path):
    """The same changes made through DurableController write the hand-written records, byte for byte."""
    durable = DurableController.open("j", PARAMS, tmp_path, clock=Ticks())
    durable.restore(json.loads(CHECKPOINT))  # folded into the snapshot at once: the journal starts after it
    durable.report(1, 0.25, {"accuracy": 0.25, "decoded_tokens": 900.0})
    durable.report(2, 0.4, {})
    durable.override(300.0, sched.ScheduleParams.from_dict(json.loads(WINDOW_3)), "more guidance")
    durable.report(3, 0.6, {"accuracy": 0.6})
    durable.rewind(2)
    durable.override(None, sched.ScheduleParams.from_dict(json.loads(MAX_200)), "")
    durable.report(2, 0.45, {})
    durable.close()
    assert (tmp_path / JOURNAL_FILE).read_text() == "\n".join(OLD_JOURNAL[1:]) + "\n"
    assert durable.controller.snapshot() == OLD_STATE


def test_every_timestamp_comes_from_the_given_clock(tmp_path):
    durable = DurableController.open("j", PARAMS, tmp_path, clock=Ticks())
    durable.report(0, 0.5, {})
    durable.report(1, 0.25, {})
    durable.report(1, 0.25, {})  # a retry: nothing new, no tick used
    durable.rewind(1)
    durable.override(100.0, None, "by hand")
    durable.restore(durable.controller.snapshot())
    snapshot = durable.controller.snapshot()
    assert [h["reported_at"] for h in snapshot["history"]] == [1000.0]
    assert [(e["event"], e["at"]) for e in snapshot["events"]] == [
        ("rewind", 1002.0),
        ("override", 1003.0),
        ("restore", 1004.0),
    ]
    durable.close()
    assert DurableController.open("j", PARAMS, tmp_path).controller.snapshot() == snapshot  # replayed times


def _reported(tmp_path: Path) -> DurableController:
    durable = DurableController.open("j", PARAMS, tmp_path, compact_every=1_000)
    for k, r in enumerate([0.5, 0.25, 0.4]):
        durable.report(k, r, {"accuracy": r})
    return durable


NOT_A_CHECKPOINT = {"params": {}}
AHEAD_OF_ITS_HISTORY = {
    **json.loads(CHECKPOINT),
    "state": {"step": 2, "length": 256.0, "rewards": [0.5], "lengths": [256.0]},
}


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        (lambda d: d.report(-1, 0.5, {}), ValueError, "step"),
        (lambda d: d.report(3, math.nan, {}), ValueError, "reward"),
        (lambda d: d.report(3, 0.5, {"accuracy": math.inf}), ValueError, "metrics.accuracy"),
        (lambda d: d.report(5, 0.5, {}), StepConflict, "step"),  # from the future
        (lambda d: d.report(1, 0.25, {}), StepConflict, "step"),  # older than the last: rewind first
        (lambda d: d.report(2, 0.9, {}), StepConflict, "step"),  # a retry with another reward
        (lambda d: d.rewind(-1), ValueError, "step"),
        (lambda d: d.rewind(4), ValueError, "step"),
        (lambda d: d.override(None, None, "nothing"), ValueError, "length"),
        (lambda d: d.override(-5.0, None, ""), ValueError, "length"),
        (lambda d: d.override(math.nan, None, ""), ValueError, "length"),
        # New parameters with a bad length: the parameters must not stay behind (no rollback to forget).
        (lambda d: d.override(-5.0, sched.ScheduleParams("fixed", 10, 1, 20), ""), ValueError, "length"),
        (lambda d: d.restore(NOT_A_CHECKPOINT), ValueError, "snapshot"),
        (lambda d: d.restore(AHEAD_OF_ITS_HISTORY), ValueError, "snapshot"),
    ],
)
def test_a_refused_command_changes_nothing_and_journals_nothing(tmp_path, change, error, field):
    durable = _reported(tmp_path)
    before, seq, journal = durable.controller.snapshot(), durable.seq, (tmp_path / JOURNAL_FILE).read_bytes()
    with pytest.raises(error) as info:
        change(durable)
    assert field in str(info.value)
    assert durable.controller.snapshot() == before and durable.seq == seq
    assert (tmp_path / JOURNAL_FILE).read_bytes() == journal
    durable.close()
    assert DurableController.open("j", PARAMS, tmp_path).controller.snapshot() == before


def test_the_in_process_client_checks_a_snapshot_as_the_service_does(tmp_path):
    """The local run's controller refuses the inconsistent snapshot the service refuses, and keeps
    a consistent one's event log (its process has no past of its own)."""
    from g2rpo.controller.client import InProcessGuidanceClient
    from g2rpo.controller.core import GuidanceController

    inconsistent = json.loads(CHECKPOINT)
    inconsistent["state"]["step"] = 2
    client = InProcessGuidanceClient(GuidanceController(PARAMS))
    service = DurableController.open("demo", PARAMS, tmp_path)
    for restore in (client.restore, service.restore):
        with pytest.raises(ValueError, match=r"inconsistent snapshot: state\.step=2 but 1 history records"):
            restore(inconsistent)
    consistent = json.loads(CHECKPOINT)
    consistent["events"] = [{"event": "override", "step": 1, "length": 300, "reason": "r", "at": 5.0, "params": None}]
    assert client.restore(consistent) == 256 and client.controller.events == consistent["events"]

"""Attempts and saves without Ray: the attempt log a restart-heavy run keeps, and when a worker saves."""

from __future__ import annotations

import torch

from raygpt.train.attempts import AttemptLog, attempt_segments, close_orphaned, describe_attempts
from raygpt.train.metrics import MetricsStream
from raygpt.train.saving import SaveSchedule


def test_attempts_record_sizes_reasons_recomputation_and_lost_time():
    log = AttemptLog()
    log.begin({"resumed_from_step": 0, "world_size": 8, "attempt_started": 100.0, "first_step_at": 110.0})
    for step in (10, 412, 420):
        log.report({"step": step})
    log.failed("node lost", "The actor died because its node has died.")
    log.attempts[-1]["ended_at"] = 500.0
    log.begin({"resumed_from_step": 412, "world_size": 6, "attempt_started": 520.0, "first_step_at": 560.0})
    log.report({"step": 980, "checkpoint_reason": "preemption"})
    log.begin({"resumed_from_step": 980, "world_size": 8, "attempt_started": 900.0, "first_step_at": 930.0})
    log.report({"step": 6218})
    log.finish("finished")
    first, second, third = log.attempts
    assert (first["ended"], first["recomputed_after"], first["seconds_to_next_step"]) == ("node lost", 8, 60.0)
    assert (second["ended"], second["recomputed_after"], second["seconds_to_next_step"]) == ("preemption notice", 0, 30.0)
    assert third["ended"] == "finished" and "open" not in third
    assert attempt_segments(log.attempts) == [(1, 412, 8), (413, 980, 6), (981, 6218, 8)]
    assert describe_attempts(log.attempts) == ("steps 1-412 on 8 workers, 413-980 on 6 workers, 981-6218 on 8 workers; "
                                               "2 restart(s), 8 step(s) recomputed, 90 s from losses to next steps")
    resumed = AttemptLog(log.attempts)  # a new session continues the list
    resumed.begin({"resumed_from_step": 6218, "world_size": 8})
    assert resumed.attempts[-1]["attempt"] == 4


def test_an_attempt_ends_at_its_last_step_not_when_ray_noticed():
    log = AttemptLog()
    log.begin({"resumed_from_step": 0, "world_size": 2, "attempt_started": 100.0, "first_step_at": 105.0})
    log.report({"step": 8, "time": 120.0})
    log.failed("node lost", "ActorUnavailableError")  # a frozen node: Ray notices a minute later
    first = log.attempts[0]
    assert first["ended_at"] == 120.0 and first["noticed_at"] > 1e9
    log.begin({"resumed_from_step": 8, "world_size": 2, "attempt_started": 185.0, "first_step_at": 192.0})
    assert first["seconds_to_next_step"] == 72.0


def test_an_attempt_a_lost_driver_left_open_ends_at_its_last_recorded_step():
    log = AttemptLog()
    log.begin({"resumed_from_step": 0, "world_size": 2, "first_step_at": 5.0})
    log.report({"step": 4, "time": 10.0})  # the last step run.json heard of
    records = [{"step": s, "time": 10.0 + s} for s in (4, 8, 12)]  # metrics.jsonl knows more
    closed = close_orphaned(log.attempts, records)
    assert closed[0]["ended"] == "driver lost" and "open" not in closed[0]
    assert (closed[0]["last_step"], closed[0]["ended_at"]) == (12, 22.0)
    assert log.attempts[0]["open"]  # the list given is left as it was
    resumed = AttemptLog(closed)
    resumed.begin({"resumed_from_step": 8, "world_size": 2, "first_step_at": 40.0})
    assert (closed[0]["ended"], resumed.attempts[0]["recomputed_after"]) == ("driver lost", 4)
    assert resumed.attempts[0]["seconds_to_next_step"] == 18.0


def test_records_a_resumed_worker_hands_on_belong_to_the_attempt_that_saved_them():
    """A save on a spot notice whose report never reached the driver (its node went first)
    comes back with the next attempt's first report: it is the earlier attempt's record, and
    that attempt ended on the notice."""
    stream = MetricsStream([], [])
    stream.add({"step": 0, "resumed_from_step": 0, "world_size": 2, "attempt_started": 1.0})
    stream.add({"step": 4, "loss": 3.0, "step_losses": {"3": 3.1, "4": 3.0}, "time": 5.0})
    carried = [{"step": 5, "loss": 2.95, "step_losses": {"5": 2.95}, "time": 6.0},
               {"step": 6, "loss": 2.9, "step_losses": {"6": 2.9}, "time": 7.0, "checkpoint_reason": "preemption"}]
    stream.add({"step": 6, "resumed_from_step": 6, "world_size": 1, "attempt_started": 20.0,
                "carried_records": carried})
    by_step = {r["step"]: r for r in stream.records}
    assert sorted(by_step) == [0, 4, 5, 6] and by_step[5]["attempt"] == 1
    assert by_step[6]["checkpoint_reason"] == "preemption" and by_step[6]["attempt"] == 2  # the resume merges in
    first, second = stream.attempts.attempts
    assert (first["last_step"], first["ended"], second["attempt"]) == (6, "preemption notice", 2)


def test_saves_by_step_minutes_notice_and_end_with_checks_every_few_seconds():
    now = [0.0]
    notices = []
    checks = []

    def preemption_info():
        checks.append(len(checks))
        return notices[0] if notices else None

    saves = SaveSchedule(interval_steps=100, interval_minutes=1.0, check_s=2.0, stop_step=500, world_size=1,
                         device=torch.device("cpu"), preemption_info=preemption_info, clock=lambda: now[0])
    assert saves.due(1) is None and len(checks) == 1  # every step until the step time is known
    saves.observe_step_time(0.5)  # then every 4 steps (2 s)
    assert [saves.due(s) for s in (2, 3, 4)] == [None, None, None] and len(checks) == 2
    assert saves.due(100) == "interval"
    now[0] = 61.0
    assert saves.due(104) == "minutes"
    saves.saved()
    assert saves.due(108) is None
    notices.append(object())
    assert saves.due(109) is None and saves.due(112) == "preemption"
    assert saves.due(113) == "preemption"  # after a notice, every step
    assert saves.due(500) == "end"

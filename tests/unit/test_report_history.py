"""Which invocation of a run directory a rank's failure record belongs to."""

from distnet.train.report.history import invocations, last_failure


def _info(*starts: float) -> dict:
    return {"invocations": [{"started": "x", "started_t": t, "engine": "MPICommunicator"}
                            for t in starts]}  # fmt: skip


def test_a_failure_just_before_an_immediate_resume_is_the_earlier_invocations():
    failure = {"rank": 0, "stage": "finetune", "time": 100.4}
    info = _info(90.0, 100.6)  # resumed 0.2 s after the crash
    runs = invocations(info, [], [failure], {"unfinished": True})
    assert [r["outcome"] for r in runs] == ["failed: rank 0 in finetune", "running or stopped"]
    assert last_failure(info, [failure]) is None  # not the latest invocation's


def test_a_failure_after_the_latest_start_is_the_latest_invocations():
    failure = {"rank": 1, "stage": "pretrain-0", "time": 100.7}
    info = _info(90.0, 100.6)
    runs = invocations(info, [], [failure], {"unfinished": True})
    assert [r["outcome"] for r in runs] == [
        "stopped (no failure recorded)",
        "failed: rank 1 in pretrain-0",
    ]
    assert last_failure(info, [failure]) == failure


def test_older_run_directories_keep_a_second_of_slack_for_their_text_start_times():
    info = {"invocations": [{"started": "2026-01-01T10:00:00"}]}
    import time

    start = time.mktime(time.strptime("2026-01-01T10:00:00", "%Y-%m-%dT%H:%M:%S"))
    failure = {"rank": 0, "stage": "finetune", "time": start - 0.5}
    assert last_failure(info, [failure]) == failure

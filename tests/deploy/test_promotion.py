import pytest

from deploy.core.backoff import Backoff
from deploy.core.promotion import PromoteJob, Status, Step, plan_promote


def test_plans():
    full = plan_promote(quantize=True, reuse_artifact=False)
    assert full == (Step.CHECK, Step.MERGE, Step.QUANTIZE, Step.VALIDATE, Step.START, Step.SWITCH,
                    Step.DRAIN, Step.RECORD)
    assert Step.QUANTIZE not in plan_promote(quantize=False, reuse_artifact=False)
    reused = plan_promote(quantize=True, reuse_artifact=True)
    assert Step.MERGE not in reused and Step.VALIDATE in reused
    assert plan_promote(quantize=True, reuse_artifact=False, dry_run=True)[-1] == Step.VALIDATE


def test_job_walks_its_plan_in_order_and_succeeds():
    job = PromoteJob("j1", "r", plan_promote(quantize=False, reuse_artifact=True, dry_run=True), 0.0)
    job = job.begin(Step.CHECK, 1.0).complete(2.0, ok=True)
    with pytest.raises(ValueError):
        job.begin(Step.SWITCH, 3.0)
    job = job.begin(Step.VALIDATE, 3.0).complete(5.5, kl=0.01)
    assert job.status is Status.SUCCEEDED
    d = job.to_dict()
    assert [s["step"] for s in d["done"]] == ["check", "validate"]
    assert d["done"][1]["seconds"] == 2.5 and d["done"][1]["detail"] == {"kl": 0.01}
    assert d["done"][1]["ended_at"] == 5.5  # the service's clock: callers place the switch in time with it


def test_failure_names_the_step():
    job = PromoteJob("j", "r", plan_promote(quantize=True, reuse_artifact=False), 0.0)
    job = job.begin(Step.CHECK, 0).complete(1).begin(Step.MERGE, 1).fail("disk full", 2)
    assert job.status is Status.FAILED and job.failed_step is Step.MERGE and job.error == "disk full"
    with pytest.raises(ValueError):
        job.begin(Step.QUANTIZE, 3)


def test_backoff_grows_caps_and_resets():
    b = Backoff(base_s=1, factor=2, cap_s=10, stable_after_s=60)
    assert [b.delay(n) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    assert b.next_streak(3, ran_for_s=5) == 4
    assert b.next_streak(3, ran_for_s=61) == 0

"""The chaos campaign's pure parts: the seeded fault schedule and the outcome checks, on literal
inputs (no process, no file)."""

from __future__ import annotations

import pytest

from xffl_testbed.chaos import (
    FAULT_KINDS,
    Fault,
    fault_schedule,
    is_partial_name,
    job_count_problems,
    jobs_per_round,
    model_digest,
    outcome_problems,
    parse_counts,
    parse_jobcomp,
    partial_paths,
)

COUNTS = {"kill_scheduler": 1, "kill_triggerer": 1, "kill_dag_processor": 1, "kill_task": 4,
          "sshd_outage": 1, "slurmctld_restart": 1}  # fmt: skip


def test_the_same_seed_draws_the_same_schedule_and_another_seed_another():
    one = fault_schedule(7, COUNTS, horizon_s=100, facilities=["a", "b"])
    assert one == fault_schedule(7, COUNTS, horizon_s=100, facilities=["a", "b"])
    assert one != fault_schedule(8, COUNTS, horizon_s=100, facilities=["a", "b"])


def test_the_schedule_holds_each_fault_asked_for_in_time_order_inside_the_window():
    faults = fault_schedule(3, COUNTS, horizon_s=100, facilities=["a", "b"], start_s=10)
    assert sorted(f.kind for f in faults) == sorted(k for k, n in COUNTS.items() for _ in range(n))
    times = [f.at_s for f in faults]
    assert times == sorted(times) and 10 <= times[0] and times[-1] <= 100
    # one fault per slot of (100 - 10) / 9 = 10 s
    assert [int((t - 10) // 10) for t in times] == list(range(9))


def test_targets_and_durations():
    faults = fault_schedule(
        5, COUNTS, horizon_s=100, facilities=["a", "b"], outage_s=(3, 4), task_delay_s=(0, 0.5)
    )
    by_kind = {f.kind: f for f in faults}
    assert by_kind["kill_scheduler"].target == "scheduler"
    assert by_kind["kill_triggerer"].target == "triggerer"
    assert by_kind["kill_dag_processor"].target == "dag-processor"
    for kind in ("sshd_outage", "slurmctld_restart"):
        assert by_kind[kind].target in ("a", "b") and 3 <= by_kind[kind].duration_s <= 4
    kills = [f for f in faults if f.kind == "kill_task"]
    # four task kills hit each kind of task once
    assert sorted(f.target for f in kills) == ["aggregate", "finalize", "pull", "push"]
    assert all(0 <= f.delay_s <= 0.5 and f.duration_s == 0 for f in kills)


def test_a_seed_gives_a_literal_schedule():
    faults = fault_schedule(
        1, {"kill_scheduler": 1, "sshd_outage": 1}, horizon_s=25, facilities=["a", "b"]
    )
    assert faults == [
        Fault(at_s=9.95, kind="sshd_outage", target="b", duration_s=7.3),
        Fault(at_s=18.8, kind="kill_scheduler", target="scheduler"),
    ]


@pytest.mark.parametrize(
    ("counts", "kwargs", "message"),
    [
        ({"kill_everything": 1}, {}, "unknown fault kinds"),
        ({"kill_task": -1}, {}, ">= 0"),
        ({"kill_task": 1}, {"facilities": []}, "at least one facility"),
        ({"kill_task": 1}, {"horizon_s": 2}, "must be after start_s"),
    ],
)
def test_the_schedule_refuses_what_it_cannot_draw(counts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fault_schedule(1, counts, **{"horizon_s": 100, "facilities": ["a"], **kwargs})


def test_fault_counts_from_the_command_line():
    assert parse_counts("kill_scheduler=2, sshd_outage=1,") == {
        "kill_scheduler": 2,
        "sshd_outage": 1,
    }
    assert set(parse_counts(",".join(f"{k}=0" for k in FAULT_KINDS))) == set(FAULT_KINDS)
    for bad in ("kill_scheduler", "kill_all=1", "kill_task=two"):
        with pytest.raises(ValueError, match="KIND=N"):
            parse_counts(bad)


JOBCOMP = (
    "JobId=3 UserId=chaosa(1001) GroupId=chaosa(1001) Name=xffl_chaos.chaosa.train JobState=COMPLETED "
    "Partition=debug TimeLimit=30 StartTime=2026-12-04T18:00:01 EndTime=2026-12-04T18:00:09 NodeList=localhost "
    "NodeCnt=1 ProcCnt=1 WorkDir=/tmp/t/chaosa/home/xffl/chaos/round-0000/jobs ReservationName= Tres=cpu=1 "
    "Account= QOS= WcKey= Cluster=chaosa SubmitTime=2026-12-04T18:00:01 EligibleTime=2026-12-04T18:00:01 "
    "DerivedExitCode=0:0 ExitCode=0:0\n"
    "JobId=4 UserId=chaosa(1001) Name=xffl_chaos.chaosa.train JobState=COMPLETED "
    "WorkDir=/tmp/t/chaosa/home/xffl/chaos/round-0001/jobs ExitCode=0:0\n"
    "JobId=4 UserId=chaosa(1001) Name=xffl_chaos.chaosa.train JobState=COMPLETED "
    "WorkDir=/tmp/t/chaosa/home/xffl/chaos/round-0001/jobs ExitCode=0:0\n"
    "JobId=5 Name=xffl_calm.chaosa.train JobState=COMPLETED WorkDir=/tmp/t/chaosa/home/xffl/calm/round-0001/jobs\n"
    "JobId=6 Name=x JobState=FAILED WorkDir=/tmp/t/chaosa/home/xffl/chaos/round-0002/jobs\n"
    "JobId=7 Name=x JobState=COMPLETED WorkDir=/tmp/t/chaosa/home/xffl/chaos/round-0002/jobs\n"
    "\n"
)


def test_a_completion_log_is_read_field_by_field():
    records = parse_jobcomp(JOBCOMP)
    assert len(records) == 6
    assert records[0]["JobId"] == "3" and records[0]["JobState"] == "COMPLETED"
    assert records[0]["WorkDir"] == "/tmp/t/chaosa/home/xffl/chaos/round-0000/jobs"
    assert records[0]["ReservationName"] == "" and records[0]["Tres"] == "cpu=1"


def test_jobs_are_counted_per_round_of_one_campaign_each_job_once():
    records = parse_jobcomp(JOBCOMP)
    assert jobs_per_round(records, "chaos") == {0: ["3"], 1: ["4"], 2: ["6", "7"]}
    assert jobs_per_round(records, "calm") == {1: ["5"]}
    assert jobs_per_round(records, "other") == {}


def test_a_round_with_two_jobs_or_none_is_a_problem_naming_facility_and_round():
    assert job_count_problems({"a": {0: ["1"], 1: ["2"]}, "b": {0: ["3"], 1: ["4"]}}, 2) == []
    assert job_count_problems({"a": {0: ["1"], 1: ["2", "5"]}, "b": {0: ["3"], 2: ["9"]}}, 2) == [
        "a round 1: 2 Slurm jobs ['2', '5'], expected 1",
        "b round 1: 0 Slurm jobs [], expected 1",
        "b: jobs of rounds [2] beyond the 2 rounds",
    ]


@pytest.mark.parametrize(
    "name",
    [
        ".model.safetensors.xffl-part",
        ".global.partial-k2j4h1x0",
        ".local.tmp-abc_123",
        "job-12.end.4242.tmp",
        "weights.part",
        ".manifest.json.a1b2c3d4",
        ".report.png.zz_9yy8x.png",
        "global.stale-1764870000",
    ],
)
def test_unfinished_names_are_recognised(name):
    assert is_partial_name(name)


@pytest.mark.parametrize(
    "name",
    ["manifest.json", "model.safetensors", "metrics.json", "xffl_chaos.chaosa.train-12.log", ".bashrc",
     "global", "round-0001", "chaosa.rejected", "report.png", "particle.json"],
)  # fmt: skip
def test_finished_names_are_not(name):
    assert not is_partial_name(name)


def test_partial_paths_look_at_the_last_component_only():
    paths = ["/s/c/round-0000/global", "/s/c/round-0000/.global.partial-ab12cd34/model.safetensors",
             "/s/c/round-0000/.global.partial-ab12cd34", "/w/c/round-0001/local/.model.safetensors.xffl-part"]  # fmt: skip
    assert partial_paths(paths) == [
        "/s/c/round-0000/.global.partial-ab12cd34",
        "/w/c/round-0001/local/.model.safetensors.xffl-part",
    ]


def test_the_model_digest_ignores_the_aggregation_report_and_server_state():
    files = {"model.safetensors": "aa", "config.json": "bb"}
    digest = model_digest(files)
    # sha256 of "config.json<TAB>bb<LF>model.safetensors<TAB>aa": sorted lines, no final newline
    assert digest == "822ac7418b724c2be1365423d7706755804d99902ebbc04b28baeb643a85120f"
    assert (
        model_digest({**files, "aggregation.json": "cc", "server_state/m.safetensors": "dd"})
        == digest
    )
    assert model_digest({"model.safetensors": "ab", "config.json": "bb"}) != digest
    assert model_digest({"model2.safetensors": "aa", "config.json": "bb"}) != digest


def test_an_outcome_that_kept_the_promise_has_no_problem():
    ok = dict(rounds=2, run_states=["success", "success"], calm_digest="d", chaos_digest="d",
              jobs={"a": {0: ["1"], 1: ["2"]}}, partial=[], verify_rc=0)  # fmt: skip
    assert outcome_problems(**ok) == []
    broken = outcome_problems(**{**ok, "run_states": ["success", "failed"], "chaos_digest": "e",
                                 "jobs": {"a": {0: ["1", "3"], 1: ["2"]}}, "partial": ["/x/.a.xffl-part"],
                                 "verify_rc": 1})  # fmt: skip
    assert broken == [
        "round runs ended ['success', 'failed'], expected 2 x success",
        "final global model sha256 e differs from the calm run's d",
        "a round 0: 2 Slurm jobs ['1', '3'], expected 1",
        "1 unfinished file(s) left: ['/x/.a.xffl-part']",
        "the manifest chain does not verify (xffl_tasks.verify exit 1)",
    ]
    assert outcome_problems(**{**ok, "calm_digest": None, "chaos_digest": None}) == [
        "final global model sha256 None differs from the calm run's None"
    ]

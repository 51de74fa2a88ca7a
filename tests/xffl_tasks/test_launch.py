"""Rank and rendezvous mapping from torchrun and Slurm variables: pure, on literal environments.

The Slurm environments below are what a 22.05 batch script and its ``srun --ntasks=2`` step
printed on the local test bed (trimmed to the variables that matter). Starts nothing.
"""

from __future__ import annotations

import pytest

from xffl_tasks.launch import (
    DEFAULT_MASTER_PORT,
    DistributedLaunch,
    LaunchError,
    expand_nodelist,
    export_launch,
    first_host,
    resolve_launch,
    tasks_per_node,
)

BATCH_SHELL = {
    "SLURM_CPUS_PER_TASK": "1",
    "SLURM_JOB_ID": "1",
    "SLURM_JOB_NODELIST": "localhost",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NODELIST": "localhost",
    "SLURM_NPROCS": "2",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_TASKS_PER_NODE": "2",
}
SRUN_TASK_1 = {
    "SLURM_CPUS_PER_TASK": "1",
    "SLURM_JOB_ID": "1",
    "SLURM_JOB_NODELIST": "localhost",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NODELIST": "localhost",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "localhost",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2",
}


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("localhost", ["localhost"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("lrdn[0001-0002],lrdn0100", ["lrdn0001", "lrdn0002", "lrdn0100"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("cn[9]-ib", ["cn9-ib"]),
        (" x[1-2] ", ["x1", "x2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "message"),
    [
        ("", "empty"),
        ("node[1-", "'[' without ']'"),
        ("node1]", "']' without '['"),
        ("node[3-1]", "runs backwards"),
        ("node[a-b]", "bad range"),
        ("node[1,,2]", "bad range"),
        ("a,,b", "empty entry"),
        ("n[[1]]", "nested"),
        ("n[0-200000]", "more than"),
    ],
)
def test_bad_nodelists_are_named(nodelist, message):
    with pytest.raises(LaunchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        expand_nodelist(nodelist)


def test_first_host():
    assert first_host("node[01-04,07]") == "node01"
    assert first_host("c[12,3]") == "c12"


def test_tasks_per_node():
    assert tasks_per_node("4(x2),3") == 4
    assert tasks_per_node("2") == 2
    with pytest.raises(LaunchError):
        tasks_per_node("x")


def test_alone():
    assert resolve_launch({}) == DistributedLaunch(
        0, 0, 1, 1, "127.0.0.1", DEFAULT_MASTER_PORT, "single"
    )


def test_a_batch_script_without_srun_runs_alone():
    # SLURM_NTASKS=2 and SLURM_PROCID=0 in the batch shell, but no step: not a rank of two.
    launch = resolve_launch(BATCH_SHELL)
    assert (launch.rank, launch.world_size, launch.source) == (0, 1, "single")


def test_srun_task_maps_slurm_variables():
    launch = resolve_launch(SRUN_TASK_1)
    assert launch == DistributedLaunch(
        rank=1, local_rank=1, world_size=2, local_world_size=2, master_addr="localhost",
        master_port=15001, source="slurm",
    )  # fmt: skip


def test_srun_multi_node_first_host_and_port():
    environ = {
        **SRUN_TASK_1,
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "lrdn[0031-0032]",
        "SLURM_JOB_NODELIST": "lrdn[0031-0032]",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    launch = resolve_launch(environ)
    assert (launch.rank, launch.local_rank, launch.world_size, launch.local_world_size) == (
        5,
        1,
        8,
        4,
    )
    assert launch.master_addr == "lrdn0031"
    assert launch.master_port == 15000 + 4242 % 20000
    assert resolve_launch(environ, master_port=30001).master_port == 30001
    assert resolve_launch({**environ, "MASTER_PORT": "29999"}).master_port == 29999


def test_srun_job_nodelist_when_no_step_nodelist():
    environ = {k: v for k, v in SRUN_TASK_1.items() if k != "SLURM_STEP_NODELIST"}
    environ["SLURM_JOB_NODELIST"] = "gpu[07-08]"
    assert resolve_launch(environ).master_addr == "gpu07"


def test_torchrun_variables_win_over_slurm():
    environ = {
        **SRUN_TASK_1,
        "RANK": "3",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "29400",
    }
    assert resolve_launch(environ) == DistributedLaunch(3, 3, 8, 4, "node01", 29400, "torchrun")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
            "RANK=2 is not below WORLD_SIZE=2",
        ),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        (
            {**SRUN_TASK_1, "SLURM_PROCID": "2"},
            "SLURM_PROCID=2 is not below SLURM_STEP_NUM_TASKS=2",
        ),
        ({**SRUN_TASK_1, "SLURM_STEP_NODELIST": "n[1-"}, "SLURM_STEP_NODELIST: node list"),
        ({**SRUN_TASK_1, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ],
)
def test_inconsistent_environments_name_the_variable(environ, message):
    with pytest.raises(LaunchError, match=message.replace("[", r"\[")):
        resolve_launch(environ)


def test_bad_master_port_argument():
    with pytest.raises(LaunchError, match="master_port=0"):
        resolve_launch({}, master_port=0)


def test_export_launch_writes_env_variables():
    environ: dict[str, str] = {}
    export_launch(DistributedLaunch(1, 0, 4, 2, "n1", 12345, "slurm"), environ)
    assert environ == {
        "RANK": "1",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "12345",
    }

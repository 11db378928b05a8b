"""How a launch is read from the environment: torchrun / the legacy launcher, an srun step of several tasks,
and the shells that only look like one (a multi-task allocation running one process)."""
from __future__ import annotations

import pytest

from vanillakd.distributed import init_distributed, launched_processes
from vanillakd.errors import UserError

NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
         "SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MASTER_ADDR",
         "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for name in NAMES:  # set then deleted, so that the test's end restores each name as it was
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def set_(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))
    return set_


def test_no_launcher_is_one_process(env):
    assert launched_processes() == (1, 0, 0)


def test_a_multi_task_allocation_shell_is_one_process(env):
    # `salloc -n 2` / an sbatch script with --ntasks=2 running plain python: no srun step of several tasks
    env(SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_LOCALID=0)
    assert launched_processes() == (1, 0, 0)
    assert init_distributed().world_size == 1


def test_srun_step_of_several_tasks(env):
    env(SLURM_NTASKS=4, SLURM_STEP_NUM_TASKS=4, SLURM_PROCID=3, SLURM_LOCALID=1)
    assert launched_processes() == (4, 3, 1)


def test_torchrun_names_win(env):
    env(WORLD_SIZE=2, RANK=1, LOCAL_RANK=1, SLURM_STEP_NUM_TASKS=1, SLURM_PROCID=0)
    assert launched_processes() == (2, 1, 1)


def test_legacy_local_rank_flag_when_the_environment_has_none(env):
    env(WORLD_SIZE=2, RANK=1)
    assert launched_processes(local_rank_flag=1) == (2, 1, 1)


def test_missing_rendezvous_address_is_one_line(env):
    env(SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=0, SLURM_LOCALID=0)
    with pytest.raises(UserError, match="2 processes were launched but MASTER_ADDR and MASTER_PORT not set"):
        init_distributed(want_cuda=False)

"""Cluster launches, tested on one CPU machine: SLURM (the composed launcher config, the sbatch
file submitit would submit, Lightning's SLURM environment, submitit's local executor), torchrun
with two processes as two nodes, and an Optuna sweep, the last three through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from project.training.cluster import slurm_plugins

SLURM_FLAGS = ["trainer=slurm", "trainer.num_nodes=2", "trainer.devices=4"]

ROOT = Path(__file__).resolve().parents[1]


def compose_with_hydra(overrides: list[str], tmp_path: Path) -> DictConfig:
    """The training config with its ``hydra`` node (launcher and sweeper), writing under
    ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(
            config_name="train",
            overrides=[*overrides, f"paths.log_dir={tmp_path}"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    return cfg


def run_train(args: list[str], tmp_path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``scripts/train.py`` with the fast settings, writing under ``tmp_path``."""
    return subprocess.run(
        [sys.executable, "scripts/train.py", *args, *cli_paths(tmp_path)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def cli_paths(tmp_path: Path) -> list[str]:
    return [f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}/data"]


def only_child(path: Path) -> Path:
    children = list(path.iterdir())
    assert len(children) == 1, children
    return children[0]


@pytest.fixture
def restore_rank_zero():
    """Building a DDP trainer sets the process-wide rank of ``rank_zero_only``; put it back so
    later tests in this process still write their files."""
    rank = rank_zero_only.rank
    yield
    rank_zero_only.rank = rank


# --- SLURM: the launcher config and the sbatch file it makes ----------------------------------
def test_slurm_launcher_follows_trainer(tmp_path: Path) -> None:
    cfg = compose_with_hydra(["hydra/launcher=slurm", *SLURM_FLAGS], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # One task per device on every node: what Lightning's SLURMEnvironment checks.
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy")
    assert cfg.trainer.accelerator == "gpu"
    assert str(tmp_path) in launcher.submitit_folder  # beside the sweep's job directories


def test_slurm_submission_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real launcher builds the real submitit executor; only the submission is replaced by
    reading the sbatch file it would submit."""
    cfg = compose_with_hydra(
        ["hydra/launcher=slurm", *SLURM_FLAGS, "hydra.launcher.partition=gpu"], tmp_path
    )
    # submitit's SLURM executor refuses to start where no `srun` is on the PATH.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    sbatch: list[str] = []

    class NoSubmit(submitit.AutoExecutor):
        def map_array(self, fn, *iterable):
            inner = self._executor
            sbatch.append(inner._make_submission_file_text(inner._submitit_command_str, "test"))
            return []

    monkeypatch.setattr(submitit, "AutoExecutor", NoSubmit)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    assert launcher.launch([["model.optimizer.lr=0.001"]], initial_job_idx=0) == []

    (text,) = sbatch
    lines = text.splitlines()
    for flag in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--partition=gpu",
        "--time=240",
        "--signal=USR2@120",
    ):
        assert f"#SBATCH {flag}" in lines, (flag, text)
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert "-m submitit.core._submit" in srun  # srun starts the tasks, each runs the Hydra job


# --- SLURM: what Lightning makes of the srun task ---------------------------------------------
def test_trainer_reads_ranks_from_slurm(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_rank_zero,
    fast_overrides,
    compose_train,
) -> None:
    """Task 5 of 2 nodes x 4 tasks: node 1, local rank 1, with the auto-requeue plugin."""
    for key, value in {
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NNODES": "2",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "1234",
        "MASTER_PORT": "12910",
    }.items():
        monkeypatch.setenv(key, value)
    # Unset, so Lightning derives it from the node list; its own setting is undone afterwards.
    monkeypatch.setenv("MASTER_ADDR", "")
    monkeypatch.delenv("MASTER_ADDR")
    cfg = compose_train([*fast_overrides, *SLURM_FLAGS, "trainer.accelerator=cpu"], tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[], logger=False)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert env.auto_requeue
    assert env.requeue_signal == signal.SIGUSR1
    assert env.creates_processes_externally  # Lightning starts no processes of its own
    assert (trainer.world_size, trainer.global_rank) == (8, 5)
    assert (trainer.node_rank, trainer.local_rank) == (1, 1)
    assert (trainer.num_nodes, trainer.num_devices) == (2, 4)
    assert env.main_address == "gpu07"  # the first node of gpu[07-08]


def test_slurm_trainer_outside_slurm(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_rank_zero,
    fast_overrides,
    compose_train,
) -> None:
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    cfg = compose_train(
        [*fast_overrides, "trainer=slurm", "trainer.accelerator=cpu", "trainer.devices=1"], tmp_path
    )
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[], logger=False)
    assert not isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.world_size == 1


def test_slurm_plugins_rejects_unknown_signal() -> None:
    with pytest.raises(ValueError, match="SIGUSR3"):
        slurm_plugins(requeue_signal="SIGUSR3")


# --- SLURM: the example batch script, with srun played by a shell loop -----------------------
FAKE_SRUN = """#!/bin/bash
# srun on one node: drop the options, start SLURM_NTASKS copies of the command with their ids.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""


def test_sbatch_script_two_tasks(tmp_path: Path, fast_overrides) -> None:
    """scripts/slurm/train.sbatch as SLURM would run it for one node with two tasks: both
    tasks train one model as ranks of SLURMEnvironment, in one run directory."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text(FAKE_SRUN)
    (fake_bin / "srun").chmod(0o755)
    run_dir = tmp_path / "logs" / "run"
    env = {
        **cli_env(),
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "RUN_DIR": str(run_dir),
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_NODELIST": "localhost",
        "MASTER_PORT": str(free_port()),
    }
    result = subprocess.run(
        [
            "bash",
            "scripts/slurm/train.sbatch",
            *fast_overrides,
            "trainer.accelerator=cpu",
            *cli_paths(tmp_path / "logs"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    assert {p.name for p in (tmp_path / "logs").iterdir()} <= {"run", "data"}  # nothing stray
    assert list(tmp_path.rglob("metrics.json")) == [run_dir / "metrics.json"]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["world_size"] == 2
    assert summary["global_step"] == 3  # each task: 179 of the 358 training rows
    config = OmegaConf.load(run_dir / "config.yaml")
    assert (config.trainer.num_nodes, config.trainer.devices) == (1, 2)


# --- submitit's local executor: the launcher's code path without a cluster --------------------
def test_submitit_local_multirun(tmp_path: Path, fast_overrides) -> None:
    result = run_train(["-m", "hydra/launcher=local", *fast_overrides], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep_dir = only_child(tmp_path / "train" / "multiruns")
    job_dir = sweep_dir / "0"
    summary = json.loads((job_dir / "metrics.json").read_text())
    assert summary["world_size"] == 1
    assert "test/auroc" in summary["metrics"]
    assert (job_dir / "config.yaml").is_file()
    assert OmegaConf.load(job_dir / "config.yaml").paths.output_dir == str(job_dir)
    # The job ran in a submitit subprocess, which left its logs and result beside the jobs.
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))


# --- torchrun: two processes as two nodes over loopback ---------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_nodes(tmp_path: Path, fast_overrides) -> None:
    """One model trained by two torchrun "nodes" of one CPU process each, in one run directory.

    Every node runs Hydra, and the default run directory holds the start time: both get the
    same explicit ``hydra.run.dir``; node 1 also skips Hydra's ``.hydra`` copy of the config."""
    run_dir = tmp_path / "run"
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node_rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
        ]
        args = [
            *fast_overrides,
            "trainer.num_nodes=2",
            "trainer.devices=1",
            "trainer.strategy=ddp",
            f"hydra.run.dir={run_dir}",
            *cli_paths(tmp_path),
            *(["hydra.output_subdir=null"] if node_rank else []),
        ]
        procs.append(
            subprocess.Popen(
                [*torchrun, "scripts/train.py", *args],
                cwd=ROOT,
                env=cli_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]

    assert {p.name for p in tmp_path.iterdir()} <= {"run", "data"}  # nothing stray
    hydra_dirs = [p for p in tmp_path.rglob("*") if p.is_dir() and "hydra" in p.name]
    assert hydra_dirs == [run_dir / ".hydra"]
    # Rank zero alone wrote the run's files.
    assert list(tmp_path.rglob("metrics.json")) == [run_dir / "metrics.json"]
    assert sorted(tmp_path.rglob("config.yaml")) == [
        run_dir / ".hydra" / "config.yaml",
        run_dir / "config.yaml",
    ]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["world_size"] == 2
    # Each rank trains on its own half of the 358 training rows: 3 batches of 64, not 6.
    assert summary["global_step"] == 3
    assert "test/auroc" in summary["metrics"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


# --- Optuna sweep -----------------------------------------------------------------------------
def test_optuna_sweep_two_trials(tmp_path: Path, fast_overrides) -> None:
    result = run_train(
        ["-m", "hparams_search=mlp_optuna", "hydra.sweeper.n_trials=2", *fast_overrides], tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    sweep_dir = only_child(tmp_path / "train" / "multiruns")
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in trials] == ["0", "1"]  # a run directory per trial

    scores, choices = [], []
    for trial in trials:
        summary = json.loads((trial / "metrics.json").read_text())
        scores.append(summary["metrics"]["val/auroc"])
        config = OmegaConf.load(trial / "config.yaml")
        assert config.paths.output_dir == str(trial)
        assert 1e-4 <= config.model.optimizer.lr <= 1e-2
        choices.append((config.model.optimizer.lr, OmegaConf.to_container(config.model.net.hidden)))
    assert choices[0] != choices[1]  # the sampler chose each trial's settings

    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.name == "optuna"
    assert set(best.best_params) == {"model.optimizer.lr", "model.net.hidden"}
    assert best.best_value == pytest.approx(max(scores))  # maximised val/auroc
    best_trial = trials[scores.index(max(scores))]
    assert OmegaConf.load(best_trial / "config.yaml").model.optimizer.lr == pytest.approx(
        best.best_params["model.optimizer.lr"]
    )

"""Cluster glue for ``trainer=slurm``: Lightning's SLURM environment with auto-requeue.

Lightning finds the ranks of a multi-node job by itself: ``SLURMEnvironment`` when ``srun``
started the processes (``SLURM_NTASKS`` set), ``TorchElasticEnvironment`` under ``torchrun``.
Nothing here replaces that detection; :func:`slurm_plugins` only lets a YAML config choose the
requeue options, which Lightning takes as a ``signal.Signals`` value YAML cannot spell.
"""

from __future__ import annotations

import signal

from lightning.fabric.plugins.environments import SLURMEnvironment


def slurm_plugins(auto_requeue: bool = True, requeue_signal: str = "SIGUSR1") -> list:
    """Trainer ``plugins`` for a SLURM job: a :class:`SLURMEnvironment` with the given requeue
    options when this process runs as an ``srun`` task, otherwise none (an interactive
    ``salloc`` shell or a laptop), so ``trainer=slurm`` stays usable outside a batch job.

    With ``auto_requeue``, Lightning saves ``hpc_ckpt_<n>.ckpt`` in the run directory on
    ``requeue_signal`` (``sbatch --signal=SIGUSR1@90``) and requeues the job; the requeued job
    resumes from it when it reuses the run directory (``hydra.run.dir=.../$SLURM_JOB_ID``).
    """
    try:
        signum = signal.Signals[requeue_signal.upper()]
    except KeyError:
        names = sorted(s.name for s in signal.Signals)
        raise ValueError(f"requeue_signal={requeue_signal!r} is not one of {names}") from None
    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=signum)]

"""Launch layer: Slurm environment mapping and the submitit phase chain."""

from mtlxray.launch.slurm import SlurmDistEnv, expand_nodelist, master_port, slurm_dist_env, slurm_parameters
from mtlxray.launch.submit import Pipeline, PhaseReport, TrainJob, submit_pipeline

__all__ = [
    "SlurmDistEnv", "expand_nodelist", "master_port", "slurm_dist_env", "slurm_parameters",
    "Pipeline", "PhaseReport", "TrainJob", "submit_pipeline",
]

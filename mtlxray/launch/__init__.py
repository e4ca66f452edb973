"""Launch layer: Slurm parameters and the submitit phase chain."""

from mtlxray.launch.slurm import slurm_parameters
from mtlxray.launch.submit import Pipeline, PhaseReport, TrainJob, submit_pipeline

__all__ = ["slurm_parameters", "Pipeline", "PhaseReport", "TrainJob", "submit_pipeline"]

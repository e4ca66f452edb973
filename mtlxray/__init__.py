"""mtlxray: multi-task Swin-UNet training for chest X-rays on Slurm GPU clusters."""

__version__ = "0.1.0"

CLASS_NAMES = ("Normal", "Non-COVID", "COVID-19")
"""Class labels in index order; COVID-19 (2) is the only class with infection masks."""

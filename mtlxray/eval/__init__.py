"""Evaluation shared by training-time validation, `mtlxray evaluate` and `mtlxray predict`.

`records` (per-image records and the one summary), `metrics` (segmentation and classification
metrics on tensors), `detection_metrics` (box mAP and false positives) and `gate` (the gate before
the infection and box heads).
"""

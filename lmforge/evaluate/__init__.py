"""Evaluation: language modelling (lm), task metrics (tasks), the lm-evaluation-harness adapter."""

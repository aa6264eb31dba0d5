"""Thin drivers: fine-tuning, attacks, metrics, reports, the demo and the study."""

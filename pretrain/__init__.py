"""Pretraining: one file per self-supervised method, one shared trainer."""

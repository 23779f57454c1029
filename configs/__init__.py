"""Experiment configs (ml_collections Python files with ``get_config()``)."""

"""Reproduction configs: one file per paper claim (docs/reproductions.md)."""

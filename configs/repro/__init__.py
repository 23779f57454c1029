"""Reproduction configs: one file per paper claim (docs/reproductions.md)."""

import pathlib

# the byte-level LM reproductions' corpus: the README and zoo/ sources at commit cd13012, frozen so
# the numbers do not move with the code
CORPUS = pathlib.Path(__file__).resolve().parent / "data" / "zoo_sources.txt"

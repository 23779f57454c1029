"""The README's code blocks run as written."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_hybrid_lm_example_runs(capsys):
    (block,) = [b for b in _blocks() if "DecoderLM(" in b]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out.split("\n")
    loss = float(out[0])
    assert 0.0 < loss < 10.0
    assert namespace["generate"] is not None
    assert "[[" in out[1]


def test_readme_transforms_example_runs():
    (block,) = [b for b in _blocks() if "za.names()" in b]
    block = block.replace("(2, 1024, 4, 64)", "(1, 64, 4, 8)").replace("window=256", "window=16")
    block = block.replace("chunk_size=64", "chunk_size=16")
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102

"""The learned heads of the ICL sweep's softmax runs, against the paper's structural claims.

    python docs/repro_icl_regression/kq_ov.py runs/repro_icl docs/repro_icl_regression/kq_ov.json

Per head ``h`` (``z = (x, y)``, width 6; the logit is ``z_q^T KQ_h z_j`` with ``KQ_h = W_Q^h W_K^h^T``):
``kq_c`` = trace of the x-block of ``KQ_h`` / 5 (the ``c`` of ``KQ ~ c I``), ``kq_rel_offdiag`` =
``||KQ_x - c I|| / ||KQ_x||``; ``ov_y`` = the y-entry of ``W_V^h W_O^h`` (what the head adds per
unit of ``y_j``), ``ov_x_norm`` = the norm of its x-entries (the paper: last-entry-only, and the
``ov_y`` of all heads summing to about 0).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def heads(run_dir: pathlib.Path) -> list[dict]:
    from flax import nnx

    from zoo import run

    r = run.evaluate(run_dir, splits=["test"])
    flat = {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(r["model"], nnx.Param))}
    wq, wk, wv, wo = (flat[f"attn/{n}_proj"] for n in "qkvo")  # [E, H, E] x3, [H, E, 1]
    d = wq.shape[0] - 1
    out = []
    for h in range(wq.shape[1]):
        x = (wq[:, h] @ wk[:, h].T)[:d, :d]
        c = np.trace(x) / d
        ov = (wv[:, h] @ wo[h])[:, 0]
        out.append({"head": h, "kq_c": float(c), "kq_rel_offdiag": float(np.linalg.norm(x - c * np.eye(d)) /
                                                                          np.linalg.norm(x)),
                    "ov_y": float(ov[d]), "ov_x_norm": float(np.linalg.norm(ov[:d]))})
    return out


def main(sweep_dir: str, out: str) -> None:
    res = {}
    for d in sorted(pathlib.Path(sweep_dir).iterdir()):
        if d.name.startswith("softmax") and (d / "checkpoints").is_dir():
            hs = heads(d)
            res[d.name] = {"heads": hs, "sum_ov_y": sum(h["ov_y"] for h in hs)}
            print(d.name, f"sum ov_y {res[d.name]['sum_ov_y']:+.3f}",
                  " ".join(f"[c {h['kq_c']:+.2f} off {h['kq_rel_offdiag']:.2f} ov_y {h['ov_y']:+.2f}]" for h in hs))
    pathlib.Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])

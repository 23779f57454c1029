"""zoo.data: procedurally generated benchmark tasks, TF-free tfds builders and grain pipelines.

Typical use::

    from zoo import data
    sources = data.build("mqar", "/tmp/tfds", seed=0, vocab_size=256, seq_len=64)
    spec = sources.spec              # kind, vocab_size, seq_len, input/output dims
    it = data.make_iterator(sources["train"], batch_size=64, seed=0)
    batch = next(it)                 # {"inputs": int32[64, 64], "targets": int32[64, 64]}
    state = it.get_state()           # store with the checkpoint; it.set_state(state) resumes
    fast = data.to_memory(sources["train"])   # optional: decode once, then index arrays

Tasks (``data.tasks()``; ``data.get_task(name)`` gives parameters, splits and spec):

* ``mqar``: multi-query associative recall (zoology);
* ``selective_copying``: Mamba / MAD selective copying;
* ``niah``: single needle in a haystack, length splits ``test_len{L}``;
* ``icl_regression``: in-context linear regression (He et al. ICML'25), with
  :func:`icl_regression.baselines` (Bayes/ridge, least squares, zero predictor);
* ``positional_{sum,min,median,sort,max_subarray}``: positional-attention tasks with OOD
  value-range splits ``test_c2 .. test_c10``;
* ``bytes_lm``: byte-level language modelling over local text files.

Real tfds datasets (``tiny_shakespeare``, ``lm1b``, ``imdb_reviews``, ``cifar10``, ...) load
with :func:`load_tfds` into the same formats. No TensorFlow is needed anywhere.
"""

from zoo.data import bytes_lm, copying, icl_regression, mqar, niah, positional
from zoo.data.builder import Sources, ZooSynthetic, build, builder
from zoo.data.copying import selective_copying
from zoo.data.icl_regression import baselines as icl_baselines
from zoo.data.mqar import multiquery_ar
from zoo.data.niah import single_needle
from zoo.data.pipeline import ArraySource, make_iterator, to_memory
from zoo.data.positional import positional_targets, positional_task
from zoo.data.real import load_tfds
from zoo.data.registry import IGNORE_INDEX, Param, Split, Task, TaskSpec, get_task, tasks

__all__ = [
    "ArraySource",
    "IGNORE_INDEX",
    "Param",
    "Sources",
    "Split",
    "Task",
    "TaskSpec",
    "ZooSynthetic",
    "build",
    "builder",
    "bytes_lm",
    "copying",
    "get_task",
    "icl_baselines",
    "icl_regression",
    "load_tfds",
    "make_iterator",
    "mqar",
    "multiquery_ar",
    "niah",
    "positional",
    "positional_targets",
    "positional_task",
    "selective_copying",
    "single_needle",
    "tasks",
    "to_memory",
]

"""A generic TF-free tfds builder for the registered tasks, and :func:`build`.

One builder class, :class:`ZooSynthetic` (tfds name ``zoo_synthetic``), serves every task: each
(task, parameters, seed) gets its own ``BuilderConfig`` whose name is the task name plus a hash
of the resolved parameters, the seed and the generator version, so different parameters never
collide in ``data_dir``::

    data_dir/zoo_synthetic/<task>_<hash16>/1.0.0/zoo_synthetic-<split>.array_record-*

Files are array_record (the only format tfds can write and read without TensorFlow), the
``DatasetInfo`` is built directly (no package metadata directory needed), and shuffling at write
time is disabled, so example ``i`` of a split is the ``i``-th generated example. The resolved
parameters and the :class:`~zoo.data.registry.TaskSpec` are stored in the dataset metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from zoo.data import registry as R


class ZooSynthetic(tfds.core.GeneratorBasedBuilder):
    """tfds builder for one registered task with given parameters and seed (array_record)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Generated tasks of zoo.data (generator version in config name)."}

    # No code directory with checksums / metadata: the generic lookup would also need the
    # optional `importlib_resources` package for a builder defined inside a package.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None

    def __init__(
        self,
        *,
        task: str | None = None,
        params: dict[str, Any] | None = None,
        seed: int = 0,
        config: Any = None,
        **kwargs: Any,
    ):
        if task is None:
            # Read-only use (e.g. through tfds.data_source): the config names prepared data.
            super().__init__(config=config, **kwargs)
            return
        self._task = R.get_task(task)
        self._params = self._task.resolve(**(params or {}))
        self._seed = R.check_int("seed", seed, low=0)
        self._spec = self._task.spec_fn(self._params)
        cfg = tfds.core.BuilderConfig(
            name=self._task.cache_key(self._params, self._seed),
            version=self.VERSION,
            description=f"zoo.data task {task!r}",
        )
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=cfg, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self._spec
        features = tfds.features.FeaturesDict(
            {
                k: tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype))
                for k, (shape, dtype) in spec.features.items()
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self._task.description or "").strip().splitlines()[0],
            features=features,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                task=self._task.name,
                params=R._jsonable(self._params),
                seed=self._seed,
                spec=spec.as_dict(),
                generator_version=R.GENERATOR_VERSION,
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        names = self._task.split_fn(self._params)
        return {name: self._generate_examples(name) for name in names}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        index = 0
        for chunk in self._task.iter_split(split, seed=self._seed, resolved=self._params):
            keys = list(chunk)
            for i in range(len(chunk[keys[0]])):
                yield index, {k: chunk[k][i] for k in keys}
                index += 1


class Sources(dict):
    """``{split_name: data source}`` (random-access ``Sequence`` of example dicts) plus metadata.

    Attributes:
      spec: the :class:`~zoo.data.registry.TaskSpec` (kind, vocab size, dims, features).
      params: the resolved task parameters.
      info: the tfds ``DatasetInfo`` (``None`` for sources not backed by tfds).
    """

    def __init__(self, splits: dict[str, Sequence], *, spec: R.TaskSpec, params: dict, info=None):
        super().__init__(splits)
        self.spec = spec
        self.params = params
        self.info = info


def builder(task: str, data_dir: str | os.PathLike, *, seed: int = 0, **params: Any) -> ZooSynthetic:
    """The :class:`ZooSynthetic` builder for ``task`` with ``params`` (not prepared yet)."""
    if data_dir is None or not os.fspath(data_dir):
        raise ValueError(f"data_dir must be a directory path, got {data_dir!r}")
    return ZooSynthetic(task=task, params=params, seed=seed, data_dir=os.fspath(data_dir))


def build(task: str, data_dir: str | os.PathLike, *, seed: int = 0, **params: Any) -> Sources:
    """Generates ``task`` into ``data_dir`` (unless already there) and returns its data sources.

    Args:
      task: a registered task name (see :func:`zoo.data.tasks`).
      data_dir: tfds data directory; the data land in ``data_dir/zoo_synthetic/<config>/1.0.0``.
      seed: generation seed (same seed and params give identical data; the seed is part of the
        cache key).
      **params: task parameters (see ``get_task(task).params``); unknown or invalid ones raise
        ValueError naming the parameter.

    Generation is deterministic, so hosts of a multi-host job may each build into a local
    ``data_dir``; on a shared ``data_dir`` build once (e.g. on process 0) before the others read.
    Processes of one machine that build the same data at the same moment (``--sweep_procs``) all
    succeed: the one that loses the final rename uses the winner's copy.

    Returns:
      :class:`Sources`: ``{split: ArrayRecordDataSource}`` for every split of the task (e.g.
      ``train``, ``test``, ``test_c2`` ...), each indexable to example dicts of numpy arrays,
      with ``.spec``, ``.params`` and ``.info``.
    """
    b = builder(task, data_dir, seed=seed, **params)
    try:
        b.download_and_prepare()
    except FileExistsError:
        # Two processes built the same data at once (a sweep with --sweep_procs): the other one
        # moved its finished copy into place first. Same task, params and seed give identical
        # data, so use that copy (a fresh builder reads it; prepare is then a no-op).
        b = builder(task, data_dir, seed=seed, **params)
        b.download_and_prepare()
    splits = b.as_data_source()
    return Sources(dict(splits), spec=b._spec, params=b._params, info=b.info)

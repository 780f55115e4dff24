"""Normalised images read a batch at a time: the models' input when the dataset is not held.

An :class:`ImageView` is some rows of the extracted images (an in-memory array or an
:class:`~pipeline.features.store.ImageFile` on disk) with the run's normalisation. Indexing
it (a slice, an integer or boolean array or tensor) reads those rows, normalises them and
returns a float32 tensor, so the training loop, :func:`pipeline.fit.predict_logits`,
precise batch norm and test-time adaptation take a view wherever they take a tensor, and
hold a batch at a time. :meth:`ImageView.materialise` is the same computation over every
row at once: the in-memory path and the streamed one give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from pipeline.features.stft import Normalizer, group_profiles
from pipeline.features.store import ImageFile

CHUNK = 2048  # images per read when a whole view is walked through


@dataclass(frozen=True)
class ImageView:
    """Rows ``rows`` of ``source``, normalised by ``normalizer`` (raw for None), each minus
    its group's frequency profile where ``profiles`` is given (``features.per_group``).

    Attributes:
        source: (n, channels, height, width) images before normalisation.
        rows: (m,) the rows of ``source`` in this view, in order.
        normalizer: the run's fitted normaliser, or None for the raw images.
        group: (n,) each source row's index into ``profiles``.
        profiles: (n_groups, channels, height, 1) float32 group profiles.
    """

    source: np.ndarray | ImageFile
    rows: np.ndarray
    normalizer: Normalizer | None = None
    group: np.ndarray | None = None
    profiles: np.ndarray | None = None

    dtype = torch.float32
    device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.source.shape[1:])

    def element_size(self) -> int:
        return 4

    def nelement(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the view's images as float32 (what materialising it takes)."""
        return 4 * self.nelement()

    def __getitem__(self, key) -> Tensor:
        """The normalised images of view rows ``key`` as a float32 tensor on the CPU."""
        rest = ()
        if isinstance(key, tuple):  # view[rows, channel, ...]
            key, rest = key[0], key[1:]
        if isinstance(key, Tensor):
            key = key.cpu().numpy()
        picked = self.rows[key]
        if np.ndim(picked) == 0:
            return self.batch(np.array([picked]))[(0, *rest)]
        return self.batch(picked)[(slice(None), *rest)]

    def batch(self, source_rows: np.ndarray) -> Tensor:
        """The normalised images of ``source`` rows ``source_rows``."""
        x = torch.from_numpy(np.ascontiguousarray(self.source[source_rows], dtype=np.float32))
        if self.normalizer is not None:
            x = self.normalizer.torch(x)
        if self.profiles is not None:
            x = x - torch.from_numpy(self.profiles[self.group[source_rows]])
        return x

    def subset(self, index) -> ImageView:
        """The view of rows ``index`` of this one."""
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        return replace(self, rows=self.rows[index])

    def chunks(self, size: int = CHUNK) -> Iterator[Tensor]:
        """The view's images in order, ``size`` at a time."""
        for i in range(0, len(self), size):
            yield self[i : i + size]

    def materialise(self, device: torch.device | str = "cpu") -> Tensor:
        """Every image of the view in one float32 tensor on ``device``, filled a chunk at a
        time (the only copy held is the result)."""
        out = torch.empty(self.shape, dtype=torch.float32, device=device)
        for i, part in zip(range(0, len(self), CHUNK), self.chunks(), strict=True):
            out[i : i + len(part)] = part.to(device)
        return out

    def to(self, device: torch.device | str) -> Tensor:
        return self.materialise(device)

    def numpy(self) -> np.ndarray:
        return self.materialise().numpy()


def centred_by_group(view: ImageView, groups: np.ndarray) -> ImageView:
    """``view`` with each image's group profile subtracted as it is read (``features.per_group``):
    the profiles (:func:`~pipeline.features.stft.group_profiles`) come from a chunked pass
    over ``view``; ``groups`` holds the group of each of its source rows."""
    keys = np.asarray(groups, dtype=object).astype(str)
    profiles = group_profiles(view, keys[view.rows])
    names = {name: i for i, name in enumerate(profiles)}
    group = np.array([names.get(g, -1) for g in keys], dtype=np.int64)
    return replace(view, group=group, profiles=np.stack(list(profiles.values())))


def take(x: Tensor | ImageView, index: np.ndarray) -> Tensor | ImageView:
    """Rows ``index`` of ``x``: a tensor's copied, a view's as a view (nothing read yet)."""
    return x.subset(index) if isinstance(x, ImageView) else x[torch.from_numpy(index)]


def as_numpy(x: Tensor | ImageView) -> np.ndarray:
    """A tensor's or a view's images as a numpy array (a view is read whole)."""
    return x.numpy() if isinstance(x, ImageView) else x.cpu().numpy()


def chunked(fn, x: Tensor | ImageView) -> np.ndarray:
    """``fn`` (numpy images -> numpy rows) over ``x``: at once for a tensor, a chunk at a time
    for a view, so a view is never held whole."""
    if not isinstance(x, ImageView):
        return fn(x.cpu().numpy())
    parts = [fn(part.numpy()) for part in x.chunks()]
    return np.concatenate(parts) if parts else fn(np.empty(x.shape, np.float32))

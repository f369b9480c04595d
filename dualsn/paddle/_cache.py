"""What a forward keeps for later: the sigma of the last forward (:class:`_SigmaRecord`, read
by :func:`dualsn.paddle.sigma` without a pass over W), the normalized weight of the last eval
forward (:class:`_EvalCache`), the checks that tell whether they still belong to W, u and v
(:class:`_Watched`), and the ``<name>_sigma`` buffer of ``track_sigma``."""

from __future__ import annotations

import numpy as np
import paddle

from dualsn.paddle._dtypes import _NUMPY_COMPLEX, _is_complex
from dualsn.paddle._matrix import _prod

# Paddle: a larger sample than torch's 256 entries: here the contents, not version counters,
# must catch optimizer steps and set_value (see _EvalCache).
_SAMPLE_BLOCKS, _BLOCK_LENGTH = 16, 256

_FULL_CHECK_SIZE = _SAMPLE_BLOCKS * _BLOCK_LENGTH
"""Weights up to this many entries (the sample's size) are compared in full by the eval
cache; larger ones by the sample (see :func:`_sample_step`), so a cache hit reads at most
4096 entries of W, whatever its size (issue 14: a full compare of a 256 x 256 W cost as much
as the plain layer's forward)."""


def _sample_step(weight) -> int | None:
    """Where the eval cache samples ``weight`` (None: it compares all entries).

    All entries of a small weight. Of a large one, ``_SAMPLE_BLOCKS`` blocks of
    ``_BLOCK_LENGTH`` consecutive entries of the flattened storage, starting every ``step``
    entries, with ``step`` coprime with the stored row length so that the blocks fall in
    different rows and column ranges. Few contiguous blocks rather than many scattered
    entries because W is cold in cache after the layer's own pass over the normalized
    weight: the cost is in the pages and cache lines touched.
    """
    n = _prod(weight.shape)
    if n <= _FULL_CHECK_SIZE:
        return None
    cols = n // int(weight.shape[0])
    step = n // _SAMPLE_BLOCKS
    while np.gcd(step, cols) != 1:
        step -= 1
    return step


def _host_view(t):
    """A numpy array on ``t``'s memory (no copy) when it can have one (CPU, a dtype numpy
    has), else None. Reading the cache's samples through it avoids a Paddle op per check."""
    if not t.place.is_cpu_place():
        return None
    try:
        return np.from_dlpack(t.detach())
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None


class _Watched:
    """One tensor the eval cache depends on: the object, where its memory is, its inplace
    version, and the bytes of (a sample of) its entries."""

    __slots__ = ("tensor", "key", "step", "view", "gather_index", "sample")

    def __init__(self, tensor, step: int | None = None) -> None:
        self.tensor = tensor
        self.key = self._key(tensor)
        self.step = step  # see _sample_step; None: all entries
        self.view = _host_view(tensor)
        self.gather_index = None
        if self.view is not None:
            self.view = self.view.reshape(-1)
            if step is not None:  # the blocks as one strided view: nothing to gather
                self.view = self.view[: _SAMPLE_BLOCKS * step].reshape(_SAMPLE_BLOCKS, step)
                self.view = self.view[:, :_BLOCK_LENGTH]
        elif step is not None:
            self.gather_index = paddle.to_tensor(self.index, place=tensor.place)
        self.sample = self._read().tobytes()

    @property
    def index(self) -> np.ndarray | None:
        """The sampled positions in the flattened tensor (None: all of them)."""
        if self.step is None:
            return None
        starts = np.arange(_SAMPLE_BLOCKS, dtype=np.int64) * self.step
        return (starts[:, None] + np.arange(_BLOCK_LENGTH, dtype=np.int64)).reshape(-1)

    @staticmethod
    def _key(t) -> tuple:
        # A new allocation (replaced, cast, moved, re-initialized) or an in-place op (in-place
        # reshapes and casts included). Kept to two attribute reads: in the cold cache after
        # a large forward each costs several microseconds.
        return (t.data_ptr(), t.inplace_version)

    def _read(self) -> np.ndarray:
        if self.view is not None:
            return self.view
        flat = self.tensor.reshape([-1])
        if self.gather_index is not None:
            flat = paddle.gather(flat, self.gather_index)
        return flat.numpy()

    def unchanged(self, tensor) -> bool:
        return (
            tensor is self.tensor
            and self._key(tensor) == self.key
            # the bytes, not the values: one memcmp instead of two numpy ufunc calls (an
            # unchanged NaN then counts as unchanged, a 0.0 written over -0.0 as a change)
            and self._read().tobytes() == self.sample
        )

    def refresh(self, tensor) -> bool:
        """Sample ``tensor`` anew if it is the watched tensor, in the same memory (the host
        view stays valid: it holds that memory); False if it is not."""
        if tensor is not self.tensor or tensor.data_ptr() != self.key[0]:
            return False
        self.key = self._key(tensor)
        self.sample = self._read().tobytes()
        return True


class _SigmaRecord:
    """The sigma of the last forward (or :func:`sigma` read), valid while W, u and v are
    unchanged: the checks of :class:`_EvalCache` (same objects, memory, inplace versions and
    sampled contents). :func:`sigma` returns it without a pass over W."""

    __slots__ = ("watched", "sigma")

    def __init__(self, weight, u, v, sigma) -> None:
        self.watched = (_Watched(weight, _sample_step(weight)), _Watched(u), _Watched(v))
        self.sigma = sigma

    def valid(self, weight, u, v) -> bool:
        watched_weight, watched_u, watched_v = self.watched
        return watched_u.unchanged(u) and watched_v.unchanged(v) and watched_weight.unchanged(weight)

    @classmethod
    def renewed(cls, old, weight, u, v, sigma) -> "_SigmaRecord":
        """A record of ``sigma`` for W, u, v: ``old`` refreshed in place when it watches the
        same tensors (every training forward: a few microseconds instead of tens), else new."""
        if type(old) is cls and all(w.refresh(t) for w, t in zip(old.watched, (weight, u, v))):
            old.sigma = sigma
            return old
        return cls(weight, u, v, sigma)


class _EvalCache(_SigmaRecord):
    """The normalized weight of one eval forward, reused while W, u and v are unchanged.

    Paddle bumps a tensor's inplace version for in-place tensor ops (``add_``, ``W[i] = x``,
    ``paddle.assign(x, output=W)``) but NOT for ``set_value`` (which ``set_state_dict`` and
    model porting use) nor for the optimizers' updates, and nothing hooks those. So on each
    use the cache also compares the contents: u and v in full, W in full when small and
    otherwise 4096 entries in blocks spread over its storage (:func:`_sample_step`), which
    an optimizer step (it moves every entry with a gradient, or with momentum or weight
    decay), a loaded checkpoint or a ``set_value`` of other weights changes. What a sample
    cannot see is an out-of-band write that leaves all of it unchanged, e.g. ``set_value``
    of a tensor differing from W in a few unsampled entries only: call
    :func:`invalidate_cache` after such a write.
    """

    __slots__ = ("value", "value_version")

    def __init__(self, weight, u, v, value, sigma=None) -> None:
        super().__init__(weight, u, v, sigma)
        self.value = value
        self.value_version = value.inplace_version

    @property
    def index(self):
        """The sampled flat indices of W (None: all of them)."""
        return self.watched[0].index

    def get(self, weight, u, v):
        """The cached normalized weight if W, u, v (and it) are unchanged, else None."""
        value = self.value
        if value.inplace_version != self.value_version or not self.valid(weight, u, v):
            return None
        return value


# ---------------------------------------------------------------------------------------------
# The kept sigma's buffer.


def _write_sigma_buffer(buffer, sigma) -> None:
    """``sigma`` (a host number) into the ``<name>_sigma`` buffer of ``track_sigma``."""
    # Paddle: fill_ takes no complex value (torch copy_s its 0-D sigma tensor in).
    if _is_complex(buffer):
        buffer.set_value(np.asarray(sigma, dtype=np.complex128).astype(_NUMPY_COMPLEX[buffer.dtype]))
    else:
        buffer.fill_(float(np.real(sigma)))

"""Let ``torch.load(weights_only=True)`` read MMEngine training checkpoints.

torch >= 2.6 loads checkpoints with ``weights_only=True`` by default, which
refuses every global it does not know. MMEngine 0.10's checkpoints carry its
``HistoryBuffer`` log history (numpy arrays, and its statistics methods
pickled as ``getattr(HistoryBuffer, 'mean')`` etc.), so ``resume`` and
``load_from`` fail. Rather than turning the safety off, we allow-list exactly
those types; ``getattr`` is served by a restricted stand-in that only hands
out HistoryBuffer's registered statistics methods.
"""
import pickle

import numpy as np
import torch

_INSTALLED = False


def _history_buffer_getattr(obj, name):
    """``getattr`` as MMEngine checkpoints use it, and nothing more."""
    from mmengine.logging import HistoryBuffer
    allowed = set(HistoryBuffer._statistics_methods) | {
        'min', 'max', 'current', 'mean'
    }
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) while loading a checkpoint '
        f'with weights_only=True: only HistoryBuffer statistics methods '
        f'{sorted(allowed)} are allowed')


def allow_mmengine_checkpoints():
    """Allow-list the types in MMEngine checkpoints (idempotent)."""
    global _INSTALLED
    if _INSTALLED or not hasattr(torch.serialization, 'add_safe_globals'):
        return
    from mmengine.logging import HistoryBuffer
    multiarray = np.core.multiarray
    torch.serialization.add_safe_globals([
        HistoryBuffer,
        (_history_buffer_getattr, 'builtins.getattr'),
        (_history_buffer_getattr, '__builtin__.getattr'),
        np.ndarray,
        np.dtype,
        (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy.core.multiarray.scalar'),
        (multiarray._reconstruct, 'numpy._core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy._core.multiarray.scalar'),
    ] + [type(np.dtype(t)) for t in ('f4', 'f8', 'i4', 'i8', 'u1', 'b1')])
    _INSTALLED = True

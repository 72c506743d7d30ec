"""MMEngine training checkpoints load with torch's weights_only=True, and
the allow-list admits nothing beyond them."""
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

import lesa_mm  # noqa: F401  (installs the allow-list)


def test_history_buffers_load_with_weights_only(tmp_path):
    buffer = HistoryBuffer()
    for value in (1.0, 2.0, 4.0):
        buffer.update(value)
    path = tmp_path / 'ckpt.pth'
    torch.save({'message_hub': {'loss': buffer},
                'meta': {'seed': np.int64(3)},
                'state_dict': {'w': torch.ones(2)}}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded['message_hub']['loss'].mean() == pytest.approx(7 / 3)
    assert int(loaded['meta']['seed']) == 3


class _Forged:
    """Pickles as getattr(dict, 'get'): a step towards arbitrary calls."""

    def __reduce__(self):
        return (getattr, (dict, 'get'))


def test_other_getattr_calls_are_refused(tmp_path):
    path = tmp_path / 'forged.pth'
    torch.save({'x': _Forged()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

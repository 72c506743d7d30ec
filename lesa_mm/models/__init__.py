from . import backbones
from .layers import (DynamicGateFusion, LESA, LESABinary, LESAUnary,
                     SumFusion)

__all__ = [
    'LESA', 'LESAUnary', 'LESABinary', 'DynamicGateFusion', 'SumFusion',
    *backbones.REGISTERED
]


def __getattr__(name):
    if name in backbones.REGISTERED:  # defined on first use
        return getattr(backbones, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

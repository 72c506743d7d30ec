from .backbones import LESAResNet, LESAResNeXt
from .layers import (DynamicGateFusion, LESA, LESABinary, LESAUnary,
                     SumFusion)

__all__ = [
    'LESA', 'LESAUnary', 'LESABinary', 'DynamicGateFusion', 'SumFusion',
    'LESAResNet', 'LESAResNeXt'
]

from .backbones import LESAResNet, LESAResNeXt
from .layers import LESA, LESABinary, LESAFusion, LESAUnary

__all__ = [
    'LESA', 'LESAUnary', 'LESABinary', 'LESAFusion', 'LESAResNet',
    'LESAResNeXt'
]

from .backbones import LESAResNet
from .layers import LESA, LESABinary, LESAFusion, LESAUnary

__all__ = ['LESA', 'LESAUnary', 'LESABinary', 'LESAFusion', 'LESAResNet']

from .lesa_resnet import LESABottleneck, LESAResNet, LESAResNeXt

__all__ = ['LESAResNet', 'LESAResNeXt', 'LESABottleneck']

from .lesa_resnet import LESABottleneck, LESAResNet

__all__ = ['LESAResNet', 'LESABottleneck']

# LESA-WRN-50 (Wide-ResNet-50-2 bottlenecks) on ImageNet-1k: the
# LESA-ResNet-50 recipe with doubled bottleneck width.
_base_ = ['./lesa-resnet50_4xb32_in1k.py']

model = dict(backbone=dict(width_per_group=128))

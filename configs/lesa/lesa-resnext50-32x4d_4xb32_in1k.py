# LESA-ResNeXt-50 (32x4d) on ImageNet-1k: the LESA-ResNet-50 recipe with
# ResNeXt bottlenecks (cardinality 32, 4 channels per group at 64 planes:
# widths 128-1024, the WRN-50-2 widths). LESA replaces the grouped 3x3 of
# the same blocks with the block's width in and out; its 8 heads do not
# follow the cardinality (see LESAResNeXt). No published results: the
# authors train LESA-ResNet-50 and LESA-WRN-50 only.
#
#   tools/dist_train.sh configs/lesa/lesa-resnext50-32x4d_4xb32_in1k.py 4
_base_ = ['./lesa-resnet50_4xb32_in1k.py']

model = dict(backbone=dict(type='LESAResNeXt', groups=32, base_width=4))

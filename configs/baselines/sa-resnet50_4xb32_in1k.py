# The self-attention baseline of LESA's ImageNet comparison: the
# LESA-ResNet-50 of configs/lesa/lesa-resnet50_4xb32_in1k.py with each LESA
# layer reduced to its binary term, global multi-head self-attention with
# the same relative positions, whose attention includes each position
# itself (no unary convolution, no fusion). Same stages, heads, widths,
# output stride 16 and recipe.
#
#   tools/dist_train.sh configs/baselines/sa-resnet50_4xb32_in1k.py 4
_base_ = '../lesa/lesa-resnet50_4xb32_in1k.py'

model = dict(
    backbone=dict(lesa=dict(type='LESA', with_unary=False, fusion=None)))

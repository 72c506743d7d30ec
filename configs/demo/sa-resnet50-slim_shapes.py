# The self-attention variant of the embedded classification demo: the slim
# LESA-ResNet-50 of lesa-resnet50-slim_shapes.py with each LESA layer reduced
# to its binary term (global self-attention with the same 'classification'
# positions, no unary convolution, no fusion). Same data, schedule, width
# and seed.
#
#   .venv/bin/python tools/train.py configs/demo/sa-resnet50-slim_shapes.py
_base_ = './lesa-resnet50-slim_shapes.py'

model = dict(
    backbone=dict(lesa=dict(type='LESA', with_unary=False, fusion=None)))

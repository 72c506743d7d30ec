# The self-attention variant of the embedded detection demo: the slim
# LESA-ResNet-50 Mask R-CNN of mask-rcnn_lesa-r50-slim_shapes.py with each
# LESA layer reduced to its binary term (global self-attention with the same
# 'detection_qr' positions, no unary convolution, no fusion). Same data,
# schedule, width and seed.
#
#   .venv/bin/python tools/train.py configs/demo/mask-rcnn_sa-r50-slim_shapes.py
_base_ = './mask-rcnn_lesa-r50-slim_shapes.py'

model = dict(
    backbone=dict(lesa=dict(type='LESA', with_unary=False, fusion=None)))

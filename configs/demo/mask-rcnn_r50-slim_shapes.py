# The convolution variant of the embedded detection demo: MMDetection's
# ResNet-50 at the width of mask-rcnn_lesa-r50-slim_shapes.py (3x3
# convolutions where the LESA demo has LESA layers). Same data, schedule,
# neck, heads and seed.
#
#   .venv/bin/python tools/train.py configs/demo/mask-rcnn_r50-slim_shapes.py
_base_ = './mask-rcnn_lesa-r50-slim_shapes.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResNet',
        depth=50,
        stem_channels=_base_.width,
        base_channels=_base_.width,
        strides=(1, 2, 2, 2),
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False,
        style='pytorch',
        # as the LESA demo's backbone (LESAResNet's default)
        zero_init_residual=False,
        init_cfg=None))

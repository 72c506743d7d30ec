# The convolution variant of the embedded classification demo: MMPretrain's
# ResNet-50 at the width and output stride of lesa-resnet50-slim_shapes.py
# (3x3 convolutions where the LESA demo has LESA layers). Same data,
# schedule, head and seed.
#
#   .venv/bin/python tools/train.py configs/demo/resnet50-slim_shapes.py
_base_ = './lesa-resnet50-slim_shapes.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResNet',
        depth=50,
        stem_channels=_base_.width,
        base_channels=_base_.width,
        strides=(1, 2, 2, 1),  # output stride 16, as the LESA demo
        out_indices=(3, ),
        style='pytorch',
        zero_init_residual=True))

# The convolution baseline of LESA's ImageNet comparison: MMPretrain's
# ResNet-50 trained with LESA's ImageNet recipe. Everything but the backbone
# comes from configs/lesa/lesa-resnet50_4xb32_in1k.py: data pipeline
# (Pillow resizing), batch 4 x 32, SGD + Nesterov (lr 0.05, weight decay
# 8e-5), 5 warm-up and 90 cosine epochs, checkpointing, the invalid-loss
# hook.
#
#   tools/dist_train.sh configs/baselines/resnet50_lesa-recipe_in1k.py 4
_base_ = '../lesa/lesa-resnet50_4xb32_in1k.py'

# MMPretrain's ResNet-50 (mmpretrain::_base_/models/resnet50.py): the 3x3
# convolutions that LESA replaces stay convolutions, output stride 32
model = dict(
    backbone=dict(
        _delete_=True,
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(3, ),
        style='pytorch'))

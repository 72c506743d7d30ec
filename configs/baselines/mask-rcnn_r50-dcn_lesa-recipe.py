# The convolution baseline of LESA's COCO comparison: Mask R-CNN with
# MMDetection's ResNet-50 and DCN in stages 2-4, on LESA's detection recipe.
# Everything but the backbone comes from configs/lesa/mask-rcnn_lesa-r50.py:
# 1024x1024 fixed-size inputs, 8 x 1 images, SGD lr 0.01, 20 epochs, the
# invalid-loss hook. The backbone keeps the LESA backbone's settings where a
# ResNet has them: DCN in stages 2-4, frozen stem and stage 1, frozen norm
# statistics, zero-initialised residual branches.
#
#   tools/dist_train.sh configs/baselines/mask-rcnn_r50-dcn_lesa-recipe.py 8
#
# It starts from the ResNet-50 trained on LESA's ImageNet recipe
# (configs/baselines/resnet50_lesa-recipe_in1k.py); point elsewhere with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = '../lesa/mask-rcnn_lesa-r50.py'

imagenet_checkpoint = 'checkpoints/resnet50_lesa-recipe_in1k.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True),
        zero_init_residual=True,
        # an MMPretrain classifier's checkpoint: its backbone. part
        init_cfg=dict(type='Pretrained', prefix='backbone.',
                      checkpoint=imagenet_checkpoint)))

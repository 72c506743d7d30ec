# The self-attention baseline of LESA's COCO comparison: the Mask R-CNN of
# configs/lesa/mask-rcnn_lesa-r50.py with each LESA layer reduced to its
# binary term, global multi-head self-attention with the same 'detection_qr'
# relative positions (no unary convolution, no fusion). Everything else is
# that config's: backbone stages, DCN in the remaining 3x3 convolutions,
# gradient checkpointing, data, schedule.
#
#   tools/dist_train.sh configs/baselines/mask-rcnn_sa-r50.py 8
#
# It starts from the self-attention ResNet-50 trained on LESA's ImageNet
# recipe (configs/baselines/sa-resnet50_4xb32_in1k.py) through LESATransfer
# (its 'classification' tables adapted, then started afresh at the
# detector's sizes, as for LESA); point elsewhere with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = '../lesa/mask-rcnn_lesa-r50.py'

imagenet_checkpoint = 'checkpoints/sa-resnet50_in1k.pth'

model = dict(
    backbone=dict(
        lesa=dict(type='LESA', with_unary=False, fusion=None),
        init_cfg=dict(type='LESATransfer', checkpoint=imagenet_checkpoint)))

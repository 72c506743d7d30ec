# HTC (with the semantic branch) on a LESA-WRN-50 backbone: the reference
# COCO recipe of LESA (arXiv:2107.05637). 1280x1280 fixed-size inputs, DCN in
# stages 2-4 (LESA's unary conv included), 4 GPUs x 1 image, 20 epochs.
#
#   tools/dist_train.sh configs/lesa/htc_lesa-wrn50.py 4
#
# Needs COCO-stuff maps in data/coco/stuffthingmaps/ for the semantic branch.
# The backbone starts from a LESA-WRN-50 ImageNet checkpoint with
# 'detection_qr' positions (configs/lesa/lesa-wrn50-qr_4xb32_in1k.py; see
# mask-rcnn_lesa-r50.py for the alternatives).
_base_ = [
    'mmdet::htc/htc_r50_fpn_20e_coco.py',
    './_base_/lesa-detection-backbone.py',
]

custom_imports = dict(imports=['lesa_mm'], allow_failed_imports=False)

image_size = (1280, 1280)
imagenet_checkpoint = 'checkpoints/lesa-wrn50-qr_in1k.pth'

model = dict(
    backbone=dict(
        _base_.lesa_backbone,  # the LESA detection backbone, widened
        _delete_=True,
        width_per_group=128,
        # stage output sizes at 1280x1280 (strides 4, 8, 16, 32)
        feat_sizes=(320, 160, 80, 40),
        init_cfg=dict(type='LESATransfer', checkpoint=imagenet_checkpoint)))

backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(
        type='LoadAnnotations', with_bbox=True, with_mask=True, with_seg=True),
    dict(type='Resize', scale=image_size, keep_ratio=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=image_size, keep_ratio=False),
    dict(
        type='LoadAnnotations', with_bbox=True, with_mask=True, with_seg=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor')),
]
train_dataloader = dict(
    batch_size=1, num_workers=2, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# stop at the first non-finite loss ("loss become infinite or NaN!")
custom_hooks = [dict(type='CheckInvalidLossHook', interval=1)]

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.005, momentum=0.9, weight_decay=1e-4))

# 20 epochs, lr x0.1 after epochs 16 and 19, 500 iterations of linear
# warm-up: the schedule of mmdet::htc/htc_r50_fpn_20e_coco.py

# 4 GPUs x 1 image
auto_scale_lr = dict(enable=False, base_batch_size=4)

# The embedded demo: a slim LESA-ResNet-50 Mask R-CNN trained from scratch
# on the CPU on synthetic coloured shapes (generated on first use; see
# lesa_mm/datasets/synthetic.py). Same architecture family as
# configs/lesa/mask-rcnn_lesa-r50.py (LESA in stages 3-4, detection_qr
# positions, fixed-size square inputs) at 1/4 of the width and 128x128
# images, so it learns within minutes on 2 cores.
#
#   .venv/bin/python tools/train.py configs/demo/mask-rcnn_lesa-r50-slim_shapes.py
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/default_runtime.py',
]

custom_imports = dict(imports=['lesa_mm'], allow_failed_imports=False)

data_root = 'data/lesa_demo/shapes_coco/'
# the datasets generate the data under data_root on first use
synthetic_data = dict(num_train=600, num_val=100, image_size=128, seed=0)
classes = ('circle', 'square', 'triangle')
image_size = (128, 128)
width = 16  # base channels: stage widths 16-128, outputs 64-512

model = dict(
    backbone=dict(
        _delete_=True,
        type='LESAResNet',
        depth=50,
        stem_channels=width,
        base_channels=width,
        strides=(1, 2, 2, 2),
        feat_sizes=tuple(image_size[0] // s for s in (4, 8, 16, 32)),
        stage_with_lesa=(False, False, True, True),
        stage_with_first_conv=(True, True, True, False),
        pe_type='detection_qr',
        lesa_groups=8,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False),
    neck=dict(in_channels=[width * 4, width * 8, width * 16, width * 32],
              out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256,
                       num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=64),
        mask_head=dict(in_channels=64, conv_out_channels=64,
                       num_classes=len(classes))),
    # at most a few objects per image: far fewer proposals and RoIs
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_size, keep_ratio=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=False),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    batch_sampler=None,
    dataset=dict(
        type='SyntheticShapesCoco',
        synthetic=synthetic_data,
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(
        type='SyntheticShapesCoco',
        synthetic=synthetic_data,
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_iters = 800
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters,
    val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=100),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=100,
         end=max_iters, T_max=max_iters - 100, eta_min=1e-5),
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=200,
                    max_keep_ckpts=2),
    visualization=dict(type='DetVisualizationHook', draw=False))
log_processor = dict(by_epoch=False, window_size=20)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=4)

# After training, PlotCurvesHook (lesa_mm) draws WORK_DIR/curves.png from
# the scalars.json of LocalVisBackend (as tools/analysis_tools/plot_curves.py
# does). Add dict(type='TensorboardVisBackend') for TensorBoard events
# (`pip install -e .[tensorboard]`).
visualizer = dict(vis_backends=[dict(type='LocalVisBackend')])
# and stop at the first non-finite loss (MMDetection's hook)
custom_hooks = [
    dict(type='PlotCurvesHook'),
    dict(type='CheckInvalidLossHook', interval=1),
]

# The embedded classification demo: a slim LESA-ResNet-50 (classification
# position encodings, output stride 16) trained from scratch on the CPU on
# synthetic shape folders (generated on first use; see
# lesa_mm/datasets/synthetic.py).
#
#   .venv/bin/python tools/train.py configs/demo/lesa-resnet50-slim_shapes.py
_base_ = [
    'mmpretrain::_base_/models/resnet50.py',
    'mmpretrain::_base_/default_runtime.py',
]

custom_imports = dict(imports=['lesa_mm'], allow_failed_imports=False)

data_root = 'data/lesa_demo/shapes_folders/'
# the datasets generate the data under data_root on first use
synthetic_data = dict(num_train_per_class=300, num_val_per_class=100,
                      image_size=64, seed=0)
classes = ('circle', 'square', 'triangle')
width = 16

model = dict(
    backbone=dict(
        _delete_=True,
        type='LESAResNet',
        depth=50,
        stem_channels=width,
        base_channels=width,
        strides=(1, 2, 2, 1),  # output stride 16: 4x4 maps at 64x64
        feat_sizes=(16, 8, 4, 4),
        stage_with_lesa=(False, False, True, True),
        stage_with_first_conv=(True, True, True, False),
        pe_type='classification',
        lesa_groups=8,
        out_indices=(3, ),
        # residual blocks start as identities: trains faster from scratch
        zero_init_residual=True),
    head=dict(num_classes=len(classes), in_channels=width * 32, topk=(1, )))

data_preprocessor = dict(
    num_classes=len(classes),
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type='SyntheticShapeFolders',
        synthetic=synthetic_data,
        data_root=data_root,
        data_prefix='train',
        classes=classes,
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=50,
    num_workers=1,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='SyntheticShapeFolders',
        synthetic=synthetic_data,
        data_root=data_root,
        data_prefix='val',
        classes=classes,
        pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

max_iters = 300
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=max_iters,
         T_max=max_iters - 30, eta_min=1e-5),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100,
                    max_keep_ckpts=2))
log_processor = dict(by_epoch=False, window_size=20)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
auto_scale_lr = dict(base_batch_size=32)

# After training, PlotCurvesHook (lesa_mm) draws WORK_DIR/curves.png from
# the scalars.json of LocalVisBackend (as tools/analysis_tools/plot_curves.py
# does). Add dict(type='TensorboardVisBackend') for TensorBoard events
# (`pip install -e .[tensorboard]`).
visualizer = dict(vis_backends=[dict(type='LocalVisBackend')])
# and stop at the first non-finite loss (MMDetection's hook)
custom_hooks = [
    dict(type='PlotCurvesHook'),
    dict(type='mmdet.CheckInvalidLossHook', interval=1),
]

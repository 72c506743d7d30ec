# LESA-WRN-50 on ImageNet-1k with 'detection_qr' position encodings: the
# ImageNet model that pre-trains the HTC backbone of
# configs/lesa/htc_lesa-wrn50.py, as the authors do (arXiv:2107.05637). The
# recipe of lesa-wrn50_4xb32_in1k.py; only the position encodings differ.
#
#   tools/dist_train.sh configs/lesa/lesa-wrn50-qr_4xb32_in1k.py 4
#   cp work_dirs/lesa-wrn50-qr_4xb32_in1k/best_accuracy_top1_epoch_*.pth \
#       checkpoints/lesa-wrn50-qr_in1k.pth
_base_ = ['./lesa-wrn50_4xb32_in1k.py']

model = dict(backbone=dict(pe_type='detection_qr'))

# MMDeploy: LESA instance segmentation (Mask R-CNN) to ONNX Runtime, one
# export for every batch and input size (LESA's 'detection_qr' positions
# serve any size). MMDeploy's own
# configs/mmdet/instance-seg/instance-seg_onnxruntime_dynamic.py with ONNX
# opset 17 (see instance-seg_lesa_onnxruntime_static.py, whose settings this
# inherits).
_base_ = ['./instance-seg_lesa_onnxruntime_static.py']

onnx_config = dict(
    dynamic_axes={
        'input': {
            0: 'batch',
            2: 'height',
            3: 'width'
        },
        'dets': {
            0: 'batch',
            1: 'num_dets',
        },
        'labels': {
            0: 'batch',
            1: 'num_dets',
        },
        'masks': {
            0: 'batch',
            1: 'num_dets',
            2: 'height',
            3: 'width'
        },
    })

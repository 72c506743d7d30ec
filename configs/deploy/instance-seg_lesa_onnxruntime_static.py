# MMDeploy: LESA instance segmentation (Mask R-CNN) to ONNX Runtime, input
# size fixed at export. MMDeploy's own
# configs/mmdet/instance-seg/instance-seg_onnxruntime_static.py with ONNX
# opset 17: LESA models export exactly from opset 16 (see
# lesa_mm/mmdeploy_compat.py); MMDeploy's default, 11, is refused.
#
# MMDeploy's pip package ships no configs, so its bases are stated here
# (configs/_base_/onnx_config.py, configs/_base_/backends/onnxruntime.py,
# configs/mmdet/_base_/base_static.py and base_instance-seg_static.py of
# MMDeploy 1.3.1); with an MMDeploy checkout, the same config is
#   _base_ = ['MMDEPLOY/configs/mmdet/instance-seg/'
#             'instance-seg_onnxruntime_static.py']
#   onnx_config = dict(opset_version=17)
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=17,
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['dets', 'labels', 'masks'],
    input_shape=None,
    optimize=True)
codebase_config = dict(
    type='mmdet',
    task='ObjectDetection',
    model_type='end2end',
    post_processing=dict(
        score_threshold=0.05,
        confidence_threshold=0.005,
        iou_threshold=0.5,
        max_output_boxes_per_class=200,
        pre_top_k=5000,
        keep_top_k=100,
        background_label_id=-1,
        export_postprocess_mask=False))
backend_config = dict(type='onnxruntime')

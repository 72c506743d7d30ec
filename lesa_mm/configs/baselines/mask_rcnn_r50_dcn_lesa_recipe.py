# Pure-Python config entry to configs/baselines/mask-rcnn_r50-dcn_lesa-recipe.py (same settings).
globals().update(
    __import__('lesa_mm.configs.loader',
               fromlist=['load']).load('baselines/mask-rcnn_r50-dcn_lesa-recipe.py'))

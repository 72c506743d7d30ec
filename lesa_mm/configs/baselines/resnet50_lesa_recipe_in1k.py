# Pure-Python config entry to configs/baselines/resnet50_lesa-recipe_in1k.py (same settings).
globals().update(
    __import__('lesa_mm.configs.loader',
               fromlist=['load']).load('baselines/resnet50_lesa-recipe_in1k.py'))

from . import demo  # noqa: F401  (registers the demo datasets)
from .synthetic import (SHAPES, ensure_synthetic_data, make_coco_shapes,
                        make_shape_folders)

__all__ = [
    'SHAPES', 'make_coco_shapes', 'make_shape_folders', 'ensure_synthetic_data'
]

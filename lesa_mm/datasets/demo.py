"""Datasets of the demo configs that generate their synthetic data on first
use (:func:`~lesa_mm.datasets.synthetic.ensure_synthetic_data`), so that
every tool runs the demos, MMDetection's and MMPretrain's own included.

* ``SyntheticShapesCoco``: MMDetection's ``CocoDataset`` over the coloured
  shapes of :func:`~lesa_mm.datasets.make_coco_shapes`;
* ``SyntheticShapeFolders``: MMPretrain's ``CustomDataset`` over the class
  folders of :func:`~lesa_mm.datasets.make_shape_folders`.

Each generates its data under ``data_root`` unless a complete set made with
the same ``synthetic`` arguments (the generator's keyword arguments) is
there. The data is generated when the dataset first loads its data list
(``full_init``: at construction, or on first access with
``lazy_init=True``), never when a config is only read or a model is built
for inference. In distributed runs rank 0 generates and the other ranks
wait for it.

The classes subclass MMDetection's and MMPretrain's datasets, so they are
defined when first used: the names are registered in MMEngine's root
``DATASETS`` (found from either library's scope) as builders that define
the class then, and ``lesa_mm.datasets.demo.SyntheticShapesCoco`` (or
``SyntheticShapeFolders``) gives the class itself. Importing lesa_mm does
not import either library's dataset package.
"""
import functools

from mmengine.dist import barrier, get_rank

from lesa_mm.registry import DATASETS, register_on_first_use
from .synthetic import ensure_synthetic_data

__all__ = ['SyntheticShapesCoco', 'SyntheticShapeFolders']


def _generate(kind, data_root, synthetic):
    if get_rank() == 0:
        ensure_synthetic_data(kind, data_root, **synthetic)
    barrier()


def _generating(base, kind):
    """A subclass of the dataset class ``base`` that generates its data."""

    class Generating(base):

        def __init__(self, *args, synthetic, data_root, **kwargs):
            self.synthetic = synthetic
            super().__init__(*args, data_root=data_root, **kwargs)

        def load_data_list(self):
            _generate(kind, self.data_root, self.synthetic)
            return super().load_data_list()

    return Generating


@functools.lru_cache(maxsize=None)
def dataset_class(name):
    """The class of the demo dataset ``name``, defined on first use."""
    if name == 'SyntheticShapesCoco':
        from mmdet.datasets import CocoDataset
        cls = _generating(CocoDataset, 'coco')
    elif name == 'SyntheticShapeFolders':
        from mmpretrain.datasets import CustomDataset
        cls = _generating(CustomDataset, 'folders')
    else:
        raise ValueError(f'no demo dataset {name!r}; the demo datasets are '
                         f'{__all__}')
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = __name__
    cls.__doc__ = (f'{cls.__bases__[0].__name__} over synthetic shapes, '
                   f'generated under data_root on first use (see '
                   f'{__name__}).')
    return cls


def __getattr__(name):
    if name in __all__:
        return dataset_class(name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


for _name in __all__:
    register_on_first_use(DATASETS, _name,
                          functools.partial(dataset_class, _name), __name__)

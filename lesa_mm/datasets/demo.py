"""Datasets of the demo configs that generate their synthetic data on first
use (:func:`~lesa_mm.datasets.synthetic.ensure_synthetic_data`), so that
every tool runs the demos, MMDetection's and MMPretrain's own included.

The data is generated when the dataset first loads its data list
(``full_init``: at construction, or on first access with
``lazy_init=True``), never when a config is only read or a model is built
for inference. In distributed runs rank 0 generates and the other ranks
wait for it.
"""
from mmengine.dist import barrier, get_rank

from .synthetic import ensure_synthetic_data


def _generate(kind, data_root, synthetic):
    if get_rank() == 0:
        ensure_synthetic_data(kind, data_root, **synthetic)
    barrier()


try:
    from mmdet.datasets import CocoDataset
    from mmdet.registry import DATASETS as DET_DATASETS
except ImportError:  # lesa_mm.registry warns about a missing mmdet
    pass
else:

    @DET_DATASETS.register_module()
    class SyntheticShapesCoco(CocoDataset):
        """:class:`~mmdet.datasets.CocoDataset` over the coloured shapes of
        :func:`~lesa_mm.datasets.make_coco_shapes`, generated under
        ``data_root`` unless a complete set made with the same ``synthetic``
        arguments is there.

        Args:
            synthetic (dict): Arguments of the generator (``num_train``,
                ``num_val``, ``image_size``, ``seed``).
            data_root (str): Where the data is (or is generated).
        """

        def __init__(self, *args, synthetic, data_root, **kwargs):
            self.synthetic = synthetic
            super().__init__(*args, data_root=data_root, **kwargs)

        def load_data_list(self):
            _generate('coco', self.data_root, self.synthetic)
            return super().load_data_list()


try:
    from mmpretrain.datasets import CustomDataset
    from mmpretrain.registry import DATASETS as CLS_DATASETS
except ImportError:
    pass
else:

    @CLS_DATASETS.register_module()
    class SyntheticShapeFolders(CustomDataset):
        """:class:`~mmpretrain.datasets.CustomDataset` over the class folders
        of :func:`~lesa_mm.datasets.make_shape_folders`, generated under
        ``data_root`` unless a complete set made with the same ``synthetic``
        arguments is there.

        Args:
            synthetic (dict): Arguments of the generator
                (``num_train_per_class``, ``num_val_per_class``,
                ``image_size``, ``seed``).
            data_root (str): Where the data is (or is generated).
        """

        def __init__(self, *args, synthetic, data_root, **kwargs):
            self.synthetic = synthetic
            super().__init__(*args, data_root=data_root, **kwargs)

        def load_data_list(self):
            _generate('folders', self.data_root, self.synthetic)
            return super().load_data_list()

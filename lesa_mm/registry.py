"""Registration of lesa_mm modules into the OpenMMLab registries.

The LESA layer lives in MMEngine's root ``MODELS`` registry, so every
downstream registry (mmdet, mmpretrain, ...) can build it by name. Backbones
are registered once, by :func:`register_backbone`, into the ``MODELS``
registries of MMDetection and MMPretrain, whichever of the two is installed.
"""
import importlib
import warnings

from mmengine.registry import MODELS as ROOT_MODELS

#: Downstream codebases whose ``MODELS`` registry receives our backbones.
DOWNSTREAM_SCOPES = ('mmdet', 'mmpretrain')


def _downstream_registries():
    registries = []
    for scope in DOWNSTREAM_SCOPES:
        try:
            module = importlib.import_module(f'{scope}.registry')
        except ImportError as err:
            warnings.warn(f'lesa_mm: {scope} is not importable ({err}); its '
                          'MODELS registry will not know the LESA backbones.')
            continue
        registries.append(module.MODELS)
    return registries


def register_backbone(cls):
    """Class decorator: register ``cls`` in mmdet's and mmpretrain's MODELS."""
    for registry in _downstream_registries():
        registry.register_module(module=cls)
    return cls


__all__ = ['ROOT_MODELS', 'register_backbone', 'DOWNSTREAM_SCOPES']

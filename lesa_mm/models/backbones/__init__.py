"""The LESA-ResNet backbones, defined when first used.

:class:`LESAResNet` and :class:`LESAResNeXt` subclass MMDetection's
``ResNet``/``ResNeXt`` (``lesa_resnet.py``), so defining them imports
MMDetection's model package. Importing lesa_mm does not: it registers each
name in MMEngine's root ``MODELS`` as a builder that imports
``lesa_resnet`` on its first call, and that import registers the class in
the builder's place. ``lesa_mm.models.LESAResNet`` (or any import of the
classes) defines them too.
"""
import functools
import importlib

from lesa_mm.registry import MODELS, register_on_first_use

#: The backbones registered by name (``type='LESAResNet'``).
REGISTERED = ('LESAResNet', 'LESAResNeXt')
__all__ = [*REGISTERED, 'LESABottleneck']


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(f'{__name__}.lesa_resnet'),
                       name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


for _name in REGISTERED:
    register_on_first_use(MODELS, _name,
                          functools.partial(__getattr__, _name), __name__)

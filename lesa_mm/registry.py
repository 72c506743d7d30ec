"""Where lesa_mm's modules are registered.

Each module is registered once, in MMEngine's root registries: the LESA
layer and the backbones in ``MODELS``, the demo datasets in ``DATASETS``,
the curves hook in ``HOOKS``, the transfer in ``WEIGHT_INITIALIZERS``.
MMDetection's and MMPretrain's registries are children of these roots, and
a lookup of a plain name that misses in a child searches its parent, so
configs of either scope build every lesa_mm module by its plain name
(``type='LESAResNet'``); a scoped name (``'mmdet.LESAResNet'``) searches only
that library's own registry and does not find it. Importing lesa_mm
therefore imports neither library's model, dataset or visualisation
packages; the scope a config runs in brings its own.
"""
from mmengine.registry import DATASETS, HOOKS, MODELS, WEIGHT_INITIALIZERS

#: MMEngine's root ``MODELS`` (the name the layer modules use).
ROOT_MODELS = MODELS

__all__ = ['ROOT_MODELS', 'MODELS', 'DATASETS', 'HOOKS',
           'WEIGHT_INITIALIZERS', 'register_on_first_use']


def register_on_first_use(registry, name, define, where):
    """Register ``name`` in ``registry`` as a builder of the class that
    ``define()`` returns, so that the class (and what defining it imports)
    is defined on the first build, not at import. ``where`` names the module
    that documents the class."""

    def build(*args, **kwargs):
        return define()(*args, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f'Build a {name} (see {where}).'
    registry.register_module(name=name, module=build)

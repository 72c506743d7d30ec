"""The OpenMMLab versions lesa_mm supports, in one place.

``import lesa_mm`` calls :func:`check_versions`, as ``import mmdet`` checks
mmcv. setup.cfg cannot import this module: its ``install_requires`` states
the same ranges by hand, and tests/test_install.py checks that they agree.
"""
import importlib.metadata
import sys

# package -> (lowest supported version, first unsupported version)
# mmcv: what mmdet 3.x and mmpretrain 1.x both accept (mmdet 3.3 needs
# <2.2.0, mmpretrain 1.2 >=2.0.0); mmengine: what mmpretrain 1.2 and
# mmdet 3.3 accept. Tested with mmcv 2.1.0, mmengine 0.10.7, mmdet 3.3.0,
# mmpretrain 1.2.0.
SUPPORTED_VERSIONS = {
    'mmcv': ('2.0.0', '2.2.0'),
    'mmengine': ('0.8.3', '1.0.0'),
    'mmdet': ('3.0.0', '4.0.0'),
    'mmpretrain': ('1.0.0', '2.0.0'),
}


def requirement(name):
    """The pip requirement string of a supported package, e.g.
    ``'mmcv>=2.0.0,<2.2.0'``."""
    low, high = SUPPORTED_VERSIONS[name]
    return f'{name}>={low},<{high}'


def installed_version(name):
    """The installed version of ``name``: the ``__version__`` of the module
    if it is imported already, else its distribution's metadata (so that
    checking does not import mmdet's or mmpretrain's packages).

    Raises:
        ImportError: If the package is not installed.
    """
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, '__version__', None)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError as error:
        raise ImportError(f'{name} is not installed') from error


def check_versions(packages=None):
    """Raise ImportError naming the installed version and the supported
    range when an installed OpenMMLab package is outside it.

    Packages are checked in dependency order (mmengine, mmcv, then mmdet and
    mmpretrain, whose own imports check mmcv), so the first message names
    the package to change.
    """
    from lesa_mm import __version__
    names = packages or ('mmengine', 'mmcv', 'mmdet', 'mmpretrain')
    for name in names:
        low, high = SUPPORTED_VERSIONS[name]
        try:
            installed = installed_version(name)
        except ImportError as error:
            raise ImportError(
                f'lesa_mm {__version__} needs {requirement(name)}: '
                f'{error}') from error
        from mmengine.utils import digit_version
        if installed is None or not (
                digit_version(low) <= digit_version(installed) <
                digit_version(high)):
            hint = ' with its compiled ops (not mmcv-lite)' \
                if name == 'mmcv' else ''
            raise ImportError(
                f'{name}=={installed} is installed, but lesa_mm '
                f'{__version__} supports {requirement(name)}. Install a '
                f'supported version{hint}, e.g. pip install '
                f'"{requirement(name)}".')

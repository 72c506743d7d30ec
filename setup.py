"""Metadata and packages live in setup.cfg. This script adds what OpenMIM
needs (``mim list``, ``mim train lesa_mm CONFIG``, ``mim test ...``) and what
MMEngine reads for ``_base_ = 'lesa_mm::...'``: ``lesa_mm/.mim/`` with the
repository's ``configs``, ``tools`` and ``model-index.yml``, as
MMDetection's and MMPretrain's ``setup.py`` do. An editable install links
them (one copy: the repository's), a wheel or sdist copies them."""
import os
import os.path as osp
import shutil
import sys

from setuptools import setup

MIM_FILES = ('configs', 'tools', 'model-index.yml')


def add_mim_extension():
    """Create ``lesa_mm/.mim`` (symlinks for an editable install, copies
    for a wheel or sdist); other commands leave it as it is."""
    if {'develop', 'editable_wheel'} & set(sys.argv):
        mode = 'symlink'
    elif {'sdist', 'bdist_wheel'} & set(sys.argv):
        mode = 'copy'
    else:
        return
    repo = osp.dirname(osp.abspath(__file__))
    mim = osp.join(repo, 'lesa_mm', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name in MIM_FILES:
        src, dst = osp.join(repo, name), osp.join(mim, name)
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
                '__pycache__', '*.pyc'))
        else:
            shutil.copyfile(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup()

"""Installing lesa_mm into someone else's environment: the package metadata
states version ranges (never pins, never replacing torch), ``pip install``
into an environment that already has OpenMMLab fetches and replaces nothing,
and ``import lesa_mm`` refuses unsupported OpenMMLab versions with a clear
message."""
import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from conftest import REPO_ROOT
from lesa_mm.version import SUPPORTED_VERSIONS, check_versions


def setup_cfg_requirements(section='options', key='install_requires'):
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO_ROOT, 'setup.cfg'))
    lines = [ln.strip() for ln in parser[section][key].splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith('#')]
    return {r.name: r for r in reqs}


def test_setup_cfg_ranges_agree_with_the_import_check():
    reqs = setup_cfg_requirements()
    assert set(reqs) == {'torch', 'mmengine', 'mmcv', 'mmdet', 'mmpretrain',
                         'pycocotools'}
    for name, (low, high) in SUPPORTED_VERSIONS.items():
        assert reqs[name].specifier == SpecifierSet(f'>={low},<{high}'), name
    # ranges, not pins; and never an upper bound that would replace torch
    for req in reqs.values():
        assert not any(s.operator in ('==', '===', '~=')
                       for s in req.specifier), req
    assert reqs['torch'].specifier == SpecifierSet('>=2.4')
    extras = setup_cfg_requirements('options.extras_require', 'deploy')
    assert set(extras) == {'onnx', 'onnxruntime', 'onnxscript'}
    assert 'pytest' in setup_cfg_requirements('options.extras_require',
                                              'tests')
    assert 'tensorboard' in setup_cfg_requirements('options.extras_require',
                                                   'tensorboard')


def test_installed_versions_are_supported():
    import mmcv
    import mmdet
    import mmengine
    import mmpretrain
    reqs = setup_cfg_requirements()
    for module in (mmcv, mmengine, mmdet, mmpretrain):
        assert module.__version__ in reqs[module.__name__].specifier
    check_versions()  # does not raise


@pytest.mark.parametrize('name,version', [('mmcv', '2.2.0'),
                                          ('mmcv', '1.7.2'),
                                          ('mmdet', '2.28.2'),
                                          ('mmpretrain', '0.25.0'),
                                          ('mmengine', '1.0.0')])
def test_unsupported_version_is_refused_by_name(monkeypatch, name, version):
    module = __import__(name)
    monkeypatch.setattr(module, '__version__', version)
    low, high = SUPPORTED_VERSIONS[name]
    with pytest.raises(ImportError) as info:
        check_versions()
    message = str(info.value)
    assert f'{name}=={version} is installed' in message
    assert f'{name}>={low},<{high}' in message


def test_import_lesa_mm_fails_clearly_on_an_unsupported_mmcv():
    # the real import path, in a fresh interpreter: mmcv reports 2.2.0
    code = ("import mmcv; mmcv.__version__ = '2.2.0'\n"
            "import lesa_mm\n")
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('ImportError: mmcv==2.2.0 is installed, but '
                           'lesa_mm'), proc.stderr[-2000:]
    assert 'mmcv>=2.0.0,<2.2.0' in last


def copy_repository(dest):
    """The repository's files (tracked, and new ones git does not ignore),
    so that building from the copy leaves the working tree untouched."""
    files = subprocess.run(
        ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
        cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for rel in files.decode().split('\0'):
        src = os.path.join(REPO_ROOT, rel)
        if not rel or not os.path.lexists(src):
            continue  # deleted in the working tree
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), target)
        elif os.path.isfile(src):
            shutil.copy2(src, target)


def test_pip_install_into_an_environment_with_openmmlab(tmp_path):
    """A downstream user's environment that already has torch and OpenMMLab
    (here: a fresh virtual environment that sees the set-up's site-packages
    through a .pth file) gets lesa_mm and its extras from ``pip install
    --no-index``: every requirement is already satisfied, so nothing is
    fetched, and nothing (torch above all) is replaced."""
    import torch
    src, venv = tmp_path / 'lesa_mm_src', tmp_path / 'venv'
    copy_repository(src)
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)],
                   check=True, timeout=120)
    python = str(venv / 'bin' / 'python')
    site = subprocess.run(
        [python, '-c', 'import sysconfig; '
         'print(sysconfig.get_paths()["purelib"])'],
        capture_output=True, text=True, check=True).stdout.strip()
    shared = sysconfig.get_paths()['purelib']  # the set-up's site-packages
    with open(os.path.join(site, 'openmmlab_env.pth'), 'w') as f:
        f.write(shared + '\n')
    # pip itself comes from the shared site-packages too; its installation
    # report lists what it installed
    report = tmp_path / 'report.json'
    proc = subprocess.run(
        [python, '-m', 'pip', 'install', '--no-index', '--no-build-isolation',
         '--no-cache-dir', '--report', str(report), f'{src}[deploy,tests]'],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(report) as f:
        installed = [item['metadata'] for item in json.load(f)['install']]
    # lesa_mm only: every requirement, with the extras', was satisfied by the
    # environment, and nothing (torch above all) was replaced
    assert [(canonicalize_name(m['name']), m['version'])
            for m in installed] == [('lesa-mm', '0.1.0')]
    required = {Requirement(r).name for r in installed[0]['requires_dist']}
    assert required >= {'torch', 'mmengine', 'mmcv', 'mmdet', 'mmpretrain',
                        'pycocotools', 'onnx', 'onnxruntime', 'onnxscript',
                        'pytest'}
    found = tmp_path / 'found.json'
    check = textwrap.dedent(f"""
        import json, lesa_mm, torch
        from lesa_mm.configs.loader import config_path
        json.dump(dict(lesa_mm=lesa_mm.__file__, torch=torch.__file__,
                       torch_version=torch.__version__,
                       config=config_path('lesa/mask-rcnn_lesa-r50.py')),
                  open({str(found)!r}, 'w'))
    """)
    proc = subprocess.run([python, '-c', check], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(found) as f:
        found = json.load(f)
    # lesa_mm from the new environment (not the repository, not the set-up)
    assert found['lesa_mm'].startswith(site), found
    # torch is still the set-up's own
    assert found['torch'].startswith(shared), found
    assert found['torch_version'] == torch.__version__
    # the classic configs were packaged, once, in OpenMIM's place
    assert found['config'] == os.path.join(
        site, 'lesa_mm', '.mim', 'configs', 'lesa', 'mask-rcnn_lesa-r50.py')
    assert os.path.isfile(found['config'])
    mim = os.path.join(site, 'lesa_mm', '.mim')
    for rel in ('model-index.yml', 'configs/lesa/metafile.yml',
                'configs/baselines/metafile.yml', 'tools/train.py',
                'tools/test.py', 'tools/dist_train.sh'):
        path = os.path.join(mim, rel)
        assert os.path.isfile(path) and not os.path.islink(path), rel
    assert not os.path.exists(os.path.join(site, 'lesa_mm', 'configs',
                                           'classic'))

    # OpenMIM (the set-up's, from the shared site-packages) sees the wheel's
    # lesa_mm and trains and tests a demo config for two iterations with
    # the package's own tools
    if importlib.util.find_spec('mim') is None:
        pytest.skip('openmim is not installed (tools/setup_env.sh installs '
                    'it)')
    listed = subprocess.run([python, '-m', 'mim', 'list'], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert re.search(r'^lesa-mm +0\.1\.0', listed.stdout, re.M), \
        listed.stdout + listed.stderr[-2000:]
    data, work = tmp_path / 'data', tmp_path / 'work'
    roots = [f'{loader}.dataset.data_root={data}/' for loader in (
        'train_dataloader', 'val_dataloader', 'test_dataloader')]
    train = subprocess.run(
        [python, '-m', 'mim', 'train', 'lesa_mm',
         'lesa-resnet50-slim_shapes.py', '--work-dir', str(work),
         '--cfg-options', 'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
         *roots], cwd=str(tmp_path), capture_output=True, text=True,
        timeout=900)
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    assert (work / 'iter_2.pth').is_file()
    # the config came from the installed package
    assert os.path.join(mim, 'configs', 'demo') in train.stdout + train.stderr
    test = subprocess.run(
        [python, '-m', 'mim', 'test', 'lesa_mm',
         'lesa-resnet50-slim_shapes.py', '--checkpoint',
         str(work / 'iter_2.pth'), '--work-dir', str(tmp_path / 'test'),
         '--cfg-options', roots[-1]], cwd=str(tmp_path), capture_output=True,
        text=True, timeout=900)
    assert test.returncode == 0, (test.stdout + test.stderr)[-4000:]
    assert 'accuracy/top1' in test.stdout + test.stderr

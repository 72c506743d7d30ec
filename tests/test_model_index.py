"""model-index.yml and configs/lesa/metafile.yml (OpenMMLab model index)."""
import glob
import os

import pytest
import yaml

from conftest import REPO_ROOT

PAPER_URL = 'https://arxiv.org/abs/2107.05637'


def load(path):
    with open(os.path.join(REPO_ROOT, path), encoding='utf-8') as f:
        return yaml.safe_load(f)


@pytest.fixture(scope='module')
def metafiles():
    index = load('model-index.yml')
    assert index['Import'] == ['configs/lesa/metafile.yml']
    return [load(path) for path in index['Import']]


@pytest.fixture(scope='module')
def models(metafiles):
    return [m for meta in metafiles for m in meta['Models']]


def test_collection(metafiles):
    collections = [c for meta in metafiles for c in meta['Collections']]
    assert [c['Name'] for c in collections] == ['LESA']
    paper = collections[0]['Paper']
    assert paper['URL'] == PAPER_URL
    assert paper['Title'] == ('Locally Enhanced Self-Attention: Combining '
                              'Self-Attention and Convolution as Local and '
                              'Context Terms')


def test_every_config_listed_and_existing(models):
    listed = [m['Config'] for m in models]
    assert len(listed) == len(set(listed))
    for path in listed:
        assert os.path.isfile(os.path.join(REPO_ROOT, path)), path
    shipped = sorted(
        os.path.relpath(p, REPO_ROOT).replace(os.sep, '/')
        for folder in ('lesa', 'demo')
        for p in glob.glob(os.path.join(REPO_ROOT, 'configs', folder, '*.py')))
    assert sorted(listed) == shipped


def test_models_well_formed(models):
    names = [m['Name'] for m in models]
    assert len(names) == len(set(names))
    for m in models:
        assert m['In Collection'] == 'LESA'
        assert m['Name'] == os.path.splitext(os.path.basename(m['Config']))[0]
        meta = m['Metadata']
        for key in ('Parameters', 'FLOPs'):
            if key in meta:
                assert isinstance(meta[key], int) and meta[key] > 0, (m, key)
        for result in m.get('Results', []):
            assert {'Task', 'Dataset', 'Metrics'} <= set(result)
            # every result says whose it is: the paper's or ours
            if m['Config'].startswith('configs/demo/'):
                assert 'measured with this code (ours)' in result['Notes']
            else:
                assert 'reported in the paper' in result['Notes']


def test_demo_entries_list_our_measurements(models):
    demos = [m for m in models if m['Config'].startswith('configs/demo/')]
    assert len(demos) == 2
    for m in demos:
        assert len(m['Results']) == 1
        assert m['Metadata']['Parameters'] > 0


def test_modelindex_loads():
    """The index loads with the ``model-index`` package (installed with
    MMEngine's dependencies) without errors."""
    modelindex = pytest.importorskip('modelindex')
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        index = modelindex.load('model-index.yml')
        errors = index.check(silent=True)
    finally:
        os.chdir(cwd)
    assert not errors
    assert len(index.models) == 7

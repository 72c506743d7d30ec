"""model-index.yml and the configs' metafiles (OpenMMLab model index)."""
import glob
import os

import pytest
import yaml

from conftest import REPO_ROOT

PAPER_URL = 'https://arxiv.org/abs/2107.05637'
CLS_README = 'https://github.com/Chenglin-Yang/LESA_classification'
DET_README = 'https://github.com/Chenglin-Yang/LESA_detection'

# What the authors report, per config, task and dataset split, and the
# README that reports it.
AUTHORS_RESULTS = {
    ('lesa-resnet50_4xb32_in1k', 'Image Classification', 'ImageNet-1k'):
    ({'Top 1 Accuracy': 79.55, 'Top 5 Accuracy': 94.79}, CLS_README),
    ('lesa-wrn50_4xb32_in1k', 'Image Classification', 'ImageNet-1k'):
    ({'Top 1 Accuracy': 80.18, 'Top 5 Accuracy': 95.07}, CLS_README),
    ('mask-rcnn_lesa-r50', 'Object Detection', 'COCO val2017'):
    ({'box AP': 44.0}, DET_README),
    ('mask-rcnn_lesa-r50', 'Instance Segmentation', 'COCO val2017'):
    ({'mask AP': 39.2}, DET_README),
    ('mask-rcnn_lesa-r50', 'Object Detection', 'COCO test-dev'):
    ({'box AP': 44.2}, DET_README),
    ('mask-rcnn_lesa-r50', 'Instance Segmentation', 'COCO test-dev'):
    ({'mask AP': 39.6}, DET_README),
    ('htc_lesa-wrn50', 'Object Detection', 'COCO val2017'):
    ({'box AP': 50.1}, DET_README),
    ('htc_lesa-wrn50', 'Instance Segmentation', 'COCO val2017'):
    ({'mask AP': 43.9}, DET_README),
    ('htc_lesa-wrn50', 'Object Detection', 'COCO test-dev'):
    ({'box AP': 50.5}, DET_README),
    ('htc_lesa-wrn50', 'Instance Segmentation', 'COCO test-dev'):
    ({'mask AP': 44.4}, DET_README),
}


def load(path):
    with open(os.path.join(REPO_ROOT, path), encoding='utf-8') as f:
        return yaml.safe_load(f)


@pytest.fixture(scope='module')
def metafiles():
    index = load('model-index.yml')
    assert index['Import'] == ['configs/lesa/metafile.yml',
                               'configs/baselines/metafile.yml']
    return [load(path) for path in index['Import']]


@pytest.fixture(scope='module')
def models(metafiles):
    return [m for meta in metafiles for m in meta['Models']]


def readme_demo_metrics(name):
    """A demo config's held-out result in the README's tables (its demo
    table, or the comparison table), as the metafile states it: box and
    mask AP in percent, top-1 in percent."""
    import re
    with open(os.path.join(REPO_ROOT, 'README.md')) as f:
        lines = f.read().splitlines()
    # the demo table's row starts with the config, the comparison table's
    # names it in its second column
    rows = [line for line in lines if line.startswith(f'| `{name}`')
            or line.split('|')[2:3] == [f' `{name}` ']]
    assert rows, name
    figures = [float(v) for v in re.findall(r'\d+\.\d+', rows[0])]
    if name.startswith('mask-rcnn'):
        return {'box AP': round(100 * figures[0], 1),
                'mask AP': round(100 * figures[1], 1)}
    return {'Top 1 Accuracy': figures[0]}


def test_collection(metafiles):
    collections = [c for meta in metafiles
                   for c in meta.get('Collections', [])]
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
        for folder in ('lesa', 'demo', 'baselines')
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
            # every result says whose it is: the authors' or ours
            if m['Config'].startswith('configs/demo/'):
                assert 'measured with this code (ours)' in result['Notes']
                assert result['Metrics'] == readme_demo_metrics(m['Name'])
            else:
                assert 'reported by the authors' in result['Notes']
                assert 'not reproduced here' in result['Notes']


def test_authors_results_per_split(models):
    """The reference configs carry exactly the authors' figures, one entry
    per task and split, each naming the split and the README it is from."""
    listed = {}
    for m in models:
        if m['Config'].startswith('configs/demo/'):
            continue
        for result in m.get('Results', []):
            key = (m['Name'], result['Task'], result['Dataset'])
            assert key not in listed, key
            listed[key] = result
    assert sorted(listed) == sorted(AUTHORS_RESULTS)
    for key, (metrics, source) in AUTHORS_RESULTS.items():
        result = listed[key]
        assert result['Metrics'] == metrics, key
        assert source in result['Notes'], key
        split = {'ImageNet-1k': 'ImageNet-1k val'}.get(key[2], key[2])
        assert split in result['Notes'], key


def test_detection_qr_pretraining_entries(models):
    """The ImageNet configs that pre-train the detection backbones are
    listed, without results (the authors publish none for them)."""
    by_name = {m['Name']: m for m in models}
    for name, params in (('lesa-resnet50-qr_4xb32_in1k', 23_505_992),
                         ('lesa-wrn50-qr_4xb32_in1k', 60_602_984)):
        m = by_name[name]
        assert 'Results' not in m, name
        assert m['Metadata']['Training Data'] == 'ImageNet-1k'
        assert m['Metadata']['Parameters'] == params


def test_resnet_family_entries_have_no_results(models):
    """LESA in other ResNet-family backbones: listed with their size, and
    without results (nobody has published any)."""
    by_name = {m['Name']: m for m in models}
    for name, params in (('lesa-resnext50-32x4d_4xb32_in1k', 56_146_216),
                         ('mask-rcnn_lesa-x101-32x4d', 126_941_804)):
        m = by_name[name]
        assert 'Results' not in m, name
        assert m['Metadata']['Parameters'] == params
        assert m['Metadata']['FLOPs'] > 0
        assert 'ResNeXt' in m['Metadata']['Architecture']


def test_demo_entries_list_our_measurements(models):
    demos = [m for m in models if m['Config'].startswith('configs/demo/')]
    assert len(demos) == 6  # LESA, convolution, self-attention; two tasks
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
    assert len(index.models) == 19

"""Training through the shipped tools on tiny synthetic data: resume after
an interruption, two-process CPU training, the generator's determinism."""
import filecmp
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from lesa_mm.datasets import ensure_synthetic_data, make_coco_shapes
from lesa_mm.utils.curves import load_scalars

DEMO_DET = 'configs/demo/mask-rcnn_lesa-r50-slim_shapes.py'


def tiny_det_options(root, max_iters=4):
    ann_val = os.path.join(root, 'annotations', 'instances_val.json')
    loader = ['batch_size=2', 'num_workers=0', 'persistent_workers=False']
    opts = [
        f'val_evaluator.ann_file={ann_val}',
        f'test_evaluator.ann_file={ann_val}', f'train_cfg.max_iters={max_iters}',
        f'train_cfg.val_interval={max_iters}',
        'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
        'param_scheduler.0.end=4'
    ]
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        # the demo's datasets generate their data under data_root
        opts += [f'{name}.dataset.data_root={root}',
                 f'{name}.dataset.synthetic.num_train=8',
                 f'{name}.dataset.synthetic.num_val=4']
        opts += [f'{name}.{o}' for o in loader]
    return opts


def run(cmd, cwd=REPO_ROOT, timeout=600):
    """Run a command line; it must succeed (its output shown if not)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def train_lrs(work_dir, runs='all'):
    """Iteration -> lr of the runs' scalars.json (of the newest run only
    with ``runs='latest'``)."""
    train, _ = load_scalars(work_dir, runs=runs)
    return {r['step']: r['lr'] for r in train}


def test_resume_continues_from_the_checkpoint(tmp_path):
    data, work = str(tmp_path / 'data'), str(tmp_path / 'work')
    train = [sys.executable, 'tools/train.py', DEMO_DET, '--work-dir', work]
    # the command line, end to end: checkpoints and logged scalars (in
    # subprocesses: a Runner in this process would share MMEngine's named
    # instances, e.g. the config's visualizer, with the other tests)
    run(train + ['--cfg-options'] + tiny_det_options(data))
    assert os.path.isfile(os.path.join(work, 'iter_4.pth'))
    reference = train_lrs(work)
    assert sorted(reference) == [1, 2, 3, 4]
    # interrupted after the checkpoint of iteration 2
    os.remove(os.path.join(work, 'iter_4.pth'))
    with open(os.path.join(work, 'last_checkpoint'), 'w') as f:
        f.write(os.path.join(work, 'iter_2.pth'))
    run(train + ['--resume', '--cfg-options'] + tiny_det_options(data))
    assert os.path.isfile(os.path.join(work, 'iter_4.pth'))
    # the resumed run trains iterations 3 and 4 only, on the same schedule
    # (the learning rates of a run without a break)
    assert train_lrs(work, runs='latest') == {3: reference[3],
                                              4: reference[4]}
    # resumed with the model built for other feature sizes: the trained
    # position tables are kept (the checkpoint's shapes, two more steps of
    # training away from the checkpoint's values), the schedule goes on
    other = str(tmp_path / 'other_sizes')
    checkpoint = os.path.join(work, 'iter_2.pth')
    run([sys.executable, 'tools/train.py', DEMO_DET, '--work-dir', other,
         '--resume', checkpoint, '--cfg-options'] + tiny_det_options(data) +
        ['model.backbone.feat_sizes=(64,32,16,8)'])
    assert train_lrs(other, runs='latest') == {3: reference[3],
                                               4: reference[4]}
    before = torch.load(checkpoint)['state_dict']
    after = torch.load(os.path.join(other, 'iter_4.pth'))['state_dict']
    tables = [k for k in before if '.binary.position.' in k]
    assert tables
    for key in tables:
        assert after[key].shape == before[key].shape, key
        assert (after[key] - before[key]).norm() < 0.1 * before[key].norm()


def test_two_process_cpu_training(tmp_path):
    data, work = str(tmp_path / 'data'), str(tmp_path / 'work')
    # generate once, so that the two ranks do not race to write it
    ensure_synthetic_data('coco', data, num_train=8, num_val=4,
                          image_size=128, seed=0)
    run(['bash', 'tools/dist_train.sh', DEMO_DET, '2', '--work-dir', work,
         '--cfg-options'] + tiny_det_options(data, max_iters=2), timeout=900)
    assert os.path.isfile(os.path.join(work, 'iter_2.pth'))
    train, val = load_scalars(work)
    assert [r['step'] for r in train] == [1, 2]
    assert 'coco/bbox_mAP' in val[-1]
    # two processes: the world size MMEngine logs (as 'GPU number')
    logs = glob.glob(os.path.join(work, '*', '*.log'))
    with open(logs[0]) as f:
        assert 'GPU number: 2' in f.read()


def test_distributed_session_destroys_only_its_own_group(tmp_path,
                                                          monkeypatch):
    """The tools' process group ends with the tool; a group that existed
    before (a caller's) is left alone."""
    import torch.distributed as dist
    from mmengine.config import Config

    from lesa_mm.utils.launch import distributed_session
    monkeypatch.setattr('torch.cuda.is_available', lambda: False)
    for key, value in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT='29531',
                           RANK='0', WORLD_SIZE='1').items():
        monkeypatch.setenv(key, value)
    with distributed_session(Config(dict(launcher='pytorch'))):
        assert dist.get_backend() == 'gloo'
    assert not dist.is_initialized()
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store',
                            rank=0, world_size=1)
    try:
        with distributed_session(Config(dict(launcher='pytorch'))):
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_generator_is_deterministic_and_seedable(tmp_path):
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        make_coco_shapes(str(tmp_path / name), num_train=3, num_val=1,
                         seed=seed)
    for rel in ('train/train_00002.png', 'annotations/instances_train.json'):
        assert filecmp.cmp(tmp_path / 'a' / rel, tmp_path / 'b' / rel,
                           shallow=False)
        assert not filecmp.cmp(tmp_path / 'a' / rel, tmp_path / 'c' / rel,
                               shallow=False)
    with open(tmp_path / 'a' / 'annotations' / 'instances_train.json') as f:
        coco = json.load(f)
    assert len(coco['images']) == 3 and coco['annotations']
    ann = coco['annotations'][0]
    assert ann['category_id'] in (1, 2, 3) and ann['area'] > 0
    assert isinstance(ann['segmentation']['counts'], str)


def test_ensure_regenerates_only_when_arguments_change(tmp_path):
    root = str(tmp_path / 'set')
    assert ensure_synthetic_data('folders', root, num_train_per_class=2,
                                 num_val_per_class=1, seed=0)
    assert not ensure_synthetic_data('folders', root, num_train_per_class=2,
                                     num_val_per_class=1, seed=0)
    assert ensure_synthetic_data('folders', root, num_train_per_class=3,
                                 num_val_per_class=1, seed=0)
    assert len(os.listdir(os.path.join(root, 'train', 'circle'))) == 3
    with pytest.raises(ValueError, match="kind must be one of.*'voc'"):
        ensure_synthetic_data('voc', root)


def test_generation_never_touches_a_folder_it_did_not_make(tmp_path):
    """A data_root pointed at a user's own data is refused, naming the
    folder, and left as it was; an empty folder is filled; an interrupted
    generation (the marker says incomplete) is redone."""
    user = tmp_path / 'coco'
    (user / 'annotations').mkdir(parents=True)
    (user / 'annotations' / 'instances_train2017.json').write_text('{}')
    (user / 'train2017').mkdir()
    (user / 'train2017' / '000001.jpg').write_bytes(b'jpeg')
    before = sorted(str(p) for p in user.rglob('*'))
    with pytest.raises(FileExistsError, match=f"{user}.*not made by lesa_mm"):
        ensure_synthetic_data('coco', str(user), num_train=2, num_val=1)
    assert sorted(str(p) for p in user.rglob('*')) == before
    assert (user / 'train2017' / '000001.jpg').read_bytes() == b'jpeg'
    afile = tmp_path / 'a_file'
    afile.write_text('mine')
    with pytest.raises(FileExistsError, match='a_file'):
        ensure_synthetic_data('folders', str(afile))
    assert afile.read_text() == 'mine'

    empty = tmp_path / 'empty'
    empty.mkdir()
    kwargs = dict(num_train_per_class=1, num_val_per_class=1)
    assert ensure_synthetic_data('folders', str(empty), **kwargs)
    marker = empty / 'LESA_SYNTHETIC.json'
    spec = json.loads(marker.read_text())
    assert spec['complete'] is True
    marker.write_text(json.dumps(dict(spec, complete=False)))  # interrupted
    (empty / 'stray.txt').write_text('half-written')
    assert ensure_synthetic_data('folders', str(empty), **kwargs)
    assert not (empty / 'stray.txt').exists()


@pytest.mark.parametrize('config,scope', [
    (DEMO_DET, 'mmdet'),
    ('configs/demo/lesa-resnet50-slim_shapes.py', 'mmpretrain'),
])
def test_building_a_demo_model_or_lazy_dataset_writes_nothing(
        tmp_path, monkeypatch, config, scope):
    """Building a demo config's model (as init_detector, an inferencer or
    a deployment tool does) or its dataset with lazy_init=True writes no
    data; the first use of the data generates it."""
    from mmengine.config import Config
    from mmengine.registry import DATASETS, init_default_scope
    from lesa_mm.utils import build_model_from_config
    monkeypatch.chdir(tmp_path)
    cfg = Config.fromfile(os.path.join(REPO_ROOT, config))
    build_model_from_config(cfg)
    init_default_scope(scope)
    dataset = cfg.test_dataloader.dataset
    dataset.synthetic.update(
        dict(num_train=2, num_val=2) if scope == 'mmdet' else
        dict(num_train_per_class=1, num_val_per_class=1))
    built = DATASETS.build(dict(dataset, lazy_init=True))
    assert os.listdir(tmp_path) == []
    assert len(built) > 0  # first use: generated in the config's data_root
    assert (tmp_path / dataset.data_root / 'LESA_SYNTHETIC.json').is_file()


@pytest.mark.parametrize('config,scope,expected', [
    (DEMO_DET, 'mmdet', 8),
    ('configs/demo/lesa-resnet50-slim_shapes.py', 'mmpretrain', 3 * 2),
])
def test_demo_datasets_generate_their_data(tmp_path, config, scope,
                                           expected):
    """The demo configs' training datasets, built from the registry as any
    tool builds them, generate their data on first use and then reuse it."""
    from mmengine.config import Config
    from mmengine.registry import DATASETS, init_default_scope
    import lesa_mm  # noqa: F401
    cfg = Config.fromfile(os.path.join(REPO_ROOT, config))
    init_default_scope(scope)
    dataset = cfg.train_dataloader.dataset
    dataset.data_root = str(tmp_path / 'data')
    small = (dict(num_train=8, num_val=2) if scope == 'mmdet' else
             dict(num_train_per_class=2, num_val_per_class=1))
    dataset.synthetic.update(small)
    built = DATASETS.build(dataset)
    assert len(built) == expected
    marker = tmp_path / 'data' / 'LESA_SYNTHETIC.json'
    stamp = marker.stat().st_mtime_ns
    assert len(DATASETS.build(dataset)) == expected
    assert marker.stat().st_mtime_ns == stamp  # not generated again

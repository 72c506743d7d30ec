"""What ``tools/train.py`` and ``tools/test.py`` share: loading a config,
checking (or generating) its data, CPU-distributed set-up, building the
Runner."""
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction  # noqa: F401

DATA_LAYOUTS = {
    'coco': """data/coco/
    annotations/instances_train2017.json
    annotations/instances_val2017.json
    train2017/*.jpg
    val2017/*.jpg
    stuffthingmaps/{train2017,val2017}/*.png   (HTC's semantic branch only)""",
    'imagenet': """data/imagenet/
    train/n01440764/*.JPEG ...   (one folder per class)
    val/n01440764/*.JPEG ...     (or val/*.JPEG with meta/val.txt)
    meta/train.txt, meta/val.txt (optional annotation lists)""",
}


def base_parser(description):
    """Arguments shared by tools/train.py and tools/test.py."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help='config file path')
    parser.add_argument('--work-dir', help='where to save logs and results')
    parser.add_argument(
        '--cfg-options', nargs='+', default=None, metavar='KEY=VALUE',
        help='override config settings, e.g. train_cfg.max_epochs=1')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser


def parse_tool_args(parser, argv=None):
    """Parse, and make LOCAL_RANK visible as torch.distributed expects."""
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def _parse_cfg_options(options):
    """``['a.b=1', 'c=[1,2]']`` -> dict, parsed as MMEngine's DictAction."""
    if not options:
        return {}
    import argparse
    namespace = argparse.Namespace()
    DictAction(option_strings=[], dest='opts')(None, namespace, options)
    return namespace.opts


def load_config(path, cfg_options=None, work_dir=None, launcher='none'):
    """Load a config, apply overrides, pick a work dir, and make sure its
    data exists (generating the synthetic demo data when the config asks
    for it)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path!r} not found')
    cfg = Config.fromfile(path)
    overrides = (cfg_options if isinstance(cfg_options, dict) else
                 _parse_cfg_options(cfg_options))
    if overrides:
        cfg.merge_from_dict(overrides)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(path))[0])
    prepare_data(cfg)
    return cfg


def _datasets(cfg):
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(name)
        if loader and loader.get('dataset'):
            dataset = loader.dataset
            while 'dataset' in dataset:  # wrappers (RepeatDataset, ...)
                dataset = dataset.dataset
            yield name, dataset


def prepare_data(cfg):
    """Generate the synthetic demo data if the config names it and it is
    absent; then raise a FileNotFoundError naming the expected layout for
    any dataset whose files are missing."""
    synthetic = cfg.get('synthetic_data')
    if synthetic:
        from lesa_mm.datasets import ensure_synthetic_data
        ensure_synthetic_data(**synthetic)
    for name, dataset in _datasets(cfg):
        root = dataset.get('data_root', '') or ''
        ann_file = dataset.get('ann_file', '') or ''
        kind = 'coco' if 'Coco' in str(dataset.get('type', '')) else 'imagenet'
        needed = []
        if ann_file:
            needed.append(ann_file if osp.isabs(ann_file) else
                          osp.join(root, ann_file))
        elif root:
            split = dataset.get('split', '')
            needed.append(osp.join(root, split) if split else root)
        missing = [p for p in needed if not osp.exists(p)]
        if missing:
            raise FileNotFoundError(
                f'{name}: {missing[0]!r} does not exist. Arrange the '
                f'dataset like this (see README "Data"):\n'
                f'{DATA_LAYOUTS[kind]}\nor point the config elsewhere with '
                f'--cfg-options {name}.dataset.data_root=PATH')


def setup_cpu_distributed(cfg):
    """Distributed training without CUDA: gloo process group, DDP on the
    CPU. (MMEngine's own set-up assumes one CUDA device per process.)"""
    if cfg.launcher != 'pytorch' or torch.cuda.is_available():
        return
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    cfg.env_cfg = cfg.get('env_cfg', {})
    cfg.env_cfg.setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters',
                       cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper


def build_runner(cfg):
    """The Runner the config asks for (``runner_type``) or MMEngine's."""
    import lesa_mm  # noqa: F401  (registers modules, allow-lists types)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    os.makedirs(cfg.work_dir, exist_ok=True)
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)

"""Train a model from a config with MMEngine's Runner.

One entry point for both task families: the config's ``default_scope``
(``mmdet`` or ``mmpretrain``) and ``custom_imports`` (``lesa_mm``) decide
which registries build it.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--cfg-options key=value ...] [--launcher none|pytorch|slurm|mpi]

``--cfg-options`` is parsed by MMEngine's ``DictAction``. Multi-GPU /
multi-node: ``tools/dist_train.sh CONFIG GPUS``. On a machine
without CUDA, distributed runs use the gloo backend on the CPU.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from lesa_mm.utils.launch import (base_parser, build_runner,  # noqa: E402
                                  distributed_session, load_config,
                                  parse_tool_args)


def parse_args(argv=None):
    parser = base_parser('Train a LESA model')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from CKPT, or from the latest checkpoint in the work '
        'dir when no path is given')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the actual total batch size')
    return parse_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.work_dir,
                      args.launcher)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or \
                'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr needs auto_scale_lr.'
                             'base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    with distributed_session(cfg):
        runner = build_runner(cfg)
        runner.train()
    return runner


if __name__ == '__main__':
    main()

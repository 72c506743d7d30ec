"""Evaluate a checkpoint with MMEngine's Runner (mmdet or mmpretrain
configs alike; the config's ``default_scope`` decides).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR]
        [--cfg-options key=value ...] [--launcher none|pytorch|slurm|mpi]
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from lesa_mm.utils.launch import (base_parser, build_runner,  # noqa: E402
                                  distributed_session, load_config,
                                  parse_tool_args)


def parse_args(argv=None):
    parser = base_parser('Test a LESA model')
    parser.add_argument('checkpoint', help='checkpoint file')
    return parse_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.work_dir,
                      args.launcher)
    if not osp.isfile(args.checkpoint) and '://' not in args.checkpoint:
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} not found')
    cfg.load_from = args.checkpoint
    with distributed_session(cfg):
        return build_runner(cfg).test()


if __name__ == '__main__':
    main()

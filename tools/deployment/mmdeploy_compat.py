"""Run an MMDeploy script (its ``tools/deploy.py``, ``tools/torch2onnx.py``,
...) with the fixes MMDeploy 1.3 needs under torch >= 2.9 applied in the
process (:mod:`lesa_mm.mmdeploy_compat`; site-packages is not edited).

    python tools/deployment/mmdeploy_compat.py MMDEPLOY/tools/deploy.py \
        configs/deploy/instance-seg_lesa_onnxruntime_dynamic.py \
        MODEL_CONFIG CHECKPOINT IMAGE --work-dir DIR --device cpu
"""
import os.path as osp
import runpy
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

from lesa_mm import mmdeploy_compat  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not osp.isfile(argv[0]):
        raise SystemExit(f'usage: {osp.basename(__file__)} SCRIPT [ARGS ...]'
                         f' (SCRIPT: an MMDeploy script; got {argv[:1]})')
    mmdeploy_compat.apply()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name='__main__')


if __name__ == '__main__':
    main()

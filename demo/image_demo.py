"""Run a LESA detector or classifier on one image and draw the result.

    python demo/image_demo.py IMAGE CONFIG CHECKPOINT --out FILE.png
        [--score-thr 0.3] [--topk 3] [--device cpu]

The config's ``default_scope`` picks the inferencer: MMDetection's
``DetInferencer`` for ``mmdet`` configs (boxes and masks above
``--score-thr`` drawn into FILE.png), MMPretrain's
``ImageClassificationInferencer`` for ``mmpretrain`` configs (the ``--topk``
classes drawn into FILE.png). The predictions are printed too; ``main``
returns them (``predictions``: ``(class, score, box)`` per detection,
``(class, score)`` per class) with the inferencer's data sample.

Everything stays local: the config and the checkpoint are given as files,
nothing is looked up in a model zoo. Class names come from the checkpoint's
``dataset_meta`` (MMEngine training checkpoints carry it), else from the
config's test dataset.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import lesa_mm  # noqa: E402,F401  (registers LESA first)

#: Smallest short side of the drawn result: the demo's 64-128 px images are
#: upscaled so that labels stay legible.
MIN_DRAW_SIDE = 384


def config_classes(cfg):
    """Class names of the config's test dataset, or None."""
    for loader in ('test_dataloader', 'val_dataloader'):
        dataset = cfg.get(loader, {}).get('dataset', {})
        classes = dataset.get('classes') or dataset.get(
            'metainfo', {}).get('classes')
        if classes:
            return list(classes)
    return list(cfg['classes']) if cfg.get('classes') else None


def run_detection(cfg, image, checkpoint, out, score_thr, device):
    import mmcv
    from mmdet.apis import DetInferencer

    class _Inferencer(DetInferencer):
        """Class names from the config, not COCO's, for checkpoints without
        ``dataset_meta`` (e.g. a bare state dict)."""

        def _load_weights_to_model(self, model, checkpoint, cfg):
            super()._load_weights_to_model(model, checkpoint, cfg)
            meta = (checkpoint or {}).get('meta', {})
            if 'dataset_meta' not in meta and 'CLASSES' not in meta:
                classes = config_classes(cfg)
                if classes:
                    model.dataset_meta['classes'] = classes

    inferencer = _Inferencer(model=cfg, weights=checkpoint, device=device,
                             show_progress=False)
    result = inferencer(image, return_datasamples=True, no_save_pred=True,
                        no_save_vis=True, print_result=False)
    sample = result['predictions'][0]
    classes = inferencer.model.dataset_meta['classes']
    instances = sample.pred_instances
    keep = instances.scores >= score_thr
    predictions = [(classes[int(label)], float(score),
                    tuple(float(v) for v in box))
                   for label, score, box in zip(instances.labels[keep],
                                                instances.scores[keep],
                                                instances.bboxes[keep])]
    print(f'{len(predictions)} detections with score >= {score_thr} '
          f'({len(instances)} in all):')
    for name, score, box in predictions:
        print(f'  {name:<12s} {score:.3f}  box '
              f'({box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, {box[3]:.1f})')

    # draw on an upscaled copy when the image is small
    img = mmcv.imread(image, channel_order='rgb')
    scale = max(1, -(-MIN_DRAW_SIDE // min(img.shape[:2])))
    if scale > 1:
        img = mmcv.imrescale(img, scale, interpolation='nearest')
        sample = sample.clone()
        sample.pred_instances.bboxes = sample.pred_instances.bboxes * scale
        if 'masks' in sample.pred_instances:
            import torch.nn.functional as F
            masks = sample.pred_instances.masks
            # interpolate needs at least one mask; none is an empty stack
            sample.pred_instances.masks = F.interpolate(
                masks.float()[None], size=img.shape[:2],
                mode='nearest')[0].bool() if len(masks) else \
                masks.new_zeros((0, *img.shape[:2]))
    inferencer.visualizer.add_datasample(
        osp.basename(image), img, sample, draw_gt=False,
        pred_score_thr=score_thr, show=False, out_file=out)
    return result['predictions'][0], predictions


def run_classification(cfg, image, checkpoint, out, topk, device):
    import mmcv
    from mmpretrain.apis import ImageClassificationInferencer
    from mmpretrain.visualization import UniversalVisualizer

    inferencer = ImageClassificationInferencer(
        model=cfg, pretrained=checkpoint, device=device)
    if not inferencer.classes:
        inferencer.classes = config_classes(cfg)
    sample = inferencer(image, return_datasamples=True)[0]
    scores = sample.pred_score
    k = min(topk, scores.numel())
    top_scores, top_labels = scores.topk(k)
    classes = inferencer.classes
    predictions = [(classes[int(label)] if classes else str(int(label)),
                    float(score))
                   for label, score in zip(top_labels, top_scores)]
    print(f'top-{k}:')
    for rank, (name, score) in enumerate(predictions, 1):
        print(f'  {rank}. {name:<12s} {score:.3f}')

    img = mmcv.imread(image, channel_order='rgb')
    drawn = sample.clone()
    drawn.set_pred_label(top_labels)  # the visualiser draws each label
    visualizer = UniversalVisualizer()
    visualizer.visualize_cls(
        img, drawn, classes=classes, draw_gt=False, draw_pred=True,
        resize=max(MIN_DRAW_SIDE, min(img.shape[:2])), out_file=out)
    return sample, predictions


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='LESA detection / classification demo on one image')
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='mmdet or mmpretrain config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', required=True, help='PNG to write')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections: lowest score drawn and printed')
    parser.add_argument('--topk', type=int, default=3,
                        help='classification: classes drawn and printed')
    parser.add_argument('--device', default='cpu')
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    for kind in ('image', 'config', 'checkpoint'):
        path = getattr(args, kind)
        if not osp.isfile(path):
            parser.error(f'{kind} file {path!r} not found')
    if args.topk < 1:
        parser.error('--topk must be at least 1')
    cfg = Config.fromfile(args.config)
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmpretrain'):
        parser.error(f"the config's default_scope is {scope!r}; expected "
                     "'mmdet' or 'mmpretrain'")
    # the inferencers build transforms in the current default scope
    init_default_scope(scope)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    try:
        if scope == 'mmdet':
            sample, predictions = run_detection(
                cfg, args.image, args.checkpoint, args.out, args.score_thr,
                args.device)
        else:
            sample, predictions = run_classification(
                cfg, args.image, args.checkpoint, args.out, args.topk,
                args.device)
    except ValueError as err:
        # e.g. LESA's 'classification' encodings refusing another image size
        parser.error(str(err))
    print(f'drawn to {args.out}')
    return dict(out=args.out, sample=sample, predictions=predictions)


if __name__ == '__main__':
    main()

"""Deterministic synthetic data for the demo: coloured shapes.

* :func:`make_coco_shapes`: images with a few filled shapes and their
  instance masks (COCO format, compressed RLE), for detection / instance
  segmentation.
* :func:`make_shape_folders`: one shape per image in ImageNet-style class
  folders (``split/class_name/*.png``), for classification.

Both are seedable and deterministic: the same arguments give the same bytes.
"""
import json
import os
import os.path as osp
import shutil

import cv2
import numpy as np

SHAPES = ('circle', 'square', 'triangle')


def _draw_shape(kind, size, rng):
    """Boolean mask of one shape with bounding box side about ``size``.

    Returns:
        tuple[np.ndarray, int]: The mask (``size x size``) and its side.
    """
    canvas = np.zeros((size, size), np.uint8)
    c = size // 2
    if kind == 'circle':
        cv2.circle(canvas, (c, c), size // 2 - 1, 1, thickness=-1)
    elif kind == 'square':
        margin = max(1, size // 10)
        cv2.rectangle(canvas, (margin, margin),
                      (size - 1 - margin, size - 1 - margin), 1,
                      thickness=-1)
    elif kind == 'triangle':
        pts = np.array([[c, 1], [size - 2, size - 2], [1, size - 2]],
                       np.int32)
        cv2.fillPoly(canvas, [pts], 1)
    else:
        raise ValueError(f'unknown shape {kind!r}; allowed: {SHAPES}')
    return canvas.astype(bool)


def _background(rng, height, width):
    base = rng.randint(0, 80, size=3)
    noise = rng.randint(0, 30, size=(height, width, 1))
    return np.clip(base[None, None] + noise, 0, 255).astype(np.uint8)


def _colour(rng):
    # bright colours on a dark background
    colour = rng.randint(0, 256, size=3)
    colour[rng.randint(3)] = rng.randint(180, 256)
    return colour.astype(np.uint8)


def _render_scene(rng, image_size, max_objects, min_frac, max_frac):
    """One image with 1..max_objects shapes; later shapes occlude earlier
    ones. Returns the image and a list of (class index, full-image mask)."""
    img = _background(rng, image_size, image_size)
    objects = []
    for _ in range(rng.randint(1, max_objects + 1)):
        label = rng.randint(len(SHAPES))
        size = rng.randint(int(min_frac * image_size),
                           int(max_frac * image_size) + 1)
        y, x = rng.randint(0, image_size - size + 1, size=2)
        shape = _draw_shape(SHAPES[label], size, rng)
        mask = np.zeros((image_size, image_size), bool)
        mask[y:y + size, x:x + size] = shape
        for _, other in objects:  # occlusion
            other &= ~mask
        img[mask] = _colour(rng)
        objects.append((label, mask))
    # drop objects that occlusion left too small to see
    objects = [(label, m) for label, m in objects if m.sum() >= 30]
    return img, objects


def _coco_annotation(mask, ann_id, image_id, label):
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return dict(
        id=ann_id, image_id=image_id, category_id=label + 1,
        segmentation=rle, area=float(mask.sum()), bbox=[x, y, w, h],
        iscrowd=0)


def make_coco_shapes(root, num_train=400, num_val=100, image_size=128,
                     max_objects=3, min_frac=0.2, max_frac=0.45, seed=0):
    """Write a COCO-format instance-segmentation set of coloured shapes.

    Layout: ``root/{train,val}/*.png`` and
    ``root/annotations/instances_{train,val}.json``; categories
    ``circle, square, triangle`` (ids 1-3).
    """
    rng = np.random.RandomState(seed)
    categories = [dict(id=i + 1, name=n) for i, n in enumerate(SHAPES)]
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    for split, count in (('train', num_train), ('val', num_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            img, objects = _render_scene(rng, image_size, max_objects,
                                         min_frac, max_frac)
            image_id = index + 1
            name = f'{split}_{index:05d}.png'
            cv2.imwrite(osp.join(root, split, name), img)
            images.append(dict(id=image_id, file_name=name,
                               height=image_size, width=image_size))
            for label, mask in objects:
                annotations.append(_coco_annotation(
                    mask, len(annotations) + 1, image_id, label))
        with open(osp.join(root, 'annotations',
                           f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations,
                           categories=categories), f)


def make_shape_folders(root, num_train_per_class=200, num_val_per_class=50,
                       image_size=64, min_frac=0.35, max_frac=0.8, seed=0):
    """Write ImageNet-style class folders of single coloured shapes:
    ``root/{train,val}/{circle,square,triangle}/*.png``."""
    rng = np.random.RandomState(seed)
    for split, count in (('train', num_train_per_class),
                         ('val', num_val_per_class)):
        for label, kind in enumerate(SHAPES):
            folder = osp.join(root, split, kind)
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                img = _background(rng, image_size, image_size)
                size = rng.randint(int(min_frac * image_size),
                                   int(max_frac * image_size) + 1)
                y, x = rng.randint(0, image_size - size + 1, size=2)
                mask = np.zeros((image_size, image_size), bool)
                mask[y:y + size, x:x + size] = _draw_shape(kind, size, rng)
                img[mask] = _colour(rng)
                cv2.imwrite(osp.join(folder, f'{kind}_{index:05d}.png'), img)


GENERATORS = dict(coco=make_coco_shapes, folders=make_shape_folders)


#: The file that marks a folder as written by :func:`ensure_synthetic_data`:
#: the generator's arguments, and whether the set is complete.
MARKER = 'LESA_SYNTHETIC.json'


def ensure_synthetic_data(kind, root, **kwargs):
    """Generate the demo data under ``root`` unless a complete set made with
    the same arguments is already there.

    Only a folder this function made itself (it holds its marker file,
    :data:`MARKER`, written before anything else) is ever regenerated, and
    so replaced. A folder that does not exist or is empty is filled; any
    other folder is refused, so that a ``data_root`` pointed at a user's own
    data never touches it.

    Args:
        kind (str): ``'coco'`` or ``'folders'``.
        root (str): Output folder.
        **kwargs: Arguments of the generator (sizes, counts, seed).

    Returns:
        bool: Whether the data was generated.

    Raises:
        FileExistsError: If ``root`` is a non-empty folder without the
            marker, or not a folder.
    """
    if kind not in GENERATORS:
        raise ValueError(f'synthetic data kind must be one of '
                         f'{tuple(GENERATORS)}, got {kind!r}')
    marker = osp.join(root, MARKER)
    spec = dict(kind=kind, **kwargs)
    if osp.isfile(marker):
        with open(marker) as f:
            if json.load(f) == dict(spec, complete=True):
                return False
        # ours, but incomplete or made with other arguments
        shutil.rmtree(root)
    elif osp.exists(root) and (not osp.isdir(root) or os.listdir(root)):
        raise FileExistsError(
            f'the synthetic demo data would be generated in {root!r}, which '
            f'exists and was not made by lesa_mm (no {MARKER} in it); '
            f'nothing was changed. Point the config\'s data_root at a new '
            f'or empty folder, or at a folder of earlier generated demo data')
    os.makedirs(root, exist_ok=True)
    with open(marker, 'w') as f:  # claim the folder before writing into it
        json.dump(dict(spec, complete=False), f)
    print(f'generating synthetic {kind} data in {root} ({kwargs})',
          flush=True)
    GENERATORS[kind](root, **kwargs)
    with open(marker, 'w') as f:
        json.dump(dict(spec, complete=True), f)
    return True

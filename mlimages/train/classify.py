"""Top-k classification of an image list or folder with a trained model (upstream
image_classification.py), for both the 1,000-class softmax model and the 11,166-class
multi-label model (sigmoid scores, ML-Images class names). A bad image gives an error line for
that image; the run goes on.
"""
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from mlimages import hierarchy, sources
from mlimages.runtime import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Upstream resizes the shorter side to 256 before a 224 centre crop; kept proportional.
RESIZE_RATIO = 256 / 224


@dataclass
class Prediction:
    path: str
    error: str = ""
    top: list = field(default_factory=list)  # (class index, name, score)


def image_paths(source: str) -> list:
    """Paths from a list file (first whitespace-separated field per line) or a folder.

    Relative paths in a list are taken from the current folder, else from the list's folder.
    """
    if os.path.isdir(source):
        return sorted(os.path.join(source, name) for name in os.listdir(source)
                      if name.lower().endswith(IMAGE_EXTENSIONS))
    if not os.path.isfile(source):
        raise UserError(f"no image list or folder at {source}")
    base = os.path.dirname(os.path.abspath(source))
    paths = []
    with open(source, encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            path = fields[0]
            if not os.path.isabs(path) and not os.path.exists(path):
                path = os.path.join(base, path)
            paths.append(path)
    return paths


def load_image(path: str, size: int) -> np.ndarray:
    """Upstream inference preprocessing: shorter side to 256/224 x size (bilinear), centre
    crop, scale to [-1, 1], RGB. Raises OSError/ValueError for unreadable images."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        shorter = int(round(size * RESIZE_RATIO))
        scale = shorter / min(width, height)
        resized = (max(size, int(width * scale)), max(size, int(height * scale)))
        image = image.resize(resized, Image.BILINEAR)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32)
    return (pixels / 255.0 - 0.5) * 2.0


def load_batches(paths: list, size: int, batch_size: int):
    """Yields (paths, images, errors): images of the readable paths; errors {path: reason}."""
    for start in range(0, len(paths), batch_size):
        chunk, images, ok, errors = paths[start:start + batch_size], [], [], {}
        for path in chunk:
            try:
                images.append(load_image(path, size))
                ok.append(path)
            except (OSError, ValueError, SyntaxError) as err:
                errors[path] = f"{type(err).__name__}: {err}"
        yield chunk, ok, (np.stack(images) if images else None), errors


def class_names(kind: str, num_classes: int, dictionary: str = "") -> list:
    """Readable names: the ML-Images hierarchy for 11,166 outputs, the ImageNet dictionary
    (all its words joined, not only the first) for 1,000, else the dictionary given."""
    if not dictionary:
        if num_classes == 11166:
            dictionary = sources.sample_file(sources.HIERARCHY)
        elif num_classes == 1000:
            dictionary = sources.sample_file(sources.IMAGENET_DICTIONARY)
        else:
            return [str(i) for i in range(num_classes)]
    if os.path.basename(dictionary) == sources.HIERARCHY or kind == "hierarchy":
        return [c.name for c in hierarchy.load_hierarchy(dictionary).classes]
    names = [str(i) for i in range(num_classes)]
    with open(dictionary, encoding="utf-8") as handle:
        for line in handle:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) >= 2 and fields[0].isdigit() and int(fields[0]) < num_classes:
                names[int(fields[0])] = " ".join(f for f in fields[1:] if f)
    return names


def classify(model_dir: str, source: str, top_k: int = 5, image_size: int = 224,
             batch_size: int = 16, dictionary: str = "") -> list:
    """Top-k predictions per image of ``source``: softmax for a fine-tuned (single-label)
    model, sigmoid for a pre-trained (multi-label) one."""
    from mlimages.train.finetune import restore_model

    model, kind, saved = restore_model(model_dir)
    names = class_names(kind, saved.model.num_classes, dictionary)
    multilabel = kind == "pretrain"
    results = []
    for chunk, ok, images, errors in load_batches(image_paths(source), image_size, batch_size):
        scores = {}
        if images is not None:
            logits = model(images, training=False).numpy().astype(np.float64)
            probs = _sigmoid(logits) if multilabel else _softmax(logits)
            scores = dict(zip(ok, probs, strict=True))
        for path in chunk:
            if path not in errors and not np.isfinite(scores[path]).all():
                errors[path] = "non-finite scores: the model is not trained enough"
            if path in errors:
                log.warning("%s: %s", path, errors[path])
                results.append(Prediction(path, error=errors[path]))
                continue
            top = np.argsort(-scores[path], kind="stable")[:top_k]
            results.append(Prediction(path, top=[(int(i), names[i], float(scores[path][i]))
                                                 for i in top]))
    return results


def _sigmoid(x):
    # 1 / (1 + e^-x) written through logaddexp, which cannot overflow for large |x|.
    return np.exp(-np.logaddexp(0.0, -x))


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def write_label_pred(results: list, path: str) -> None:
    """The upstream ``label_pred.txt`` layout, plus an error line for unreadable images."""
    with open(path, "w", encoding="utf-8") as out:
        for result in results:
            out.write(f"+++ the predictions of {result.path} is:\n")
            if result.error:
                out.write(f"error: {result.error}\n")
            for index, name, score in result.top:
                out.write(f"{index} {name}: {score:.3f}\n")


def write_json(results: list, path: str) -> None:
    rows = [{"path": r.path, "error": r.error or None,
             "predictions": [{"class": i, "name": n, "score": round(s, 6)}
                             for i, n, s in r.top]} for r in results]
    with open(path, "w", encoding="utf-8") as out:
        json.dump(rows, out, indent=1)

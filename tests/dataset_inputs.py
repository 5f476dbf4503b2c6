"""Small labels/, download/ and object-store inputs for the dataset stage, laid out exactly as
the labels and download stages write them (tables per docs/architecture.md, objects through
mlimages.storage with its content keys and ``_store.json``)."""
import dataclasses
import hashlib
import io
import os

import numpy as np
from PIL import Image

from mlimages import storage

# Classes used by the fixture; TRAINABLE are those with >= 2 training images below.
CLASSES = (1, 2, 3, 5, 8)
TRAINABLE_THRESHOLD = 2


@dataclasses.dataclass
class Item:
    name: str
    data: bytes
    split: str
    classes: list
    confidences: list
    source: str = "openimages"
    manifest: str = "ok"          # manifest status; None: no manifest row
    stored: bool = True           # whether the object exists in the store
    expect: str = "ok"            # "ok" or the rejection reason with class_filter=all
    labelled: bool = True

    @property
    def image_id(self) -> int:
        return int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:7], "big")


def _encode(image, fmt, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def _noise(width, height, seed) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def odd_images() -> dict:
    """name -> bytes of every converted kind (sizes above the default min_short_side)."""
    palette = Image.new("P", (120, 80), 0)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.paste(1, (60, 0, 120, 80))
    frames = [Image.new("RGB", (90, 60), (255, 0, 0)), Image.new("RGB", (90, 60), (0, 255, 0))]
    rotated = _noise(160, 100, 7)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "cmyk.jpg": _encode(Image.new("CMYK", (100, 70), (0, 200, 200, 0)), "JPEG"),
        "grey.jpg": _encode(Image.new("L", (100, 70), 90), "JPEG"),
        "palette_transparent.png": _encode(palette, "PNG", transparency=0),
        "rgba.png": _encode(Image.new("RGBA", (100, 70), (0, 0, 255, 100)), "PNG"),
        "grey16.png": _encode(Image.fromarray(np.full((70, 100), 50000, np.uint16)), "PNG"),
        "animated.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "rotated.jpg": _encode(rotated, "JPEG", exif=exif),
        "big.png": _encode(_noise(900, 500, 3), "PNG"),
    }


def items(sample_photos) -> list:
    """Every fixture image with its labels and the outcome the dataset job must give it."""
    out = []
    for i, path in enumerate(sample_photos):
        with open(path, "rb") as handle:
            out.append(Item(f"photo{i}.jpg", handle.read(), "train", [1, 2, 5],
                            [1.0, 0.9, 0.8], source="imagenet"))
    for i, (name, data) in enumerate(sorted(odd_images().items())):
        split = "val" if i % 3 == 0 else "train"
        out.append(Item(name, data, split, [2, 3] if i % 2 else [1, 3], [1.0, 0.8]))
    out += [
        Item("html.jpg", b"<html>gone</html>", "train", [1], [1.0], expect="unreadable"),
        Item("truncated.jpg", _encode(_noise(200, 150, 1), "JPEG")[:3000], "train", [2], [1.0],
             expect="decode_error"),
        Item("tiny.png", _encode(Image.new("RGB", (12, 12)), "PNG"), "val", [1], [1.0],
             expect="too_small"),
        Item("lost.jpg", _encode(_noise(64, 64, 2), "JPEG"), "train", [1], [1.0],
             stored=False, expect="missing_object"),
        # Only an untrainable class: rejected with class_filter=trainable, kept otherwise.
        Item("rare.jpg", _encode(_noise(80, 60, 4), "JPEG"), "val", [8], [0.9]),
        # Not part of the join: download failed, or downloaded but never labelled.
        Item("failed.jpg", b"", "train", [1], [1.0], manifest="failed", stored=False,
             expect=None),
        Item("unlabelled.jpg", _encode(_noise(64, 64, 5), "JPEG"), "train", [], [],
             labelled=False, expect=None),
    ]
    return out


def trainable_classes(fixture_items) -> set:
    train = {}
    for item in fixture_items:
        if item.labelled and item.split == "train":
            for c in item.classes:
                train[c] = train.get(c, 0) + 1
    return {c for c, n in train.items() if n >= TRAINABLE_THRESHOLD}


def write_inputs(spark, root: str, fixture_items, class_hierarchy, options=None) -> dict:
    """Writes labels/, download/ (manifest, _store.json) under ``root``, and the objects to
    the store ``options`` describe (default: a local folder in download/)."""
    labels_dir, download_dir = os.path.join(root, "labels"), os.path.join(root, "download")
    options = options or storage.StoreOptions(backend="local",
                                              root=os.path.join(download_dir, "objects"))
    store = storage.open_store(options)
    labels, manifest = [], []
    for item in fixture_items:
        sha = hashlib.sha256(item.data).hexdigest()
        key = store.key_for(sha, "jpg")
        if item.stored:
            store.put(key, item.data)
        if item.labelled:
            labels.append((item.image_id, item.split, item.source, item.classes,
                           [float(c) for c in item.confidences], len(item.classes)))
        if item.manifest:
            ok = item.manifest == "ok"
            manifest.append((item.image_id, f"http://127.0.0.1/{item.name}", item.manifest,
                             200 if ok else 404, None if ok else "HTTP 404", 1, len(item.data),
                             sha, "JPEG", 10, 10, key if ok else None, None))
    storage.record_store(download_dir, options)
    spark.createDataFrame(labels, "image_id long, split string, source string, "
                          "classes array<int>, confidences array<float>, tags_before int") \
        .write.mode("overwrite").parquet(f"{labels_dir}/image_labels")
    spark.createDataFrame(manifest, "image_id long, url string, status string, "
                          "http_status int, error string, attempts int, bytes long, "
                          "sha256 string, format string, width int, height int, "
                          "object_key string, fetched_at timestamp") \
        .write.mode("overwrite").parquet(f"{download_dir}/manifest")
    trainable = trainable_classes(fixture_items)
    counts = []
    for c in CLASSES:
        train = sum(1 for i in fixture_items if i.labelled and i.split == "train"
                    and c in i.classes)
        val = sum(1 for i in fixture_items if i.labelled and i.split == "val" and c in i.classes)
        info = class_hierarchy.classes[c]
        counts.append((c, info.wnid, info.name, train, val, c in trainable))
    spark.createDataFrame(counts, "class int, wnid string, name string, train_images long, "
                          "val_images long, trainable boolean") \
        .write.mode("overwrite").parquet(f"{labels_dir}/class_counts")
    return {"labels": labels_dir, "download": download_dir}

"""A small synthetic Petastorm dataset in the dataset job's schema, for tests, the benchmark
and the demo: random-colour JPEGs with random sparse labels, written as several Parquet files
of chosen sizes (so shards are uneven). It trains nothing useful; it exercises the pipeline."""
import io
import logging

import numpy as np

from mlimages import schema

log = logging.getLogger(__name__)


def _jpeg(rng, size: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = rng.integers(size // 2, size, 2)
        draw.ellipse([int(x0), int(y0), int(x1), int(y1)],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def sample_rows(count: int, seed: int = 0, size: int = 64, split: str = "train",
                num_classes: int = 11166, first_id: int = 0) -> list:
    """Rows as tuples in schema order. The most confident class of each row is < 1000, so the
    same rows serve single-label (ImageNet-style) fine-tuning."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        top = int(rng.integers(0, 1000))
        others = rng.choice(np.arange(1000, num_classes), int(rng.integers(1, 8)), replace=False)
        classes = sorted({top, *map(int, others)})
        confidences = [1.0 if c == top else float(rng.choice([0.8, 0.9, 1.0])) for c in classes]
        rows.append(schema.as_row({
            "image_id": first_id + i, "image": _jpeg(rng, size), "height": size, "width": size,
            "classes": classes, "confidences": confidences,
            "source": "openimages", "split": split}))
    return rows


def write_sample_dataset(spark, path: str, file_sizes=(14, 6, 10), val_rows: int = 6,
                         size: int = 64, seed: int = 0) -> dict:
    """Writes one Parquet file per entry of ``file_sizes`` (train rows) plus one of
    ``val_rows`` validation rows under ``path``; returns the row counts."""
    from petastorm.etl.dataset_metadata import materialize_dataset

    url = path if "://" in path else "file://" + path
    parts = [(n, "train") for n in file_sizes] + ([(val_rows, "val")] if val_rows else [])
    first = 0
    with materialize_dataset(spark, url, schema.MLImagesSchema, row_group_size_mb=64):
        for index, (count, split) in enumerate(parts):
            rows = sample_rows(count, seed + index, size, split, first_id=first)
            first += count
            frame = spark.createDataFrame(rows, schema.spark_schema()).coalesce(1)
            frame.write.mode("overwrite" if index == 0 else "append").parquet(url)
    return {"train": int(sum(file_sizes)), "val": int(val_rows), "files": len(parts)}

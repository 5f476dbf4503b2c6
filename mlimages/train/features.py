"""2048-d feature extraction (upstream extract_feature.py): the post-ReLU global-pool output
before the classifier, for an image list, a folder, or a whole Petastorm dataset (with Spark).

Output Parquet columns: ``image_id`` (int64; null for list/folder input), ``path`` (null for
dataset input), ``features`` (list<float32>, null on error) and ``error`` (null when fine).
"""
import io
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlimages.train import classify

log = logging.getLogger(__name__)

FEATURES_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()),
    ("features", pa.list_(pa.float32())), ("error", pa.string())])


def _feature_model(model_dir: str):
    from mlimages.train import resnet
    from mlimages.train.finetune import restore_model

    model, _, _ = restore_model(model_dir)
    return resnet.features_model(model)


def extract_images(model_dir: str, source: str, output: str, image_size: int = 224,
                   batch_size: int = 16) -> dict:
    """Features of every image of a list file or folder into the Parquet file ``output``."""
    extractor = _feature_model(model_dir)
    paths, features, errors = [], [], []
    for chunk, ok, images, failed in classify.load_batches(
            classify.image_paths(source), image_size, batch_size):
        vectors = {}
        if images is not None:
            pooled = extractor(images, training=False)[0].numpy()
            vectors = dict(zip(ok, pooled, strict=True))
        for path in chunk:
            paths.append(path)
            features.append(vectors[path].tolist() if path in vectors else None)
            errors.append(failed.get(path))
            if path in failed:
                log.warning("%s: %s", path, failed[path])
    _write(output, [None] * len(paths), paths, features, errors)
    counts = {"images": len(paths), "extracted": sum(e is None for e in errors),
              "failed": sum(e is not None for e in errors)}
    log.info("features of %(extracted)d/%(images)d images written", counts)
    return counts


def _write(output: str, ids, paths, features, errors) -> None:
    table = pa.table({"image_id": pa.array(ids, pa.int64()), "path": pa.array(paths, pa.string()),
                      "features": pa.array(features, pa.list_(pa.float32())),
                      "error": pa.array(errors, pa.string())}, schema=FEATURES_SCHEMA)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    pq.write_table(table, output)


def _decode(jpeg: bytes, size: int) -> np.ndarray:
    return classify.load_image(io.BytesIO(jpeg), size)


def _partition_extractor(model_dir: str, image_size: int, batch_size: int):
    """A mapInPandas function: one model per Python worker, batches of rows to features."""
    import pandas as pd

    cache = {}

    def extract(frames):
        if "model" not in cache:
            import mlimages.train  # noqa: F401  (selects Keras 2 before TensorFlow loads)
            cache["model"] = _feature_model(model_dir)
        extractor = cache["model"]
        for frame in frames:
            for start in range(0, len(frame), batch_size):
                part = frame.iloc[start:start + batch_size]
                images, ok, features, errors = [], [], [None] * len(part), [None] * len(part)
                for row, jpeg in enumerate(part["image"]):
                    try:
                        images.append(_decode(jpeg, image_size))
                        ok.append(row)
                    except (OSError, ValueError, SyntaxError) as err:
                        errors[row] = f"{type(err).__name__}: {err}"
                if images:
                    vectors = extractor(np.stack(images), training=False)[0].numpy()
                    for row, vector in zip(ok, vectors, strict=True):
                        features[row] = vector.tolist()
                yield pd.DataFrame({"image_id": part["image_id"].to_numpy(), "path": None,
                                    "features": features, "error": errors})
    return extract


def extract_dataset(spark, model_dir: str, dataset_url: str, output: str,
                    image_size: int = 224, batch_size: int = 16) -> dict:
    """Features of every row of a Petastorm dataset, distributed over Spark executors
    (each Python worker loads the model once); written as a Parquet folder."""
    from pyspark.sql import functions as F

    rows = spark.read.parquet(dataset_url).select("image_id", "image")
    schema = "image_id long, path string, features array<float>, error string"
    result = rows.mapInPandas(_partition_extractor(model_dir, image_size, batch_size), schema)
    result.write.mode("overwrite").parquet(output)
    written = spark.read.parquet(output)
    counts = written.agg(F.count("*").alias("images"),
                         F.count("features").alias("extracted")).first().asDict()
    counts["failed"] = counts["images"] - counts["extracted"]
    log.info("features of %(extracted)d/%(images)d dataset rows written", counts)
    return counts

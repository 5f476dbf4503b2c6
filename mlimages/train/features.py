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
    """A mapPartitions function: one model per Python worker, (image_id, image) rows in,
    (image_id, path, features, error) tuples out, in batches."""
    cache = {}

    def extract(rows):
        if "model" not in cache:
            import mlimages.train  # noqa: F401  (selects Keras 2 before TensorFlow loads)
            cache["model"] = _feature_model(model_dir)
        extractor = cache["model"]
        batch = []
        for row in rows:
            batch.append(row)
            if len(batch) == batch_size:
                yield from _extract_batch(extractor, batch, image_size)
                batch = []
        if batch:
            yield from _extract_batch(extractor, batch, image_size)
    return extract


def _extract_batch(extractor, rows, image_size: int):
    images, ok, errors = [], [], {}
    for index, row in enumerate(rows):
        try:
            images.append(_decode(bytes(row.image), image_size))
            ok.append(index)
        except (OSError, ValueError, SyntaxError) as err:
            errors[index] = f"{type(err).__name__}: {err}"
    vectors = {}
    if images:
        pooled = extractor(np.stack(images), training=False)[0].numpy()
        vectors = dict(zip(ok, pooled, strict=True))
    for index, row in enumerate(rows):
        vector = vectors.get(index)
        yield (int(row.image_id), None, None if vector is None else vector.tolist(),
               errors.get(index))


def extract_dataset(spark, model_dir: str, dataset_url: str, output: str,
                    image_size: int = 224, batch_size: int = 16) -> dict:
    """Features of every row of a Petastorm dataset, distributed over Spark executors
    (each Python worker loads the model once); written as a Parquet folder."""
    from pyspark.sql import functions as F

    rows = spark.read.parquet(dataset_url).select("image_id", "image")
    # An RDD map, not mapInPandas: pyspark 4's Arrow UDFs need pyarrow >= 18, and petastorm
    # pins pyarrow 12.
    schema = "image_id long, path string, features array<float>, error string"
    extracted = rows.rdd.mapPartitions(_partition_extractor(model_dir, image_size, batch_size))
    spark.createDataFrame(extracted, schema).write.mode("overwrite").parquet(output)
    written = spark.read.parquet(output)
    counts = written.agg(F.count("*").alias("images"),
                         F.count("features").alias("extracted")).first().asDict()
    counts["failed"] = counts["images"] - counts["extracted"]
    log.info("features of %(extracted)d/%(images)d dataset rows written", counts)
    return counts

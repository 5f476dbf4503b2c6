"""Importer: upstream TFRecord shards (data/tfrecord.py output) -> the same Petastorm dataset.

Upstream records hold ``width``, ``height`` (int64), ``image`` (encoded bytes, full size, PNG
re-encoded as JPEG, GIF possibly as-is), ``name`` (the image list's first field) and ``label``:
the raw bytes of a dense float32 vector of length ``num_classes`` (one-hot mode) or an int64
class index (integer mode). Each record is prepared exactly like a downloaded image, its dense
label turned into sparse ``classes``/``confidences`` (entries > 0; upstream's -1 "ignore" has
no place in the sparse form and is counted), and ``image_id`` is ``xxhash64(name)``.

Shards are read by path inside the executors, so they must be on a file system every executor
sees (local folder in local mode, a shared mount on a cluster).
"""
import concurrent.futures
import glob
import logging
import os
import struct

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mlimages import dataset, imageprep, runtime

log = logging.getLogger(__name__)

BAD_RECORD = "bad_record"   # the record cannot be parsed, or lacks image/label
BAD_LABEL = "bad_label"     # label bytes are not num_classes float32 values, or no class > 0


def read_records(path: str):
    """Yields the serialized records of one TFRecord file (length-prefixed frames)."""
    with open(path, "rb") as handle:
        while True:
            header = handle.read(12)  # uint64 length + masked CRC of the length
            if not header:
                return
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            data = handle.read(length)
            if len(data) < length or len(handle.read(4)) < 4:
                raise ValueError(f"{path}: truncated record")
            yield data


def parse_example(record: bytes) -> dict:
    """The upstream fields of one ``tf.train.Example``."""
    from tensorflow.core.example import example_pb2

    feature = example_pb2.Example.FromString(record).features.feature

    def first_bytes(key):
        return feature[key].bytes_list.value[0] if key in feature and \
            feature[key].bytes_list.value else None

    def first_int(key):
        return feature[key].int64_list.value[0] if key in feature and \
            feature[key].int64_list.value else None

    return {"image": first_bytes("image"), "name": first_bytes("name"),
            "label_bytes": first_bytes("label"), "label_int": first_int("label")}


def sparse_label(fields: dict, num_classes: int):
    """``(classes, confidences, ignored)`` from the dense or integer upstream label."""
    if fields["label_bytes"] is not None:
        if len(fields["label_bytes"]) != 4 * num_classes:
            raise ValueError(f"label has {len(fields['label_bytes'])} bytes, expected "
                             f"{4 * num_classes} (num_classes={num_classes} float32)")
        dense = np.frombuffer(fields["label_bytes"], dtype="<f4")
        classes = np.flatnonzero(dense > 0)
        return classes.tolist(), dense[classes].tolist(), int(np.sum(dense < 0))
    if fields["label_int"] is not None and 0 <= fields["label_int"] < num_classes:
        return [int(fields["label_int"])], [1.0], 0
    raise ValueError("no usable label")


def _record_row(origin, record, num_classes, prep, split, source):
    """One record -> a prepared row (image_id filled in later from ``name``) and its name."""
    def rejected(reason, detail, name=None):
        return (0, None, None, None, None, None, source, split, dataset.REJECTED, reason,
                detail[:500], origin), name or origin
    try:
        fields = parse_example(record)
    except Exception as err:  # noqa: BLE001 - a malformed record is this row's outcome
        return rejected(BAD_RECORD, f"{type(err).__name__}: {err}")
    name = fields["name"].decode("utf-8", "replace") if fields["name"] else origin
    try:
        classes, confidences, _ = sparse_label(fields, num_classes)
    except ValueError as err:
        return rejected(BAD_LABEL, str(err), name)
    if not classes:
        return rejected(BAD_LABEL, "no class with a confidence above 0", name)
    if not fields["image"]:
        return rejected(BAD_RECORD, "no image bytes", name)
    try:
        image = imageprep.prepare_image(fields["image"], prep)
    except imageprep.ImagePrepError as err:
        return rejected(err.reason, err.detail, name)
    return (0, image.jpeg, image.height, image.width, classes, confidences, source, split,
            dataset.OK, None, None, origin), name


def import_file(path: str, num_classes: int, prep, split: str, source: str, threads: int):
    """Prepared rows (plus name) of every record of one shard, ``threads`` at a time."""
    def work(item):
        index, record = item
        return _record_row(f"{path}#{index}", record, num_classes, prep, split, source)

    try:
        records = enumerate(read_records(path))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            while True:
                chunk = [item for _, item in zip(range(threads * 4), records, strict=False)]
                if not chunk:
                    return
                for row, name in pool.map(work, chunk):
                    yield row + (name,)
    except ValueError as err:  # a truncated shard: keep what was read, report the rest
        yield (0, None, None, None, None, None, source, split, dataset.REJECTED, BAD_RECORD,
               str(err)[:500], f"{path}#end", f"{path}#end")


def shard_paths(pattern: str) -> list:
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else (
        sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
               if f.endswith("tfrecords")) if os.path.isdir(pattern) else [pattern])
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise runtime.UserError(f"no TFRecord file matches {pattern!r}")
    return paths


def import_tfrecords(spark: SparkSession, sources: dict, output: str, num_classes: int,
                     options: dataset.DatasetOptions, source: str = "openimages") -> dict:
    """Imports ``{split: folder or glob}`` of upstream shards into ``output`` (like the
    dataset job: one Petastorm dataset per split, ``rejects/``, ``_summary.json``)."""
    prep, threads = options.prep_options(), options.read_threads
    tasks = [(split, path) for split, pattern in sources.items()
             for path in shard_paths(pattern)]
    raw = spark.sparkContext.parallelize(tasks, len(tasks)).flatMap(
        lambda task: import_file(task[1], num_classes, prep, task[0], source, threads))
    columns = T.StructType(dataset.PREPARED_SCHEMA.fields + [
        T.StructField("name", T.StringType(), False)])
    prepared = (spark.createDataFrame(raw, columns)
                .withColumn("image_id", F.xxhash64("name")).drop("name")
                .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        arranged, _, per_split = dataset.layout(prepared, list(sources), options)
        arranged = arranged.persist(StorageLevel.MEMORY_AND_DISK)
        summary = {"shards": len(tasks), "records": sum(per_split.values()),
                   "num_classes": num_classes, "sampled_out": 0,
                   "options": dataset.public_options(options)}
        summary = dataset.finish(spark, arranged, output, list(sources), options, summary)
        arranged.unpersist()
    finally:
        prepared.unpersist()
    summary["all_records_accounted"] = (
        summary["images_written"] + summary["images_rejected"] == summary["records"])
    runtime.write_summary(output, summary)
    log.info("tfrecord import: %d shards, %d records; %d written, %d rejected %s",
             len(tasks), summary["records"], summary["images_written"],
             summary["images_rejected"], summary["rejected_by_reason"])
    return summary

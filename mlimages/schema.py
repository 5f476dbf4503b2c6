"""The Petastorm Unischema of the training dataset.

One row per image. The image is stored as the encoded JPEG bytes written by the dataset job
(decoded later by ``tf.io.decode_jpeg``): no opencv, no decode/re-encode round trip on read.
Labels are sparse: ``classes`` holds the class indices and ``confidences`` the matching
confidences, both plain Parquet lists (pandas, pyarrow, DuckDB and Spark read them as lists),
instead of the upstream dense float vector of 11,166 values per image.
"""
import logging

import numpy as np
from petastorm.codecs import ScalarCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql import types as T

log = logging.getLogger(__name__)


# Every codec is a petastorm ScalarCodec on purpose: petastorm pickles the Unischema into the
# dataset metadata and unpickles it with a whitelist (petastorm, numpy, pyspark, ...), so a codec
# class of our own would make every reader fail with "global ... is forbidden". ScalarCodec
# decodes by calling the numpy type: np.bytes_(jpeg) keeps the bytes (a JPEG ends in FFD9, so
# no trailing NUL is lost) and np.int32([...]) builds an array. Rows are written as Spark rows
# built by the dataset job (see :func:`spark_schema`), not through ``dict_to_spark_row``, whose
# ScalarCodec.encode rejects bytes and lists.
_IMAGE = ScalarCodec(T.BinaryType())
_CLASSES = ScalarCodec(T.ArrayType(T.IntegerType(), containsNull=False))
_CONFIDENCES = ScalarCodec(T.ArrayType(T.FloatType(), containsNull=False))

# Field order is the column order of the Parquet files.
MLImagesSchema = Unischema("MLImagesSchema", [
    # xxhash64 of the image key (ingest stage): the id every stage joins on.
    UnischemaField("image_id", np.int64, (), ScalarCodec(T.LongType()), False),
    # Baseline JPEG, 8-bit RGB, shorter side at most the configured size.
    UnischemaField("image", np.bytes_, (), _IMAGE, False),
    # Pixel size of the stored JPEG (after preparation), not of the downloaded original.
    UnischemaField("height", np.int32, (), ScalarCodec(T.IntegerType()), False),
    UnischemaField("width", np.int32, (), ScalarCodec(T.IntegerType()), False),
    # Sorted class indices into the 11,166-class dictionary (ancestor closure applied).
    UnischemaField("classes", np.int32, (None,), _CLASSES, False),
    # Confidence in (0, 1] of each entry of ``classes``, same order and length.
    UnischemaField("confidences", np.float32, (None,), _CONFIDENCES, False),
    # ``imagenet`` or ``openimages``.
    UnischemaField("source", np.str_, (), ScalarCodec(T.StringType()), False),
    # ``train`` or ``val``: from the annotation file the image came from.
    UnischemaField("split", np.str_, (), ScalarCodec(T.StringType()), False),
])

FIELD_NAMES = tuple(MLImagesSchema.fields)


def spark_schema() -> T.StructType:
    """The Spark schema of a dataset row, for building the DataFrame that is written."""
    return MLImagesSchema.as_spark_schema()


def as_row(record: dict) -> tuple:
    """One dataset row as a tuple in schema order, with plain Python values for Spark."""
    return (
        int(record["image_id"]), bytes(record["image"]),
        int(record["height"]), int(record["width"]),
        [int(c) for c in record["classes"]], [float(c) for c in record["confidences"]],
        str(record["source"]), str(record["split"]),
    )

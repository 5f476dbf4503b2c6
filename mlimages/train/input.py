"""Training input: the Petastorm dataset through ``make_batch_reader``, sharded by Horovod rank,
decoded and augmented in ``tf.data`` (upstream image_preprocessing.py), labels made dense.

The seam the trainer uses is :func:`open_dataset` (a context manager yielding a
``tf.data.Dataset`` of ``(images, labels)`` batches plus the reader to stop). Rows come from the
dataset job's schema (mlimages/schema.py): ``image`` encoded JPEG bytes, ``classes`` and
``confidences`` variable-length lists (sparse labels), ``split``.

Every rank must run the same number of steps: shards are uneven (Petastorm shards by row group),
so a training epoch is a fixed number of batches computed from the *global* row count, and each
rank's reader repeats its shard (``num_epochs=None``) until the epoch's batches are taken.
"""
import contextlib
import logging
import math

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import tensorflow as tf

from mlimages.reader import dense_labels, open_reader
from mlimages.runtime import UserError
from mlimages.train.config import AugmentConfig, DataConfig

log = logging.getLogger(__name__)

FIELDS = ("image_id", "image", "classes", "confidences")
BRIGHTNESS = 32.0 / 255.0
HUE = 0.2
CONTRAST = (0.5, 1.5)
SATURATION = (0.5, 1.5)


def _arrow_dataset(url: str):
    if "://" in url and not url.startswith("file://"):
        filesystem, path = pafs.FileSystem.from_uri(url)
    else:
        filesystem, path = pafs.LocalFileSystem(), url.removeprefix("file://")
    return pads.dataset(path, filesystem=filesystem, format="parquet")


def count_rows(url: str, split: str = "") -> int:
    """Rows of the dataset at ``url`` (of one split when given), from Parquet metadata/columns."""
    try:
        dataset = _arrow_dataset(url)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"cannot open dataset {url}: {err}") from None
    if split and "split" in dataset.schema.names:
        return dataset.count_rows(filter=pads.field("split") == split)
    return dataset.count_rows()


def steps_per_epoch(rows: int, batch_size: int, ranks: int) -> int:
    """Batches per rank per epoch: the global rows over the global batch (at least 1)."""
    return max(1, rows // (batch_size * ranks))


def shard_rows(url: str, rank: int, ranks: int, split: str = "") -> int:
    """Rows of one rank's shard, read from one small column (one pass, no images)."""
    try:
        with open_reader(_dataset_url(url), ["image_id"], split=split, shard=rank,
                         num_shards=ranks, workers_count=0) as reader:
            return int(sum(len(batch.image_id) for batch in reader))
    except Exception as err:  # petastorm raises several types for a bad or too small dataset
        raise UserError(f"cannot read {url} as shard {rank}/{ranks}: {err}") from None


def _dataset_url(url: str) -> str:
    return url if "://" in url else "file://" + url


@contextlib.contextmanager
def petastorm_rows(url: str, rank: int, ranks: int, config: DataConfig, split: str,
                   seed: int, repeat: bool):
    """A dataset of single rows (dicts of FIELDS) from this rank's shard; stops the reader."""
    from petastorm.tf_utils import make_petastorm_dataset

    # Horovod: each rank reads the row groups of its own shard.
    try:
        reader = open_reader(
            _dataset_url(url), FIELDS, max_labels=config.max_labels, split=split, shard=rank,
            num_shards=ranks, num_epochs=None if repeat else 1, shuffle=repeat, seed=seed,
            workers_count=config.reader_workers)
    except Exception as err:  # petastorm raises several types for a bad or empty shard
        raise UserError(f"cannot read {url} as shard {rank}/{ranks}: {err}") from None
    try:
        batches = make_petastorm_dataset(reader).prefetch(2)
        yield batches.map(lambda b: {name: getattr(b, name) for name in FIELDS}).unbatch()
    finally:
        reader.stop()
        reader.join()


def top_label(classes, confidences):
    """The single label of a row for fine-tuning: its most confident class (-1 when none)."""
    masked = tf.where(classes >= 0, confidences, -1.0)
    return tf.cast(tf.gather(classes, tf.argmax(masked)), tf.int64)


def _rotate(image, degrees: float):
    """Random rotation in [-degrees, degrees], nearest neighbour, black fill (upstream)."""
    angle = tf.random.uniform([], -degrees, degrees) * math.pi / 180.0
    shape = tf.cast(tf.shape(image), tf.float32)
    h, w = shape[0], shape[1]
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    transform = tf.stack([cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0])
    rotated = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")
    return rotated[0]


def _colour_a(image):
    image = tf.image.random_brightness(image, BRIGHTNESS)
    image = tf.image.random_saturation(image, *SATURATION)
    image = tf.image.random_hue(image, HUE)
    return tf.image.random_contrast(image, *CONTRAST)


def _colour_b(image):
    image = tf.image.random_brightness(image, BRIGHTNESS)
    image = tf.image.random_contrast(image, *CONTRAST)
    image = tf.image.random_saturation(image, *SATURATION)
    return tf.image.random_hue(image, HUE)


def train_image(jpeg, size: int, augment: AugmentConfig):
    """Upstream training preprocessing: distorted crop, resize, flip, one of three branches
    (rotate + colour order A, colour order B, none), clip, scale to [-1, 1]."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=augment.min_object_covered,
        aspect_ratio_range=list(augment.aspect_ratio_range),
        area_range=list(augment.area_range), max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    # Decoding only the crop window is much cheaper than decoding the whole JPEG.
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), [size, size])
    if augment.flip:
        image = tf.image.random_flip_left_right(image)
    if augment.rotate or augment.color:
        rotate = (lambda x: _rotate(x, augment.rotate_degrees)) if augment.rotate else tf.identity
        first = (lambda: _colour_a(rotate(image))) if augment.color else (lambda: rotate(image))
        second = (lambda: _colour_b(image)) if augment.color else (lambda: image)
        branch = tf.random.uniform([], 0, 3, tf.int32)
        image = tf.switch_case(branch, [first, second, lambda: image])
    image = tf.clip_by_value(image, 0.0, 1.0)
    image.set_shape([size, size, 3])
    return (image - 0.5) * 2.0


def eval_image(jpeg, size: int):
    """Upstream evaluation preprocessing: central crop of 80 %, bilinear resize, [-1, 1]."""
    image = tf.image.convert_image_dtype(tf.io.decode_jpeg(jpeg, channels=3), tf.float32)
    image = tf.image.resize(tf.image.central_crop(image, 0.8), [size, size])
    image.set_shape([size, size, 3])
    return (image - 0.5) * 2.0


def _parser(config: DataConfig, size: int, num_classes: int, training: bool, single_label: bool):
    def parse(row):
        image = (train_image(row["image"], size, config.augment) if training
                 else eval_image(row["image"], size))
        if single_label:
            label = top_label(row["classes"], row["confidences"])
        else:
            label = dense_labels(row["classes"], row["confidences"], num_classes, soft=True)
        return image, label
    return parse


@contextlib.contextmanager
def open_dataset(url: str, rank: int, ranks: int, config: DataConfig, *, num_classes: int,
                 training: bool, seed: int = 0, size: int = 0, single_label: bool = False,
                 split: str = ""):
    """Batches ``(images [B,S,S,3] in [-1,1], labels)`` of this rank's shard.

    Training: shuffled, repeated forever (the caller takes a fixed number of batches per epoch)
    and only full batches. Evaluation: one pass, last batch may be short. Labels are dense
    [B, num_classes] float32 (multi-label) or int64 [B] (``single_label``).
    """
    size = size or config.image_size
    with petastorm_rows(url, rank, ranks, config, split, seed, repeat=training) as rows:
        data = rows
        if single_label:
            data = data.filter(lambda row: tf.reduce_any(row["classes"] >= 0))
        if training:
            data = data.shuffle(config.shuffle_buffer, seed=seed)
        data = data.map(_parser(config, size, num_classes, training, single_label),
                        num_parallel_calls=config.map_parallelism)
        data = data.batch(config.batch_size, drop_remainder=training)
        yield data.prefetch(2)

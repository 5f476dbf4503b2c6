"""Reading the dataset into TensorFlow: petastorm ``make_batch_reader`` -> ``tf.data.Dataset``.

:func:`make_tf_dataset` is the one entry point: a context manager yielding batches of
``(images, labels)``: images float32 ``[batch, size, size, 3]`` scaled to [-1, 1], labels
float32 ``[batch, num_classes]``, multi-hot (1.0 for each listed class) or soft (the stored
confidences). Training batches get the upstream augmentation's crop and flip; evaluation
batches a central crop. Sharding is by row group (petastorm), so shards are uneven: a Horovod
trainer must fix its steps per epoch from the global row count, not from its own shard.

Importing this module also works around a petastorm 0.13.1 race (see
:func:`patch_petastorm_thread_pool`) that makes a thread-pool reader sometimes return no rows.
"""
import contextlib
import logging

import numpy as np

log = logging.getLogger(__name__)

# The upstream training crop (image_preprocessing.py): whole image as the box.
MIN_OBJECT_COVERED = 0.7
AREA_RANGE = (0.7, 1.0)
ASPECT_RATIO_RANGE = (0.75, 1.33)
MAX_ATTEMPTS = 100
EVAL_CENTRAL_FRACTION = 0.8
DEFAULT_MAX_LABELS = 256
PAD_CLASS = -1


def patch_petastorm_thread_pool() -> None:
    """Makes petastorm's thread-pool readers stop only after the ventilator has finished.

    petastorm 0.13.1 ``ThreadPool.get_results`` first checks that every worker has processed
    what it was given, then that the ventilator has finished. When the check runs before the
    ventilator thread has handed out anything, both look true in turn and the reader ends
    with no rows (seen here in about a third of one-epoch reads). Asking the ventilator first
    closes the gap: once it is finished, every item is already counted in the workers' tallies.
    """
    import petastorm.reader
    from petastorm.workers_pool.thread_pool import ThreadPool

    if getattr(petastorm.reader.ThreadPool, "_mlimages_fixed", False):
        return

    class VentilatorFirstThreadPool(ThreadPool):
        _mlimages_fixed = True

        def all_workers_done(self):
            finished = self._ventilator is None or self._ventilator.completed()
            return finished and super().all_workers_done()

    petastorm.reader.ThreadPool = VentilatorFirstThreadPool


patch_petastorm_thread_pool()


def pad_labels(max_labels: int):
    """A petastorm TransformSpec function padding ``classes``/``confidences`` to ``max_labels``.

    ``make_batch_reader`` cannot hand variable-length lists to TensorFlow; padding with class
    -1 (confidence 0) keeps the Parquet lists plain. An image with more labels is an error,
    never silently truncated.
    """
    def transform(frame):
        frame["classes"] = [_pad(c, max_labels, np.int32, PAD_CLASS) for c in frame["classes"]]
        frame["confidences"] = [_pad(c, max_labels, np.float32, 0.0)
                                for c in frame["confidences"]]
        return frame
    return transform


def _pad(values, length: int, dtype, fill):
    values = np.asarray(values, dtype=dtype)
    if len(values) > length:
        raise ValueError(f"an image has {len(values)} labels, more than max_labels={length}")
    return np.pad(values, (0, length - len(values)), constant_values=fill)


def dense_labels(classes, confidences, num_classes: int, soft: bool):
    """Padded sparse labels of one image -> a ``[num_classes]`` float32 vector."""
    import tensorflow as tf

    keep = classes >= 0
    indices = tf.expand_dims(tf.boolean_mask(classes, keep), 1)
    values = tf.boolean_mask(confidences, keep) if soft else tf.ones_like(
        tf.boolean_mask(confidences, keep))
    return tf.scatter_nd(indices, values, [num_classes])


def train_image(jpeg, image_size: int):
    """Upstream training crop (area 0.7-1, aspect 3:4-4:3) decoded in one step, then flip."""
    import tensorflow as tf

    shape = tf.image.extract_jpeg_shape(jpeg)
    whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=whole, min_object_covered=MIN_OBJECT_COVERED,
        aspect_ratio_range=ASPECT_RATIO_RANGE, area_range=AREA_RANGE,
        max_attempts=MAX_ATTEMPTS, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.io.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size])  # bilinear, float32
    image = tf.image.random_flip_left_right(image)
    return _scale(image)


def eval_image(jpeg, image_size: int):
    """Upstream evaluation path: central 80 % crop, resized."""
    import tensorflow as tf

    image = tf.io.decode_jpeg(jpeg, channels=3)
    image = tf.image.central_crop(image, EVAL_CENTRAL_FRACTION)
    return _scale(tf.image.resize(image, [image_size, image_size]))


def _scale(image):
    """[0, 255] floats -> [-1, 1], as upstream ((x/255 - 0.5) * 2)."""
    return image * (2.0 / 255.0) - 1.0


@contextlib.contextmanager
def make_tf_dataset(dataset_url: str, batch_size: int, num_classes: int,
                    image_size: int = 224, training: bool = True, shard: int = None,
                    num_shards: int = None, soft_labels: bool = False,
                    max_labels: int = DEFAULT_MAX_LABELS, num_epochs: int = None,
                    shuffle_buffer: int = 2048, workers_count: int = 4, seed: int = None,
                    parallel_calls: int = None, with_ids: bool = False):
    """Yields a ``tf.data.Dataset`` of ``(images, labels)`` batches (``(ids, images, labels)``
    with ``with_ids``) read from the Petastorm dataset of one split at ``dataset_url``.

    ``shard``/``num_shards``: Horovod rank and size (row groups are dealt out). ``num_epochs``:
    None repeats forever when ``training``; evaluation defaults to one pass, unshuffled, with
    a final partial batch. The reader stops when the ``with`` block ends.
    """
    import tensorflow as tf
    from petastorm import make_batch_reader
    from petastorm.tf_utils import make_petastorm_dataset
    from petastorm.transform import TransformSpec

    if num_epochs is None and not training:
        num_epochs = 1
    spec = TransformSpec(pad_labels(max_labels), edit_fields=[
        ("classes", np.int32, (max_labels,), False),
        ("confidences", np.float32, (max_labels,), False)])
    fields = ["image_id", "image", "classes", "confidences"]
    with make_batch_reader(
            dataset_url, schema_fields=fields, transform_spec=spec, num_epochs=num_epochs,
            shuffle_row_groups=training, shuffle_rows=training, seed=seed,
            cur_shard=shard, shard_count=num_shards, workers_count=workers_count) as reader:
        calls = parallel_calls or tf.data.AUTOTUNE

        def prepare(row):
            jpeg = row.image
            image = train_image(jpeg, image_size) if training else eval_image(jpeg, image_size)
            labels = dense_labels(row.classes, row.confidences, num_classes, soft_labels)
            return (row.image_id, image, labels) if with_ids else (image, labels)

        rows = make_petastorm_dataset(reader).unbatch()
        if training:
            rows = rows.shuffle(shuffle_buffer, seed=seed)
        batches = (rows.map(prepare, num_parallel_calls=calls)
                   .batch(batch_size, drop_remainder=training)
                   .prefetch(tf.data.AUTOTUNE))
        yield batches

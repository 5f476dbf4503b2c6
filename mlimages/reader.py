"""Reading the dataset into TensorFlow: a petastorm batch reader -> ``tf.data.Dataset``.

:func:`open_reader` gives the petastorm ``Reader`` (what ``make_batch_reader`` builds, with a
worker that pads the label lists in Arrow). :func:`make_tf_dataset` is the entry point for
training code: a context manager yielding batches of
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
import re

import numpy as np
import petastorm.reader
import pyarrow as pa
import pyarrow.compute as pc
from petastorm.arrow_reader_worker import ArrowReaderWorker, convert_arrow_table_to_numpy_dict

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


LABEL_PADDING = {"classes": (np.int32, PAD_CLASS), "confidences": (np.float32, 0.0)}
AUTO = -1
REMOTE_READER_THREADS = 4


def padded(lists, max_labels: int, dtype, fill) -> np.ndarray:
    """An Arrow list column -> ``[rows, max_labels]`` array padded with ``fill``.

    More labels than ``max_labels`` is an error, never a silent truncation.
    """
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy()
    longest = int(lengths.max()) if len(lengths) else 0
    if longest > max_labels:
        raise ValueError(f"an image has {longest} labels, more than max_labels={max_labels}")
    out = np.full((len(lengths), max_labels), fill, dtype)
    out[np.arange(max_labels) < lengths[:, None]] = pc.list_flatten(lists).to_numpy(
        zero_copy_only=False)
    return out


class PaddedLabelsWorker(ArrowReaderWorker):
    """Petastorm's batch worker, reading a row group straight from Arrow into numpy.

    ``make_batch_reader`` needs equal-length lists, and its ``TransformSpec`` route converts
    every row group to pandas and back, copying each image twice more. This worker pads the
    label lists from the Arrow buffers instead, and can keep only the rows of one split.
    Subclassed per reader by :func:`open_reader` (``max_labels``, ``split``).
    """
    max_labels = DEFAULT_MAX_LABELS
    split = ""

    def _load_rows(self, pq_file, piece, shuffle_row_drop_range):
        names = list(self._schema.fields)
        split = self.split if "split" in pq_file.schema_arrow.names else ""  # as count_rows
        extra = ["split"] if split and "split" not in names else []
        table = pq_file.read_row_group(piece.row_group, columns=names + extra, use_threads=False)
        if split:
            table = table.filter(pc.equal(table["split"], split)).drop(extra)
        if table.num_rows == 0:
            return {}  # nothing is published for this row group
        lists = [name for name in names if name in LABEL_PADDING]
        rows = convert_arrow_table_to_numpy_dict(table.drop(lists), self._schema)
        for name in lists:
            dtype, fill = LABEL_PADDING[name]
            rows[name] = padded(table[name], self.max_labels, dtype, fill)
        if self._shuffle_rows:  # in numpy: images move as pointers, not as bytes
            order = self._rng.permutation(table.num_rows)
            rows = {name: column[order] for name, column in rows.items()}
        return rows


def reader_threads(dataset_url: str, workers_count: int) -> int:
    """``AUTO``: 0 (read on the caller's thread) for local files, threads for object stores,
    where a row group's latency must overlap with decoding."""
    if workers_count != AUTO:
        return workers_count
    return 0 if dataset_url.startswith(("file://", "/")) else REMOTE_READER_THREADS


def open_reader(dataset_url: str, fields, *, max_labels: int = DEFAULT_MAX_LABELS,
                split: str = "", shard: int = None, num_shards: int = None,
                num_epochs: int = 1, shuffle: bool = False, seed: int = None,
                workers_count: int = AUTO):
    """A petastorm batch ``Reader`` of ``fields`` with ``classes``/``confidences`` padded to
    ``max_labels`` (class -1, confidence 0), ready for ``make_petastorm_dataset``.

    ``split``: keep only rows of that split. ``shuffle``: row groups and the rows inside each.
    ``workers_count``: reader threads; 0 reads on the consuming thread.
    """
    from petastorm.cache import NullCache
    from petastorm.fs_utils import get_filesystem_and_path_or_paths
    from petastorm.reader import Reader, normalize_dataset_url_or_urls
    from petastorm.transform import TransformSpec
    from petastorm.workers_pool.dummy_pool import DummyPool

    url = normalize_dataset_url_or_urls(dataset_url)
    filesystem, path = get_filesystem_and_path_or_paths(url)
    threads = reader_threads(url, workers_count)
    # The worker shuffles rows itself: a pool told to shuffle polls its queues without blocking.
    pool = petastorm.reader.ThreadPool(threads, shuffle_rows=False) if threads else DummyPool()
    worker = type("PaddedLabelsWorker", (PaddedLabelsWorker,),
                  {"max_labels": max_labels, "split": split})
    spec = TransformSpec(edit_fields=[
        (name, dtype, (max_labels,), False) for name, (dtype, _) in LABEL_PADDING.items()
        if name in fields])
    # Field names are whole-name patterns; petastorm warns that it once matched prefixes.
    exact = [f"^{re.escape(name)}$" for name in fields]
    return Reader(filesystem, path, schema_fields=exact, worker_class=worker,
                  reader_pool=pool, seed=seed, shuffle_rows=shuffle, shuffle_row_groups=shuffle,
                  num_epochs=num_epochs, cur_shard=shard, shard_count=num_shards,
                  cache=NullCache(), transform_spec=spec, is_batched_reader=True)


def dense_labels(classes, confidences, num_classes: int, soft: bool):
    """Padded sparse labels of one image -> a ``[num_classes]`` float32 vector."""
    import tensorflow as tf

    keep = classes >= 0
    indices = tf.expand_dims(tf.boolean_mask(classes, keep), 1)
    values = tf.boolean_mask(confidences, keep) if soft else tf.ones_like(
        tf.boolean_mask(confidences, keep))
    return tf.scatter_nd(indices, values, [num_classes])


def dense_label_batch(classes, confidences, num_classes: int):
    """Padded sparse labels of a batch ``[B, L]`` -> ``[B, num_classes]`` float32, in one
    scatter (``confidences`` None: multi-hot)."""
    import tensorflow as tf

    slots = tf.where(classes >= 0)
    indices = tf.stack([slots[:, 0], tf.cast(tf.gather_nd(classes, slots), tf.int64)], 1)
    values = (tf.ones([tf.shape(slots)[0]], tf.float32) if confidences is None
              else tf.gather_nd(confidences, slots))
    return tf.scatter_nd(indices, values, tf.stack([tf.shape(classes, tf.int64)[0], num_classes]))


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
                    shuffle_buffer: int = 2048, workers_count: int = AUTO, seed: int = None,
                    parallel_calls: int = None, with_ids: bool = False):
    """Yields a ``tf.data.Dataset`` of ``(images, labels)`` batches (``(ids, images, labels)``
    with ``with_ids``) read from the Petastorm dataset of one split at ``dataset_url``.

    ``shard``/``num_shards``: Horovod rank and size (row groups are dealt out). ``num_epochs``:
    None repeats forever when ``training``; evaluation defaults to one pass, unshuffled, with
    a final partial batch. The reader stops when the ``with`` block ends.
    """
    import tensorflow as tf
    from petastorm.tf_utils import make_petastorm_dataset

    if num_epochs is None and not training:
        num_epochs = 1
    fields = (["image_id"] if with_ids else []) + ["image", "classes"] + (
        ["confidences"] if soft_labels else [])
    with open_reader(dataset_url, fields, max_labels=max_labels, shard=shard,
                     num_shards=num_shards, num_epochs=num_epochs, shuffle=training, seed=seed,
                     workers_count=workers_count) as reader:
        calls = parallel_calls or tf.data.AUTOTUNE

        def prepare(row):
            jpeg = row.image
            image = train_image(jpeg, image_size) if training else eval_image(jpeg, image_size)
            labels = (row.classes, row.confidences) if soft_labels else (row.classes,)
            return ((row.image_id,) if with_ids else ()) + (image,) + labels

        def labelled(*batch):
            sparse = batch[-2:] if soft_labels else (batch[-1], None)
            dense = dense_label_batch(*sparse, num_classes)
            return batch[:2] + (dense,) if with_ids else (batch[0], dense)

        # A prefetched row group keeps the reader's Python work off the decoders' path.
        rows = make_petastorm_dataset(reader).prefetch(2).unbatch()
        if training:
            rows = rows.shuffle(shuffle_buffer, seed=seed)
        batches = (rows.map(prepare, num_parallel_calls=calls)
                   .batch(batch_size, drop_remainder=training)
                   .map(labelled)
                   .prefetch(tf.data.AUTOTUNE))
        yield batches

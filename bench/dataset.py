"""Dataset stage speed: build images/s on local[2]; read images/s per core through Petastorm
into tf.data (decode + random crop 224 + flip) against the same images as upstream-style
TFRecords read with plain tf.data; raw JPEG decode rate of the same images as the ceiling.

    .venv/bin/python bench/dataset.py [--small] [--rounds 7]

Images are photo-like: crops of the 4 upstream sample photos at 500-1000 pixels. Each read
pass runs 10 epochs; after one untimed pass of each, the two kinds alternate for ``--rounds``
passes and the medians are reported (the ratio is the median of the per-round ratios).
Results go to bench/out/dataset.json.
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from mlimages import dataset, reader, sources, storage

NUM_CLASSES = 11166
BATCH = 32
# Each read pass is this many epochs: far more rows than the 2,048-row shuffle buffer, so
# the pass measures reading in steady state, not draining a buffer filled before the clock.
EPOCHS = 10
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def photos(count: int, seed: int = 0) -> list:
    """``count`` JPEGs cut from the sample photos at random scales, like downloaded originals."""
    rng = np.random.default_rng(seed)
    originals = [Image.open(sources.sample_file(p)).convert("RGB") for p in sources.SAMPLE_PHOTOS]
    out = []
    for i in range(count):
        image = originals[i % len(originals)]
        side = int(rng.integers(500, 1000))
        scale = side / min(image.size)
        resized = image.resize((max(side, round(image.width * scale)),
                                max(side, round(image.height * scale))))
        left = int(rng.integers(0, resized.width - side + 1))
        crop = resized.crop((left, 0, left + side, int(side * rng.uniform(0.75, 1.0))))
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=int(rng.integers(80, 95)))
        out.append(buffer.getvalue())
    return out


def write_inputs(spark, root: str, images: list) -> tuple:
    """labels/ and download/ tables plus the local object store, as the earlier stages write."""
    rng = np.random.default_rng(1)
    options = storage.StoreOptions(backend="local", root=os.path.join(root, "download/objects"))
    store = storage.open_store(options)
    labels, manifest = [], []
    for i, data in enumerate(images):
        sha = hashlib.sha256(data).hexdigest()
        key = store.key_for(sha, "jpg")
        store.put(key, data)
        classes = sorted(rng.choice(NUM_CLASSES, int(rng.integers(3, 15)), replace=False))
        labels.append((i, "train", "openimages", [int(c) for c in classes],
                       [1.0] * len(classes), len(classes)))
        manifest.append((i, f"http://127.0.0.1/{i}.jpg", "ok", 200, None, 1, len(data), sha,
                         "JPEG", 0, 0, key, None))
    storage.record_store(os.path.join(root, "download"), options)
    spark.createDataFrame(labels, "image_id long, split string, source string, "
                          "classes array<int>, confidences array<float>, tags_before int") \
        .write.parquet(os.path.join(root, "labels/image_labels"))
    spark.createDataFrame(manifest, "image_id long, url string, status string, "
                          "http_status int, error string, attempts int, bytes long, "
                          "sha256 string, format string, width int, height int, "
                          "object_key string, fetched_at timestamp") \
        .write.parquet(os.path.join(root, "download/manifest"))
    return os.path.join(root, "labels"), os.path.join(root, "download")


def write_tfrecords(url: str, folder: str, files: int) -> int:
    """The dataset's prepared images as upstream TFRecords (dense float32 label bytes)."""
    import pyarrow.parquet as pq
    import tensorflow as tf

    table = pq.read_table(url.removeprefix("file://"),
                          columns=["image", "classes", "width", "height"]).to_pylist()
    os.makedirs(folder, exist_ok=True)
    writers = [tf.io.TFRecordWriter(os.path.join(folder, f"{i}.tfrecords"))
               for i in range(files)]
    for i, row in enumerate(table):
        label = np.zeros(NUM_CLASSES, np.float32)
        label[row["classes"]] = 1.0
        feature = {
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["image"]])),
            "label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[label.tobytes()])),
            "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[row["width"]])),
            "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[row["height"]])),
        }
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        writers[i % files].write(example.SerializeToString())
    for writer in writers:
        writer.close()
    return len(table)


def rate(batches) -> tuple:
    """``(images per second, images per CPU second of this process)`` over ``batches``, after
    the first batch (warm-up: it waits for the shuffle buffer to fill)."""
    iterator = iter(batches)
    next(iterator)
    count, started, cpu = 0, time.perf_counter(), time.process_time()
    for images, _ in iterator:
        count += int(images.shape[0])
    return count / (time.perf_counter() - started), count / (time.process_time() - cpu)


def petastorm_rate(url: str) -> tuple:
    with reader.make_tf_dataset(url, BATCH, NUM_CLASSES, 224, training=True,
                                num_epochs=EPOCHS, seed=1) as batches:
        return rate(batches)


def tfrecord_rate(folder: str) -> tuple:
    """The upstream input pipeline shape: files -> records -> parse -> augment -> batch."""
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.string)}

    def parse(record):
        fields = tf.io.parse_single_example(record, spec)
        label = tf.reshape(tf.io.decode_raw(fields["label"], tf.float32), [NUM_CLASSES])
        return reader.train_image(fields["image"], 224), label

    files = tf.data.Dataset.list_files(os.path.join(folder, "*.tfrecords"), seed=1)
    batches = (files.interleave(tf.data.TFRecordDataset, num_parallel_calls=tf.data.AUTOTUNE)
               .repeat(EPOCHS).shuffle(2048, seed=1)
               .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    return rate(batches)


def decode_rate(url: str) -> float:
    """Ceiling: tf.io.decode_jpeg alone over the same JPEG bytes, already in memory."""
    import pyarrow.parquet as pq
    import tensorflow as tf

    jpegs = pq.read_table(url.removeprefix("file://"), columns=["image"]).column(0).to_pylist()
    decoded = tf.data.Dataset.from_tensor_slices(jpegs).map(
        lambda j: tf.io.decode_jpeg(j, channels=3), num_parallel_calls=tf.data.AUTOTUNE)
    started = time.perf_counter()
    for _ in decoded:
        pass
    return len(jpegs) / (time.perf_counter() - started)


def median_ratio(runs: dict, field: int) -> float:
    """Median over rounds of petastorm / TFRecord (each round ran both back to back)."""
    pairs = zip(runs["petastorm"], runs["tfrecord"], strict=True)
    return statistics.median(p[field] / t[field] for p, t in pairs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="120 images instead of 800")
    parser.add_argument("--rounds", type=int, default=7,
                        help="alternating read passes of each kind (the median counts)")
    args = parser.parse_args(argv)
    count = 120 if args.small else 800
    from mlimages.spark import build_session

    spark = build_session("bench-dataset", "local[2]", {
        "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"})
    root = tempfile.mkdtemp(prefix="bench-dataset-")
    try:
        images = photos(count)
        labels_dir, download_dir = write_inputs(spark, root, images)
        files = 8
        options = dataset.DatasetOptions(files=files, read_threads=4, splits=("train",))
        started = time.perf_counter()
        summary = dataset.run_dataset(spark, labels_dir, download_dir,
                                      os.path.join(root, "dataset"), options)
        build_seconds = time.perf_counter() - started
        spark.stop()
        url = summary["splits"]["train"]["url"]
        write_tfrecords(url, os.path.join(root, "tfrecords"), files)
        runs = {"petastorm": [], "tfrecord": []}
        # One untimed pass of each first: the first pass in a process pays one-off costs
        # (tracing, thread pools, page cache), which would count against whichever runs first.
        petastorm_rate(url)
        tfrecord_rate(os.path.join(root, "tfrecords"))
        for _ in range(args.rounds):  # alternating, so drifts in machine speed hit both
            runs["petastorm"].append(petastorm_rate(url))
            runs["tfrecord"].append(tfrecord_rate(os.path.join(root, "tfrecords")))
        ceiling = statistics.median(decode_rate(url) for _ in range(3))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = cores()
    result = {
        "images": count, "cores": n,
        "build_images_per_s": count / build_seconds, "build_seconds": build_seconds,
        **{f"{kind}_images_per_s_per_core": statistics.median(r[0] for r in rates) / n
           for kind, rates in runs.items()},
        **{f"{kind}_images_per_cpu_s": statistics.median(r[1] for r in rates)
           for kind, rates in runs.items()},
        "ratio_petastorm_vs_tfrecord": median_ratio(runs, 0),
        "ratio_per_cpu_s": median_ratio(runs, 1),
        "rounds_per_core": {kind: [round(r[0] / n, 1) for r in rates]
                            for kind, rates in runs.items()},
        "decode_ceiling_images_per_s_per_core": ceiling / n,
        "stored_mean_kib": summary["splits"]["train"]["bytes"] / count / 1024,
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "dataset.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"build (dataset job, local[2]): {result['build_images_per_s']:.1f} images/s "
          f"({count} images in {build_seconds:.1f} s)")
    print(f"read, per core ({n} cores), decode + random crop 224 + flip + dense labels "
          f"(median of {args.rounds} alternating rounds):")
    for kind, name in (("petastorm", "petastorm"), ("tfrecord", "TFRecord ")):
        print(f"  {name} -> tf.data : {result[kind + '_images_per_s_per_core']:.1f} images/s, "
              f"{result[kind + '_images_per_cpu_s']:.1f} per CPU second")
    print(f"  ratio petastorm / TFRecord: {result['ratio_petastorm_vs_tfrecord']:.3f} "
          f"(per CPU second: {result['ratio_per_cpu_s']:.3f}); baseline: TFRecord, the "
          f"upstream approach")
    print(f"  ceiling, tf.io.decode_jpeg only: "
          f"{result['decode_ceiling_images_per_s_per_core']:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

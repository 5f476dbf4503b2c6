"""Reader: Petastorm dataset -> tf.data batches with dense labels, crop, flip and sharding."""
import io

import numpy as np
import pytest
from PIL import Image

from mlimages import reader, schema

tf = pytest.importorskip("tensorflow")

NUM_CLASSES = 40
ROWS = 24


def jpeg(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def make_rows():
    rng = np.random.default_rng(3)
    rows = []
    for i in range(ROWS):
        count = int(rng.integers(1, 7))
        classes = sorted(rng.choice(NUM_CLASSES, count, replace=False).tolist())
        confidences = rng.choice([0.8, 0.9, 1.0], count).tolist()
        width, height = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        rows.append({"image_id": 1000 + i, "image": jpeg(width, height, i), "height": height,
                     "width": width, "classes": classes, "confidences": confidences,
                     "source": "openimages", "split": "train"})
    return rows


@pytest.fixture(scope="module")
def small_dataset(spark, tmp_path_factory):
    """A dataset written the way the dataset job writes it: 4 files, several row groups."""
    from petastorm.etl.dataset_metadata import materialize_dataset

    rows = make_rows()
    url = "file://" + str(tmp_path_factory.mktemp("reader") / "train")
    frame = spark.createDataFrame([schema.as_row(r) for r in rows], schema.spark_schema())
    with materialize_dataset(spark, url, schema.MLImagesSchema, 1):
        frame.repartitionByRange(4, "image_id").write.parquet(url)
    return url, {r["image_id"]: r for r in rows}


def read_all(url, **kwargs):
    out = {}
    with reader.make_tf_dataset(url, batch_size=5, num_classes=NUM_CLASSES, image_size=32,
                                training=False, with_ids=True, **kwargs) as batches:
        for ids, images, labels in batches:
            batch = zip(ids.numpy(), images.numpy(), labels.numpy(), strict=True)
            for image_id, image, label in batch:
                assert int(image_id) not in out
                out[int(image_id)] = (image, label)
    return out


def test_eval_pass_reads_every_row_once_with_dense_labels(small_dataset):
    url, rows = small_dataset
    seen = read_all(url)
    assert set(seen) == set(rows)
    for image_id, (image, label) in seen.items():
        assert image.shape == (32, 32, 3) and image.dtype == np.float32
        assert -1.0 <= image.min() and image.max() <= 1.0
        expected = np.zeros(NUM_CLASSES, np.float32)
        expected[rows[image_id]["classes"]] = 1.0
        np.testing.assert_array_equal(label, expected)


def test_soft_labels_carry_the_confidences(small_dataset):
    url, rows = small_dataset
    for image_id, (_, label) in read_all(url, soft_labels=True).items():
        expected = np.zeros(NUM_CLASSES, np.float32)
        expected[rows[image_id]["classes"]] = rows[image_id]["confidences"]
        np.testing.assert_allclose(label, expected, rtol=1e-6)


def test_shards_split_the_rows_between_ranks(small_dataset):
    url, rows = small_dataset
    first, second = read_all(url, shard=0, num_shards=2), read_all(url, shard=1, num_shards=2)
    assert not set(first) & set(second)
    assert set(first) | set(second) == set(rows)


def test_training_batches_are_full_cropped_and_repeat(small_dataset):
    url, _ = small_dataset
    with reader.make_tf_dataset(url, batch_size=8, num_classes=NUM_CLASSES, image_size=48,
                                training=True, seed=1) as batches:
        taken = list(batches.take(7))  # 56 images from 24 rows: the reader repeats
    for images, labels in taken:
        assert images.shape == (8, 48, 48, 3) and labels.shape == (8, NUM_CLASSES)
        assert float(tf.reduce_min(images)) >= -1.0 and float(tf.reduce_max(images)) <= 1.0
        assert np.all(labels.numpy().sum(axis=1) >= 1)


def test_train_crop_covers_at_least_the_upstream_area():
    data = jpeg(200, 100, 0)
    for seed in range(20):
        tf.random.set_seed(seed)
        image = reader.train_image(tf.constant(data), 64)
        assert image.shape == (64, 64, 3)


def test_label_lists_are_padded_from_arrow():
    import pyarrow as pa

    lists = pa.chunked_array([[[3, 1], None], [[], [7, 8, 9]]], pa.list_(pa.int32()))
    out = reader.padded(lists, 4, np.int32, -1)
    assert out.dtype == np.int32
    assert out.tolist() == [[3, 1, -1, -1], [-1] * 4, [-1] * 4, [7, 8, 9, -1]]


def test_too_many_labels_is_an_error_not_a_truncation():
    import pyarrow as pa

    with pytest.raises(ValueError, match="max_labels=3"):
        reader.padded(pa.array([[1, 2], [1, 2, 3, 4]]), 3, np.int32, -1)


@pytest.mark.parametrize("workers_count", [0, 2])
def test_reader_keeps_one_split_and_pads_labels(spark, tmp_path, workers_count):
    from petastorm.etl.dataset_metadata import materialize_dataset

    rows = make_rows()
    for i, row in enumerate(rows):
        row["split"] = "val" if i % 3 == 0 else "train"
    url = "file://" + str(tmp_path / "mixed")
    frame = spark.createDataFrame([schema.as_row(r) for r in rows], schema.spark_schema())
    with materialize_dataset(spark, url, schema.MLImagesSchema, 1):
        frame.repartitionByRange(3, "image_id").write.parquet(url)
    fields = ["image_id", "classes", "confidences"]
    got = {}
    with reader.open_reader(url, fields, max_labels=8, split="val",
                            workers_count=workers_count) as batches:
        for batch in batches:
            assert batch.classes.shape[1:] == (8,) and batch.confidences.dtype == np.float32
            columns = batch.image_id, batch.classes, batch.confidences
            for image_id, classes, confidences in zip(*columns, strict=True):
                got[int(image_id)] = (classes, confidences)
    wanted = {r["image_id"]: r for r in rows if r["split"] == "val"}
    assert set(got) == set(wanted)
    for image_id, (classes, confidences) in got.items():
        n = len(wanted[image_id]["classes"])
        assert classes[:n].tolist() == wanted[image_id]["classes"]
        assert (classes[n:] == reader.PAD_CLASS).all() and (confidences[n:] == 0).all()
        np.testing.assert_allclose(confidences[:n], wanted[image_id]["confidences"], rtol=1e-6)


def test_thread_pool_readers_never_end_early(small_dataset):
    """petastorm 0.13.1 alone returns no rows in about a third of these reads."""
    from petastorm import make_batch_reader

    url, rows = small_dataset
    for _ in range(25):
        with make_batch_reader(url, num_epochs=1, schema_fields=["image_id"]) as batches:
            assert sum(len(b.image_id) for b in batches) == len(rows)

"""TFRecord importer: shards written the upstream way (tfrecord.py features) with TensorFlow."""
import io

import numpy as np
import pytest
from PIL import Image

from mlimages import dataset, imageprep, tfrecords

tf = pytest.importorskip("tensorflow")

NUM_CLASSES = 30


def encoded(fmt, size=(120, 90), colour=(200, 40, 40)):
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, fmt)
    return out.getvalue()


def example(name, image, label):
    """The features upstream data/tfrecord.py writes (one-hot mode unless label is an int)."""
    def int64(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    def raw(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    label_feature = int64(label) if isinstance(label, int) else raw(label.tobytes())
    features = {"width": int64(120), "height": int64(90), "image": raw(image),
                "name": raw(name.encode()), "label": label_feature}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def dense(pairs):
    vector = np.zeros(NUM_CLASSES, np.float32)
    for index, confidence in pairs.items():
        vector[index] = confidence
    return vector


# name -> (image bytes, label, expected classes/confidences or the rejection reason)
RECORDS = {
    "a_0.jpg": (encoded("JPEG"), dense({3: 1.0, 7: 0.9}), {3: 1.0, 7: 0.9}),
    "b_1.png": (encoded("PNG"), dense({0: 0.8, 29: 1.0}), {0: 0.8, 29: 1.0}),
    "c_2.gif": (encoded("GIF"), dense({5: 1.0, 6: -1.0}), {5: 1.0}),
    "d_3.jpg": (encoded("JPEG", (900, 600)), 12, {12: 1.0}),  # integer (fine-tune) mode
    "e_4.jpg": (b"not an image", dense({1: 1.0}), imageprep.UNREADABLE),
    "f_5.jpg": (encoded("JPEG"), np.ones(NUM_CLASSES + 1, np.float32), tfrecords.BAD_LABEL),
    "g_6.jpg": (encoded("JPEG"), dense({}), tfrecords.BAD_LABEL),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfrecords")
    names = sorted(RECORDS)
    for shard, part in enumerate((names[:4], names[4:])):
        with tf.io.TFRecordWriter(str(folder / f"{shard}.tfrecords")) as writer:
            for name in part:
                image, label, _ = RECORDS[name]
                writer.write(example(name, image, label))
    return str(folder)


def test_frames_are_read_like_tensorflow_reads_them(shards):
    ours = list(tfrecords.read_records(f"{shards}/0.tfrecords"))
    theirs = [r.numpy() for r in tf.data.TFRecordDataset(f"{shards}/0.tfrecords")]
    assert ours == theirs and len(ours) == 4


def test_import_gives_the_dataset_layout(spark, shards, tmp_path):
    from petastorm import make_reader

    import mlimages.reader  # noqa: F401 - petastorm thread-pool fix

    output = str(tmp_path / "out")
    options = dataset.DatasetOptions(rows_per_file=2, read_threads=2)
    summary = tfrecords.import_tfrecords(spark, {"train": shards}, output, NUM_CLASSES, options)
    assert summary["shards"] == 2 and summary["records"] == len(RECORDS)
    assert summary["all_records_accounted"] is True
    ids = {r["name"]: r["id"] for r in spark.createDataFrame(
        [(n,) for n in RECORDS], "name string").selectExpr("name", "xxhash64(name) as id")
        .collect()}
    expected = {ids[n]: want for n, (_, _, want) in RECORDS.items() if isinstance(want, dict)}
    seen = {}
    with make_reader(summary["splits"]["train"]["url"], num_epochs=1) as rows:
        for row in rows:
            seen[int(row.image_id)] = row
            want = expected[int(row.image_id)]
            assert row.classes.tolist() == sorted(want)
            np.testing.assert_allclose(row.confidences, [want[c] for c in sorted(want)])
            pixels = tf.io.decode_jpeg(row.image).numpy()
            assert pixels.shape == (row.height, row.width, 3)
    assert set(seen) == set(expected)
    big = seen[ids["d_3.jpg"]]
    assert (big.height, big.width) == (384, 576)
    rejects = {r["image_id"]: r["reason"] for r in spark.read.parquet(f"{output}/rejects")
               .collect()}
    assert rejects == {ids[n]: want for n, (_, _, want) in RECORDS.items()
                       if isinstance(want, str)}

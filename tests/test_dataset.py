"""Dataset job on real Spark local[2] and real Petastorm, with inputs laid out like the labels
and download stages write them (tests/dataset_inputs.py)."""
import io
import json
import os
import subprocess
import sys

import dataset_inputs
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlimages import dataset, reader, runtime

assert reader.patch_petastorm_thread_pool  # imported for its petastorm fix (make_reader)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def options(**kwargs):
    base = {"rows_per_file": 3, "read_threads": 4}
    base.update(kwargs)
    return dataset.DatasetOptions(**base)


@pytest.fixture(scope="module")
def fixture_items(sample_photos):
    return dataset_inputs.items(sample_photos)


@pytest.fixture(scope="module")
def inputs(spark, tmp_path_factory, fixture_items, class_hierarchy):
    root = str(tmp_path_factory.mktemp("dataset_inputs"))
    return dataset_inputs.write_inputs(spark, root, fixture_items, class_hierarchy)


@pytest.fixture(scope="module")
def built(spark, inputs, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("dataset") / "out")
    summary = dataset.run_dataset(spark, inputs["labels"], inputs["download"], output, options())
    return output, summary


def test_images_are_read_from_s3(spark, fixture_items, class_hierarchy, tmp_path, built):
    """The same inputs with the objects in S3 (moto's server on 127.0.0.1) give the same
    dataset; credentials reach the executors through the store overrides, never _store.json."""
    import boto3
    from moto.server import ThreadedMotoServer

    from mlimages import storage

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        endpoint, secrets = f"http://{host}:{port}", {
            "access_key_id": "testing", "secret_access_key": "testing"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing"
                     ).create_bucket(Bucket="images")
        store = storage.StoreOptions(backend="s3", bucket="images", endpoint_url=endpoint,
                                     region="us-east-1", **secrets)
        paths = dataset_inputs.write_inputs(spark, str(tmp_path), fixture_items,
                                            class_hierarchy, store)
        assert "testing" not in open(f"{paths['download']}/_store.json").read()
        summary = dataset.run_dataset(spark, paths["labels"], paths["download"],
                                      str(tmp_path / "out"), options(store=secrets))
    finally:
        moto.stop()
    local = built[1]
    for key in ("joined", "images_written", "images_rejected", "rejected_by_reason"):
        assert summary[key] == local[key], key
    from_s3 = pq.read_table(str(tmp_path / "out" / "train"), columns=["image_id", "image"])
    from_local = pq.read_table(os.path.join(built[0], "train"), columns=["image_id", "image"])
    def by_id(table):
        return dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True))

    assert by_id(from_s3) == by_id(from_local)


def joined_items(fixture_items):
    return [i for i in fixture_items if i.labelled and i.manifest == "ok"]


def test_summary_accounts_for_every_joined_row(built, fixture_items):
    output, summary = built
    joined = joined_items(fixture_items)
    expected_reasons = {}
    for item in joined:
        if item.expect != "ok":
            expected_reasons[item.expect] = expected_reasons.get(item.expect, 0) + 1
    assert summary["joined"] == len(joined)
    assert summary["labelled_images"] == sum(i.labelled for i in fixture_items)
    assert summary["manifest_ok"] == sum(i.manifest == "ok" for i in fixture_items)
    assert summary["images_written"] == sum(i.expect == "ok" for i in joined)
    assert summary["rejected_by_reason"] == expected_reasons
    assert summary["sampled_out"] == 0
    assert summary["all_joined_rows_accounted"] is True
    assert runtime.read_summary(output) == json.loads(json.dumps(summary))


def test_splits_hold_prepared_images_with_their_labels(built, fixture_items):
    from petastorm import make_reader

    output, summary = built
    expected = {i.image_id: i for i in joined_items(fixture_items) if i.expect == "ok"}
    seen = {}
    for split in ("train", "val"):
        with make_reader(summary["splits"][split]["url"], num_epochs=1) as reader:
            for row in reader:
                seen[int(row.image_id)] = row
                item = expected[int(row.image_id)]
                assert row.split == split == item.split
                assert row.source == item.source
                assert row.classes.tolist() == item.classes
                np.testing.assert_allclose(row.confidences, item.confidences, rtol=1e-6)
                image = Image.open(io.BytesIO(row.image))
                assert (image.format, image.mode) == ("JPEG", "RGB")
                assert (image.height, image.width) == (row.height, row.width)
                assert min(row.height, row.width) <= 384
    assert set(seen) == set(expected)
    big = seen[dataset_inputs.Item("big.png", b"", "", [], []).image_id]
    assert (big.height, big.width) == (384, 691)  # 900x500 capped: 500 -> 384, never enlarged
    rotated = seen[dataset_inputs.Item("rotated.jpg", b"", "", [], []).image_id]
    assert (rotated.height, rotated.width) == (160, 100)  # EXIF orientation 6 applied


def test_file_count_and_row_groups_follow_the_options(built, fixture_items):
    output, summary = built
    for split in ("train", "val"):
        joined = [i for i in joined_items(fixture_items) if i.split == split]
        ok = sum(1 for i in joined if i.expect == "ok")
        # Files are planned from the joined rows (rows_per_file=3), before images are read;
        # a planned file whose images were all rejected is not written.
        assert summary["files_planned"][split] == -(-len(joined) // 3)
        facts = summary["splits"][split]
        assert facts["images"] == ok
        assert 1 <= facts["files"] <= summary["files_planned"][split]
        folder = facts["url"].removeprefix("file://")
        files = [f for f in os.listdir(folder) if f.endswith(".parquet")]
        assert len(files) == facts["files"]
        rows = [pq.ParquetFile(os.path.join(folder, f)).metadata.num_rows for f in files]
        assert sum(rows) == ok and min(rows) > 0
        assert codecs(folder) == {"UNCOMPRESSED"}  # the default: JPEG bytes do not compress


def codecs(folder: str) -> set:
    """Compression codecs of every column chunk in the Parquet files of ``folder``."""
    found = set()
    for name in os.listdir(folder):
        if name.endswith(".parquet"):
            meta = pq.ParquetFile(os.path.join(folder, name)).metadata
            found |= {meta.row_group(g).column(c).compression
                      for g in range(meta.num_row_groups) for c in range(meta.num_columns)}
    return found


def test_rejects_table_names_each_failed_image(spark, built, fixture_items):
    output, _ = built
    rejects = {r["image_id"]: r for r in spark.read.parquet(f"{output}/rejects").collect()}
    expected = {i.image_id: i for i in joined_items(fixture_items) if i.expect != "ok"}
    assert set(rejects) == set(expected)
    for image_id, row in rejects.items():
        assert row["reason"] == expected[image_id].expect
        assert row["split"] == expected[image_id].split
        assert row["detail"]


def test_lists_open_with_pandas_pyarrow_duckdb_and_spark(spark, built, fixture_items):
    import duckdb
    import pandas as pd

    output, summary = built
    folder = summary["splits"]["train"]["url"].removeprefix("file://")
    expected = {i.image_id: i.classes for i in fixture_items
                if i.split == "train" and i.expect == "ok" and i.manifest == "ok"}
    # pandas 3 refuses pyarrow < 13 in read_parquet; through pyarrow it opens fine.
    frame = pq.read_table(folder, columns=["image_id", "classes"]).to_pandas()
    assert isinstance(frame, pd.DataFrame)
    assert {r.image_id: list(r.classes) for r in frame.itertuples()} == expected
    table = pq.read_table(folder, columns=["image_id", "classes"]).to_pydict()
    assert dict(zip(table["image_id"], table["classes"], strict=True)) == expected
    rows = duckdb.sql(f"select image_id, classes from read_parquet('{folder}/*.parquet')")
    assert {r[0]: r[1] for r in rows.fetchall()} == expected
    sdf = spark.read.parquet(folder).select("image_id", "classes")
    assert {r[0]: r[1] for r in sdf.collect()} == expected


def test_trainable_filter_drops_rare_classes(spark, inputs, fixture_items, tmp_path):
    trainable = dataset_inputs.trainable_classes(fixture_items)
    assert 8 not in trainable  # the fixture is built so class 8 is rare
    output = str(tmp_path / "out")
    summary = dataset.run_dataset(spark, inputs["labels"], inputs["download"], output,
                                  options(class_filter="trainable", splits=["val"],
                                          compression="zstd"))
    rare = dataset_inputs.Item("rare.jpg", b"", "", [], []).image_id
    rejects = {r["image_id"]: r["reason"] for r in spark.read.parquet(f"{output}/rejects")
               .collect()}
    assert rejects[rare] == dataset.NO_CLASSES_LEFT
    written = spark.read.parquet(f"{output}/val").collect()
    for row in written:
        assert set(row["classes"]) <= trainable
    val_items = [i for i in joined_items(fixture_items) if i.split == "val"]
    assert summary["joined"] == len(val_items)
    assert summary["all_joined_rows_accounted"] is True
    assert codecs(f"{output}/val") == {"ZSTD"}


def test_sample_is_deterministic_and_near_the_fraction(spark):
    frame = spark.range(20000).withColumnRenamed("id", "image_id")
    first = dataset.sample(frame, 0.1, seed=7)
    ids = {r[0] for r in first.collect()}
    assert ids == {r[0] for r in dataset.sample(frame, 0.1, seed=7).collect()}
    assert 1800 < len(ids) < 2200
    assert ids != {r[0] for r in dataset.sample(frame, 0.1, seed=8).collect()}


def test_bad_options_are_user_errors():
    with pytest.raises(runtime.UserError):
        dataset.DatasetOptions(class_filter="rare")
    with pytest.raises(runtime.UserError):
        dataset.DatasetOptions(sample_fraction=0)
    with pytest.raises(runtime.UserError, match="compression"):
        dataset.DatasetOptions(compression="jpeg")


@pytest.mark.slow
def test_job_entry_point_with_a_profile(inputs, tmp_path, python_env):
    profile = tmp_path / "profile.yaml"
    profile.write_text("spark:\n  master: local[2]\n  conf:\n    spark.ui.enabled: false\n"
                       "dataset:\n  files: 1\n  sample_fraction: 0.5\n  read_threads: 2\n")
    output = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "jobs", "dataset.py"), "--profile", str(profile),
         "--labels", inputs["labels"], "--download", inputs["download"],
         "--output", str(output)], env=python_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = runtime.read_summary(str(output))
    assert summary["all_joined_rows_accounted"] is True
    assert summary["sampled_out"] > 0
    assert all(facts["files"] == 1 for facts in summary["splits"].values())
    missing = subprocess.run(
        [sys.executable, os.path.join(REPO, "jobs", "dataset.py"), "--profile", str(profile),
         "--labels", str(tmp_path / "nowhere"), "--download", inputs["download"],
         "--output", str(output)], env=python_env, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_explore_notebook_runs_end_to_end(built, inputs, fixture_items, monkeypatch):
    import nbclient
    import nbformat

    output, summary = built
    monkeypatch.setenv("MLIMAGES_DATASET", output)
    monkeypatch.setenv("MLIMAGES_LABELS", inputs["labels"])
    monkeypatch.setenv("MLIMAGES_CLASS", "1")
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    notebook = nbformat.read(os.path.join(REPO, "notebooks", "explore.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": REPO}}).execute()
    text = "\n".join(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", ""))
                     for cell in notebook.cells if cell.cell_type == "code"
                     for o in cell.get("outputs", []))
    images = sum(1 for cell in notebook.cells if cell.cell_type == "code"
                 for o in cell.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images == 2  # the class-count bars and the sample grid
    with_class_1 = sum(1 for i in joined_items(fixture_items) if i.expect == "ok"
                       and 1 in i.classes)
    assert "class 1 (" in text and f"): {with_class_1} images" in text
    assert f"{summary['splits']['train']['images']} rows in train" in text


def test_describe_reports_sizes_files_and_named_labels(built, inputs, class_hierarchy):
    output, summary = built
    text = dataset.describe(output, inputs["labels"], rows=2)
    train = summary["splits"]["train"]
    assert text.startswith(f"train: {train['images']} images, {train['files']} files, "
                           f"{train['row_groups']} row groups")
    assert class_hierarchy.name(1) in text or class_hierarchy.name(2) in text
    assert f"rejects: {summary['images_rejected']} (" in text

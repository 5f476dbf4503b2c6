"""The ingest, labels and download jobs through ``spark-submit`` on a real standalone cluster.

A master and two one-core workers run on 127.0.0.1 (``spark_standalone.py``). The jobs run on an
interpreter that cannot import ``mlimages`` by itself: the package reaches the driver and the
executors only as the ``--py-files`` zip, as on a real cluster. The profile is
``conf/cluster.yaml`` sized down to this machine. Each table must equal, row for row, what the
same library functions write in local mode.
"""
import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest
import yaml
from http_fixtures import ImageServer
from spark_standalone import ROOT, StandaloneCluster, build_zip, clean_python
from test_download_job import write_images

from mlimages import config, download, hierarchy, ingest, labels

pytestmark = pytest.mark.slow

# Lines with every kind of outcome, in a second file (val split) beside the upstream sample.
EXTRA_LINES = """https://127.0.0.1/dup.jpg\t1:0.9\t2:1
not-a-key\t3:1
https://127.0.0.1/dup.jpg\t3:1\t2:0.5
n01440764/n01440764_7.JPEG\t5:1\t99999:1\t6:abc

n01443537_3\thttp://127.0.0.1/x.jpg\t7:0.8
"""

# path on the image server (None: an ImageNet row without URL) -> expected status
DOWNLOAD_CASES = {
    "img/a.jpg": "ok", "img/a-copy.jpg": "ok", "img/b.png": "ok", "img/c.gif": "ok",
    "img/anim.gif": "ok", "img/d.webp": "ok", "img/photo0.jpg": "ok", "img/photo2.jpg": "ok",
    "redirect/x?hops=2": "ok", "status/404": "http_error", "status/410": "http_error",
    "truncated.jpg": "corrupt", "html.jpg": "not_an_image", "empty.jpg": "not_an_image",
    "bomb.png": "too_large", "loop/a": "too_many_redirects", "optout.jpg": "opted_out",
    "redirect/x?to=http://169.254.169.254/latest/meta-data/": "blocked", None: "no_source",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with StandaloneCluster(tmp_path_factory.mktemp("standalone"), workers=2, cores=1,
                           memory="1g") as running:
        yield running


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """(zip, clean interpreter): the interpreter imports mlimages only from the zip."""
    folder = tmp_path_factory.mktemp("shipped")
    python = clean_python(str(folder / "venv"))
    zip_path = build_zip(str(folder / "mlimages.zip"))
    # The working directory is on sys.path for ``-c``: run where no package lies.
    alone = subprocess.run([python, "-c", "import mlimages"], capture_output=True, text=True,
                           cwd=folder)
    assert "No module named 'mlimages'" in alone.stderr
    found = subprocess.run([python, "-c", "import mlimages; print(mlimages.__file__)"],
                           capture_output=True, text=True, check=True, cwd=folder,
                           env={**os.environ, "PYTHONPATH": zip_path})
    assert found.stdout.strip() == f"{zip_path}/mlimages/__init__.py"
    return zip_path, python


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    """conf/cluster.yaml sized for two one-core, 1 GiB workers; images in a local folder."""
    with open(os.path.join(config.CONF_DIR, "cluster.yaml")) as handle:
        profile = yaml.safe_load(handle)
    profile["spark"]["conf"].update({
        "spark.executor.memory": "512m", "spark.executor.memoryOverhead": "384m",
        "spark.executor.cores": 1,
        "spark.sql.shuffle.partitions": 4, "spark.default.parallelism": 4})
    profile["download"].update(threads=4, task_rows=4)
    profile["download"]["fetch"].update(
        allow_loopback=True, connect_timeout=2, read_timeout=2, deadline=5, backoff=0.01,
        backoff_max=0.05, retry_after_max=0.2, max_attempts=2)
    profile["store"] = {"backend": "local"}
    path = tmp_path_factory.mktemp("profile") / "cluster-test.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def submit(cluster, shipped, tmp_path, job: str, *args):
    zip_path, python = shipped
    log = tmp_path / f"{job}.log"
    # --master is given to the job too: mlimages.spark does not yet read the master that
    # spark-submit sets, and would fall back to local[2] (see docs/cluster.md).
    done = cluster.submit(os.path.join(ROOT, "jobs", f"{job}.py"),
                          [*args, "--master", cluster.url], zip_path, python, str(log))
    assert done.returncode == 0, log.read_text(errors="replace")[-6000:]
    return log.read_text(errors="replace")


def rows(path, key, drop=()):
    """A Parquet table as a list of dicts sorted by ``key`` columns."""
    table = pq.read_table(path)
    records = [{k: v for k, v in r.items() if k not in drop} for r in table.to_pylist()]
    return sorted(records, key=lambda r: tuple((r[k] is None, r[k]) for k in key))


def summary(folder):
    with open(os.path.join(folder, "_summary.json")) as handle:
        return json.load(handle)


def ran_on_both_workers(cluster, before: dict) -> None:
    new = {app: workers for app, workers in cluster.executor_dirs().items() if app not in before}
    assert len(new) == 1, new
    assert list(new.values()) == [[0, 1]], "the job did not get an executor on each worker"
    (app,) = new
    for index in (0, 1):
        executors = os.listdir(os.path.join(cluster.worker_dir(index), app))
        assert all(os.path.exists(os.path.join(cluster.worker_dir(index), app, e,
                                               "mlimages.zip")) for e in executors)


TABLES = {
    "ingest/images": ("image_id",), "ingest/labels": ("image_id", "class"),
    "ingest/quarantine": ("file", "line_number", "level", "term"),
    "labels/image_labels": ("image_id",), "labels/class_counts": ("class",),
}


def test_ingest_and_labels_on_cluster_equal_local(shipped, profile_path, cluster, spark,
                                                   hierarchy_path, sample_urls_path, tmp_path):
    extra = tmp_path / "val_extra.txt"
    extra.write_text(EXTRA_LINES)
    inputs = [sample_urls_path, str(extra)]
    on_cluster, local = tmp_path / "cluster", tmp_path / "local"

    before = cluster.executor_dirs()
    submit(cluster, shipped, tmp_path, "ingest", "--profile", profile_path,
           "--hierarchy", hierarchy_path, "--output", str(on_cluster / "ingest"), *inputs)
    ran_on_both_workers(cluster, before)
    before = cluster.executor_dirs()
    submit(cluster, shipped, tmp_path, "labels", "--profile", profile_path,
           "--hierarchy", hierarchy_path, "--ingest", str(on_cluster / "ingest"),
           "--output", str(on_cluster / "labels"))
    ran_on_both_workers(cluster, before)

    profile = config.load_profile(profile_path)
    classes = hierarchy.load_hierarchy(hierarchy_path)
    ingest.run_ingest(spark, inputs, len(classes), str(local / "ingest"),
                      config.section(profile, "ingest", ingest.IngestOptions))
    labels.run_labels(spark, str(local / "ingest"), hierarchy_path, str(local / "labels"),
                      config.section(profile, "labels", labels.LabelsOptions))

    for table, key in TABLES.items():
        expected = rows(local / table, key)
        assert expected, table
        assert rows(on_cluster / table, key) == expected, table
    for stage in ("ingest", "labels"):
        assert summary(on_cluster / stage) == summary(local / stage)
    counted = summary(on_cluster / "ingest")
    # 100 sample rows and 6 extra lines: 1 blank, 1 bad key, 1 duplicate merged.
    assert counted["lines_read"] == 106
    assert counted["images"] == 100 + 3 and counted["merged_duplicate_rows"] == 1
    assert counted["rows_quarantined"] == {"bad_key": 1}


def test_download_on_cluster_equals_local(shipped, profile_path, cluster, spark, sample_photos,
                                          tmp_path):
    with ImageServer(sample_photos) as server:
        images = tmp_path / "images"
        write_images(str(images), [(server.url(path), None) if path else (None, "n01440764_9")
                                   for path in DOWNLOAD_CASES])
        on_cluster, local = tmp_path / "cluster", tmp_path / "local"
        before = cluster.executor_dirs()
        submit(cluster, shipped, tmp_path, "download", "--profile", profile_path,
               "--images", str(images), "--output", str(on_cluster))
        ran_on_both_workers(cluster, before)
        options, store = download.options_from_profile(config.load_profile(profile_path),
                                                       str(local))
        download.run_download(spark, str(images), str(local), options, store)

    got = rows(on_cluster / "manifest", ("image_id",), drop=("fetched_at",))
    assert got == rows(local / "manifest", ("image_id",), drop=("fetched_at",))
    by_url = {row["url"]: row["status"] for row in got}
    assert by_url == {(server.url(p) if p else None): status
                      for p, status in DOWNLOAD_CASES.items()}
    stored = {os.path.relpath(os.path.join(d, f), on_cluster / "objects")
              for d, _, files in os.walk(on_cluster / "objects") for f in files}
    assert stored == {row["object_key"] for row in got if row["status"] == "ok"}
    for key in stored:
        assert ((on_cluster / "objects" / key).read_bytes()
                == (local / "objects" / key).read_bytes())
    counts = summary(on_cluster)
    assert counts["counts"] == summary(local)["counts"]
    assert counts["unaccounted"] == 0 and counts["rows_in"] == len(DOWNLOAD_CASES)

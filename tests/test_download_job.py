"""The download job on Spark local[2] against a loopback HTTP server: every row accounted for,
reruns fetch nothing new, --retry-failed refetches only failures, S3 through moto, stand-ins."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_fixtures import ImageServer
from test_download_fetch import moto_endpoint, s3_options  # noqa: F401 (fixture)

from mlimages import download, runtime, standin, storage

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("key", pa.string()), ("url", pa.string()),
    ("imagenet_id", pa.string()), ("source", pa.string()), ("split", pa.string()),
    ("file", pa.string()), ("line_number", pa.int64()), ("merged_rows", pa.int32())])

# path on the test server (or None) -> expected status
WEB_CASES = {
    "img/a.jpg": "ok", "img/a-copy.jpg": "ok", "img/b.png": "ok", "img/c.gif": "ok",
    "img/anim.gif": "ok", "img/d.webp": "ok", "img/webp-as.jpg": "ok", "img/png-as.jpg": "ok",
    "img/photo1.jpg": "ok", "img/photo3.jpg": "ok",
    "status/404": "http_error", "status/410": "http_error", "flaky/job?fail=1": "ok",
    "ratelimit/job?after=0": "ok", "truncated.jpg": "corrupt", "html.jpg": "not_an_image",
    "empty.jpg": "not_an_image", "bomb.png": "too_large", "loop/a": "too_many_redirects",
    "redirect/x?to=http://169.254.169.254/latest/meta-data/": "blocked",
    "optout.jpg": "opted_out", "status/404?X-Amz-Signature=s3cr3t": "http_error",
}


def write_images(path, rows) -> None:
    """rows: (url, imagenet_id); written with the ingest images/ schema."""
    records = []
    for number, (url, imagenet_id) in enumerate(rows, start=1):
        key = imagenet_id or url
        records.append({
            "image_id": int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big",
                                       signed=True),
            "key": key, "url": url, "imagenet_id": imagenet_id,
            "source": "imagenet" if imagenet_id else "openimages", "split": "train",
            "file": "train_urls.txt", "line_number": number, "merged_rows": 0})
    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=IMAGES_SCHEMA),
                   os.path.join(path, "part-0.parquet"))


def local_imagenet(folder, body: bytes) -> None:
    """A release with one folder-layout synset and one per-synset tar."""
    os.makedirs(folder / "n01440764")
    (folder / "n01440764" / "n01440764_1.JPEG").write_bytes(body)
    with tarfile.open(folder / "n01443537.tar", "w") as archive:
        info = tarfile.TarInfo("n01443537_2.JPEG")
        info.size = len(body)
        archive.addfile(info, io.BytesIO(body))


def job_options(**fetch_overrides) -> download.DownloadOptions:
    fetch = dict(allow_loopback=True, connect_timeout=2, read_timeout=2, deadline=5,
                 backoff=0.01, backoff_max=0.05, retry_after_max=0.2, max_attempts=2)
    fetch.update(fetch_overrides)
    return download.DownloadOptions(threads=4, task_rows=8, row_group_rows=5, fetch=fetch)


def manifest_rows(output) -> dict:
    table = pq.read_table(os.path.join(output, "manifest"))
    return {row["image_id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def server(sample_photos):
    with ImageServer(sample_photos) as running:
        yield running


def test_download_job_end_to_end(spark, server, tmp_path):
    web_rows = [(server.url(path), None) for path in WEB_CASES]
    imagenet_rows = [(server.url("status/404?local"), "n01440764_1"),
                     (None, "n01443537_2"), (None, "n09999999_3")]
    images = tmp_path / "ingest" / "images"
    write_images(images, web_rows + imagenet_rows)
    local_imagenet(tmp_path / "imagenet", server.images["photo3.jpg"][0])
    options = download.replace(job_options(), imagenet_dir=str(tmp_path / "imagenet"))
    output = str(tmp_path / "download")

    summary = download.run_download(spark, str(images), output, options)

    rows = manifest_rows(output)
    inputs = pq.read_table(images).to_pylist()
    assert sorted(rows) == sorted(r["image_id"] for r in inputs)  # one row per input row
    by_url = {r["url"]: rows[r["image_id"]] for r in inputs if r["url"]}
    for path, status in WEB_CASES.items():
        assert by_url[server.url(path)]["status"] == status, path
    secret = by_url[server.url("status/404?X-Amz-Signature=s3cr3t")]
    assert secret["url"] == server.url("status/404?X-Amz-Signature=REDACTED")
    by_key = {r["imagenet_id"]: rows[r["image_id"]] for r in inputs if r["imagenet_id"]}
    assert [by_key[k]["status"] for k in ("n01440764_1", "n01443537_2", "n09999999_3")] == \
        ["ok", "ok", "no_source"]
    assert by_key["n01440764_1"]["origin"] == "local_copy"
    assert server.count("/status/404") == 2  # the local copy was used, not the URL

    store = storage.open_run_store(output)
    for row in rows.values():
        if row["status"] == "ok":
            body = store.get(row["object_key"])
            assert hashlib.sha256(body).hexdigest() == row["sha256"]
            assert len(body) == row["bytes"]
    a, copy = by_url[server.url("img/a.jpg")], by_url[server.url("img/a-copy.jpg")]
    assert a["object_key"] == copy["object_key"]
    assert by_url[server.url("img/webp-as.jpg")]["format"] == "WEBP"
    assert by_url[server.url("img/webp-as.jpg")]["object_key"].endswith(".webp")
    assert by_url[server.url("img/anim.gif")]["animated"] is True
    assert by_url[server.url("flaky/job?fail=1")]["attempts"] == 2
    photo = by_url[server.url("img/photo1.jpg")]
    assert (photo["format"], photo["width"], photo["height"]) == ("JPEG",) + \
        server.images["photo1.jpg"][2][1:3]
    assert by_url[server.url("status/404")]["http_status"] == 404

    ok = sum(1 for s in WEB_CASES.values() if s == "ok") + 2
    assert summary["rows_in"] == summary["rows_out"] == len(inputs)
    assert summary["unaccounted"] == 0 and summary["ok"] == ok
    assert summary["this_run"]["attempted"] == len(inputs)
    # Bytes stored once: a-copy.jpg and flaky (a.jpg), ratelimit (b.png), photo3 twice local.
    assert summary["duplicate_content"] == 5
    assert runtime.read_summary(output)["counts"] == summary["counts"]
    stored = [f for _, _, files in os.walk(tmp_path / "download" / "objects") for f in files]
    assert len(stored) == summary["stored_objects"] and not any(".tmp" in f for f in stored)
    assert "s3cr3t" not in open(os.path.join(output, "_summary.json")).read()

    # Rerun: nothing new is fetched, the manifest is unchanged.
    hits = dict(server.hits)
    again = download.run_download(spark, str(images), output, options)
    assert dict(server.hits) == hits
    assert again["this_run"]["attempted"] == 0 and again["counts"] == summary["counts"]
    assert manifest_rows(output) == rows

    # --retry-failed: only the failures are fetched again.
    retried = download.run_download(spark, str(images), output, options, retry_failed=True)
    assert retried["this_run"]["attempted"] == len(inputs) - summary["ok"]
    assert server.count("/img/a.jpg") == hits["/img/a.jpg"]
    assert server.count("/status/410") == hits["/status/410"] + 1
    assert retried["counts"] == summary["counts"]
    assert len(manifest_rows(output)) == len(inputs)


def test_download_job_into_s3(spark, server, tmp_path, moto_endpoint):  # noqa: F811
    import boto3

    images = tmp_path / "images"
    write_images(images, [(server.url(p), None) for p in
                          ("img/a.jpg", "img/a-copy.jpg", "img/d.webp", "status/404")])
    store = s3_options(moto_endpoint, "job-bucket")
    summary = download.run_download(spark, str(images), str(tmp_path / "out"), job_options(),
                                    store)
    assert summary["counts"] == {"http_error": 1, "ok": 3}
    listed = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing"
                          ).list_objects_v2(Bucket="job-bucket")["Contents"]
    keys = sorted(obj["Key"] for obj in listed)
    assert len(keys) == 2 and all(k.startswith("imgs/") for k in keys)
    assert {k for k in (r["object_key"] for r in manifest_rows(str(tmp_path / "out")).values())
            if k} == set(keys)
    assert "testing" not in open(tmp_path / "out" / "_store.json").read()


def test_standins_for_unreachable_urls(spark, tmp_path, sample_photos):
    images = tmp_path / "images"
    urls = [f"https://farm{i}.staticflickr.com/1/{i}_o.jpg" for i in range(5)]
    write_images(images, [(u, None) for u in urls])
    output = str(tmp_path / "out")
    options = download.replace(job_options(allow_loopback=False), offline=True)

    summary = standin.run_with_standins(spark, str(images), output, options,
                                        photos=sample_photos)

    assert summary["web"]["counts"] == {"offline": 5}
    assert summary["counts"] == {"ok": 5} and summary["standins_used"] == 5
    assert "STAND-INS" in summary["note"]
    rows = manifest_rows(output).values()
    assert {r["origin"] for r in rows} == {"standin"}
    assert sorted(r["url"] for r in rows) == sorted(urls)  # the original URLs are kept
    assert all(r["error"].startswith("stand-in image; the web fetch failed: offline")
               for r in rows)
    photos = {hashlib.sha256(open(p, "rb").read()).hexdigest() for p in sample_photos}
    assert {r["sha256"] for r in rows} <= photos


def test_missing_columns_is_a_user_error(spark, tmp_path):
    path = str(tmp_path / "not-images")
    pq.write_table(pa.table({"image_id": [1]}), os.path.join(tmp_path, "x.parquet"))
    os.makedirs(path)
    os.rename(os.path.join(tmp_path, "x.parquet"), os.path.join(path, "x.parquet"))
    with pytest.raises(runtime.UserError, match="lacks column"):
        download.run_download(spark, path, str(tmp_path / "out"))


@pytest.mark.slow  # two JVM starts
def test_job_entry_point(tmp_path, server, python_env):
    """The spark-submit entry point, in its own process, with a profile allowing loopback."""
    images = tmp_path / "images"
    write_images(images, [(server.url("img/b.png"), None), (server.url("status/404"), None)])
    profile = tmp_path / "profile.yaml"
    profile.write_text("spark:\n  master: local[2]\n  conf:\n    spark.ui.enabled: false\n"
                       "download:\n  threads: 2\n  fetch:\n    allow_loopback: true\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, os.path.join(root, "jobs", "download.py"), "--profile", str(profile),
         "--images", str(images), "--output", str(tmp_path / "out")],
        env=python_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert runtime.read_summary(str(tmp_path / "out"))["counts"] == {"http_error": 1, "ok": 1}
    bad = subprocess.run(
        [sys.executable, os.path.join(root, "jobs", "download.py"), "--profile", str(profile),
         "--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out2")],
        env=python_env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_empty_input_gives_an_empty_manifest(spark, tmp_path):
    images = tmp_path / "images"
    write_images(images, [])
    summary = download.run_download(spark, str(images), str(tmp_path / "out"), job_options())
    assert (summary["rows_in"], summary["rows_out"], summary["unaccounted"]) == (0, 0, 0)
    assert pq.read_table(tmp_path / "out" / "manifest").num_rows == 0


def test_store_root_is_recorded_absolute(tmp_path, monkeypatch):
    """Later stages may run from another folder: a relative root must not follow them."""
    monkeypatch.chdir(tmp_path)
    options = storage.store_options({}, "runs/x/download/objects")
    storage.record_store("runs/x/download", options)
    monkeypatch.chdir("/")
    with open(tmp_path / "runs/x/download/_store.json", encoding="utf-8") as handle:
        recorded = json.load(handle)
    assert recorded["root"] == str(tmp_path / "runs/x/download/objects")
    store = storage.open_run_store(str(tmp_path / "runs/x/download"))
    key = store.key_for("ab" * 32, "jpg")
    store.put(key, b"bytes")
    assert (tmp_path / "runs/x/download/objects" / key).read_bytes() == b"bytes"


def test_zero_threads_on_the_command_line_is_a_user_error(spark, tmp_path, caplog):
    from mlimages_jobs import download as download_job

    code = download_job._main(["--threads", "0", "--images", str(tmp_path / "images"),
                               "--output", str(tmp_path / "out")])
    assert code == 2
    assert "download.threads 0: expected an integer >= 1" in caplog.text

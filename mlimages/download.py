"""Download stage: ingest ``images/`` -> images in object storage and ``manifest/``.

The rows are split into Spark tasks of ``task_rows``; each task fetches with a bounded thread
pool, streams results into its manifest part (a Parquet file committed by rename, so a killed
task leaves nothing), and holds at most ``2 * threads`` images in memory whatever its size.
``manifest/`` is then rebuilt from all committed parts, newest row per image, so it has exactly
one row per input row. A rerun skips rows that already have a row (``retry_failed``: every row
whose status is not ok).
"""
import concurrent.futures
import dataclasses
import datetime
import hashlib
import logging
import math
import os
import shutil
import tarfile
import threading
import time
import uuid
from collections import Counter

from mlimages import imagecheck, netguard, runtime, storage
from mlimages.fetch import FetchOptions, shared_fetcher

log = logging.getLogger(__name__)

STATUSES = ("ok", "http_error", "timeout", "dns_error", "connection_error", "too_large",
            "not_an_image", "corrupt", "blocked", "opted_out", "too_many_redirects",
            "no_source", "offline", "store_error", "internal_error")
ORIGINS = ("web", "local_copy", "standin")
MANIFEST_COLUMNS = (
    ("image_id", "int64"), ("url", "string"), ("status", "string"), ("http_status", "int32"),
    ("error", "string"), ("attempts", "int32"), ("bytes", "int64"), ("sha256", "string"),
    ("format", "string"), ("width", "int32"), ("height", "int32"), ("animated", "bool"),
    ("object_key", "string"), ("origin", "string"), ("fetched_at", "timestamp"))
IMAGE_COLUMNS = ("image_id", "url", "imagenet_id")
PARTS = "manifest_parts"
MANIFEST = "manifest"


@dataclasses.dataclass(frozen=True)
class DownloadOptions:
    """The ``download`` section of a profile; ``fetch`` holds the fetch options."""

    threads: int = 32  # fetch threads per Spark task
    task_rows: int = 20000  # input rows per Spark task
    max_pixels: int = 100_000_000  # decompression-bomb limit (width x height)
    row_group_rows: int = 2000  # manifest part row groups; bounds the writer's buffer
    imagenet_dir: str = None  # local ImageNet release: wnid/wnid_N.JPEG folders or wnid.tar
    fetch: FetchOptions = None

    def __post_init__(self):
        given = self.fetch
        if not isinstance(given, FetchOptions):
            given = dict(given or {})
            allowed = {f.name for f in dataclasses.fields(FetchOptions)}
            unknown = sorted(set(given) - allowed)
            if unknown:
                raise runtime.UserError(f"unknown download.fetch option(s) {unknown}; "
                                        f"allowed: {sorted(allowed)}")
            object.__setattr__(self, "fetch", FetchOptions(**given))
        for name in ("threads", "task_rows"):
            if getattr(self, name) < 1:
                raise runtime.UserError(
                    f"download.{name} {getattr(self, name)!r}: expected an integer >= 1")


def options_from_profile(profile: dict, output_path: str):
    """``(DownloadOptions, StoreOptions)`` from a profile's ``download`` and ``store`` sections."""
    from mlimages import config

    options = config.section(profile, "download", DownloadOptions)
    try:
        store = storage.store_options(profile.get("store"), _local(output_path) + "/objects")
    except ValueError as err:
        raise config.ConfigError(f"{profile.get('_path', 'profile')}: store: {err}") from None
    return options, store


def replace(options: DownloadOptions, **changes) -> DownloadOptions:
    """A copy of ``options`` with top-level or ``fetch`` fields changed (``fetch`` by name)."""
    fetch_names = {f.name for f in dataclasses.fields(FetchOptions)}
    fetch_changes = {k: changes.pop(k) for k in list(changes) if k in fetch_names}
    if fetch_changes:
        changes["fetch"] = dataclasses.replace(options.fetch, **fetch_changes)
    return dataclasses.replace(options, **changes)


def _local(path: str) -> str:
    return path.removeprefix("file://").rstrip("/")


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


class LocalImageNet:
    """Reads ImageNet originals from a local release instead of the (mostly dead) web.

    Two layouts: ``<dir>/<wnid>/<wnid>_<n>.JPEG``, or per-synset tars ``<dir>/<wnid>.tar``
    holding ``<wnid>_<n>.JPEG``. A tar's member index is built once per process and synset.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self._indexes = {}
        self._lock = threading.Lock()

    def read(self, imagenet_id: str):
        """The original's bytes, or None when the release does not hold it."""
        wnid = imagenet_id.split("_", 1)[0]
        path = os.path.join(self.folder, wnid, f"{imagenet_id}.JPEG")
        if os.path.exists(path):
            with open(path, "rb") as handle:
                return handle.read()
        index = self._tar_index(wnid)
        entry = index.get(f"{imagenet_id}.JPEG") if index else None
        if entry is None:
            return None
        with open(os.path.join(self.folder, f"{wnid}.tar"), "rb") as handle:
            handle.seek(entry[0])
            return handle.read(entry[1])

    def _tar_index(self, wnid: str):
        with self._lock:
            if wnid not in self._indexes:
                path = os.path.join(self.folder, f"{wnid}.tar")
                index = None
                if os.path.exists(path):
                    with tarfile.open(path) as archive:
                        index = {os.path.basename(m.name): (m.offset_data, m.size)
                                 for m in archive if m.isfile()}
                self._indexes[wnid] = index
            return self._indexes[wnid]


class PartWriter:
    """Streams manifest rows into one Parquet part, visible only after :meth:`commit`."""

    def __init__(self, parts_dir: str, run_id: str, partition: int, attempt: int,
                 row_group_rows: int):
        import pyarrow.fs

        self.fs, base = pyarrow.fs.FileSystem.from_uri(_fs_uri(parts_dir))
        folder = f"{base}/run={run_id}"
        self.fs.create_dir(folder, recursive=True)
        self.final = f"{folder}/part-{partition:05d}.parquet"
        self.local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)
        # Names starting with '.' are skipped by Spark and pyarrow readers.
        self.target = (f"{folder}/.part-{partition:05d}-{attempt}-{uuid.uuid4().hex[:8]}.tmp"
                       if self.local else self.final)
        self.rows, self.row_group_rows, self.writer = [], row_group_rows, None
        self.written = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.fs.open_output_stream(self.target),
                                           manifest_arrow_schema(), compression="zstd")
        table = pa.Table.from_pylist(self.rows, schema=manifest_arrow_schema())
        self.writer.write_table(table)
        self.written += len(self.rows)
        self.rows = []

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        if self.local:
            self.fs.move(self.target, self.final)  # a rename: atomic on one filesystem

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            finally:
                if self.local:
                    self.fs.delete_file(self.target)


def _fs_uri(path: str) -> str:
    if path.startswith("s3a://"):
        return "s3://" + path[len("s3a://"):]
    return path if "://" in path else os.path.abspath(path)


def manifest_arrow_schema():
    import pyarrow as pa

    types = {"int64": pa.int64(), "int32": pa.int32(), "string": pa.string(),
             "bool": pa.bool_(), "timestamp": pa.timestamp("us", tz="UTC")}
    return pa.schema([(name, types[kind]) for name, kind in MANIFEST_COLUMNS])


@dataclasses.dataclass(frozen=True)
class _Task:
    """What each Spark task needs; pickled to the executors."""

    options: DownloadOptions
    store: storage.StoreOptions
    parts_dir: str
    run_id: str

    def __call__(self, rows):
        from pyspark import TaskContext

        context = TaskContext.get()
        partition = context.partitionId() if context else 0
        attempt = context.attemptNumber() if context else 0
        writer = PartWriter(self.parts_dir, self.run_id, partition, attempt,
                            self.options.row_group_rows)
        try:
            stats = self.fetch_rows(rows, writer.add)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        yield stats

    def fetch_rows(self, rows, emit) -> dict:
        """Fetches every row with a bounded pool, calling ``emit`` with each manifest row."""
        threads = self.options.threads
        worker = _RowWorker(self.options, storage.open_store(self.store, threads))
        counts, size, started = Counter(), 0, time.time()

        def record(future):
            nonlocal size
            row = future.result()
            counts[row["status"]] += 1
            if row["status"] == "ok":
                size += row["bytes"]
            emit(row)

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            window = set()
            for row in rows:
                window.add(pool.submit(worker.process, row))
                if len(window) >= 2 * threads:  # back-pressure: bounded memory per task
                    done, window = concurrent.futures.wait(
                        window, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        record(future)
            for future in concurrent.futures.as_completed(window):
                record(future)
        return {"counts": dict(counts), "bytes": size, "seconds": time.time() - started}


_local_copies = {}


class _RowWorker:
    def __init__(self, options: DownloadOptions, store: storage.ObjectStore):
        self.options = options
        self.store = store
        self.fetcher = shared_fetcher(options.fetch)
        folder = options.imagenet_dir
        self.local = None
        if folder:
            self.local = _local_copies.setdefault(folder, LocalImageNet(folder))

    def process(self, row) -> dict:
        """One manifest row for one input row; never raises."""
        record = {"image_id": row["image_id"], "url": netguard.redact_url(row["url"]),
                  "attempts": 0, "origin": row["origin"],
                  "fetched_at": datetime.datetime.now(datetime.timezone.utc)}
        try:
            record.update(self._obtain(row))
        except Exception as err:  # a bug must cost one row, not the task
            log.exception("image %s", row["image_id"])
            record.update(status="internal_error", error=f"{type(err).__name__}: {err}")
        if row["note"]:
            record["error"] = "; ".join(x for x in (row["note"], record.get("error")) if x)
        return record

    def _obtain(self, row) -> dict:
        body = None
        if row["imagenet_id"] and self.local is not None:
            body = self.local.read(row["imagenet_id"])
        if body is not None:
            return self._keep(body, {"origin": "local_copy"})
        if not row["fetch_url"]:
            return {"status": "no_source", "error": "no URL, and no local ImageNet copy of it"}
        fetched = self.fetcher.fetch(row["fetch_url"])
        facts = {"attempts": fetched.attempts, "http_status": fetched.http_status}
        if fetched.status != "ok":
            return dict(facts, status=fetched.status, error=fetched.error)
        return self._keep(fetched.body, facts)

    def _keep(self, body: bytes, facts: dict) -> dict:
        image = imagecheck.inspect_image(body, self.options.max_pixels)
        facts.update(bytes=len(body), format=image.format, width=image.width,
                     height=image.height, animated=image.animated)
        if image.status != "ok":
            return dict(facts, status=image.status, error=image.error)
        digest = hashlib.sha256(body).hexdigest()
        key = self.store.key_for(digest, image.extension)
        try:
            self.store.put(key, body, storage.CONTENT_TYPES.get(image.extension))
        except storage.StoreError as err:
            return dict(facts, status="store_error", error=str(err), sha256=digest)
        return dict(facts, status="ok", sha256=digest, object_key=key)


def read_images(spark, images_path: str):
    """The ingest ``images/`` table, checked for the columns this stage needs."""
    try:
        images = spark.read.parquet(images_path)
    except Exception as err:  # Spark raises AnalysisException for a missing path
        raise runtime.UserError(f"cannot read images table {images_path} (expected the ingest "
                                f"output's images/ folder): {str(err).splitlines()[0]}") from None
    missing = [c for c in IMAGE_COLUMNS if c not in images.columns]
    if missing:
        raise runtime.UserError(f"{images_path} lacks column(s) {missing}: "
                                "is it the ingest stage's images/ table?")
    return images


def _parts_frame(spark, parts_dir: str):
    if _is_local(parts_dir):
        folder = _local(parts_dir)
        if not os.path.isdir(folder) or not any(
                f.endswith(".parquet") for _, _, files in os.walk(folder) for f in files):
            return None
    try:
        return spark.read.parquet(parts_dir)
    except Exception:  # no parts yet on a remote store
        return None


def latest_rows(parts):
    """Newest row per image over all committed parts (runs sort by their time-based id)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy("image_id").orderBy(F.col("run").desc(),
                                                   F.col("fetched_at").desc())
    return (parts.withColumn("_rank", F.row_number().over(order))
            .where(F.col("_rank") == 1).drop("_rank"))


def _done_ids(spark, parts_dir: str, retry_failed: bool):
    """Image ids to skip: every id with a row, or (``retry_failed``) every ok non-stand-in id."""
    from pyspark.sql import functions as F

    parts = _parts_frame(spark, parts_dir)
    if parts is None:
        return None
    latest = latest_rows(parts)
    if retry_failed:
        latest = latest.where((F.col("status") == "ok") & (F.col("origin") != "standin"))
    return latest.select("image_id")


def new_run_id() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def fetch_rows(spark, rows, output_path: str, options: DownloadOptions,
               store: storage.StoreOptions, run_id: str) -> list:
    """Runs the fetch tasks over ``rows`` (image_id, url, imagenet_id, fetch_url, origin, note);
    returns one stats dict per task. Each task commits its own manifest part."""
    total = rows.count()
    if total == 0:
        return []
    tasks = max(1, math.ceil(total / options.task_rows))
    # image_id is a hash, so sorting by it interleaves hosts: no task works one host in a row.
    spread = rows.repartition(tasks, "image_id").sortWithinPartitions("image_id")
    task = _Task(options, store, f"{output_path.rstrip('/')}/{PARTS}", run_id)
    log.info("fetching %d rows in %d tasks of %d threads", total, tasks, options.threads)
    return spread.rdd.mapPartitions(task).collect()


def web_rows(images):
    from pyspark.sql import functions as F

    return images.select("image_id", "url", "imagenet_id", F.col("url").alias("fetch_url"),
                         F.lit("web").alias("origin"), F.lit(None).cast("string").alias("note"))


def consolidate(spark, images, output_path: str):
    """Rebuilds ``manifest/`` from the parts: one row per input image, newest first."""
    parts = _parts_frame(spark, f"{output_path.rstrip('/')}/{PARTS}")
    names = [name for name, _ in MANIFEST_COLUMNS]
    if parts is None:  # an empty input: an empty manifest with the right schema
        from pyspark.sql.pandas.types import from_arrow_schema

        latest = spark.createDataFrame([], from_arrow_schema(manifest_arrow_schema()))
    else:
        latest = latest_rows(parts).select(*names)
    manifest = latest.join(images.select("image_id"), "image_id", "left_semi")
    target = f"{output_path.rstrip('/')}/{MANIFEST}"
    if not _is_local(target):
        manifest.coalesce(_files(images)).write.mode("overwrite").parquet(target)
        return spark.read.parquet(target)
    # Written beside, then swapped in, so readers never see a half-written manifest.
    staging = f"{_local(target)}.tmp-{uuid.uuid4().hex[:6]}"
    manifest.repartition(_files(images)).write.parquet(staging)
    old = f"{_local(target)}.old-{uuid.uuid4().hex[:6]}"
    if os.path.exists(_local(target)):
        os.rename(_local(target), old)
    os.rename(staging, _local(target))
    shutil.rmtree(old, ignore_errors=True)
    return spark.read.parquet(_local(target))


def _files(images) -> int:
    return max(1, min(64, images.rdd.getNumPartitions()))


def summarize(spark, images, manifest, stats: list, elapsed: float, skipped: int,
              run_id: str, store: storage.StoreOptions, rows_in: int = None) -> dict:
    """Counts by status (this run and overall), rates, storage and stand-in facts."""
    from pyspark.sql import functions as F

    run_counts = Counter()
    for task in stats:
        run_counts.update(task["counts"])
    run_bytes = sum(task["bytes"] for task in stats)
    groups = manifest.groupBy("status", "origin").agg(
        F.count("*").alias("rows"), F.sum("bytes").alias("bytes")).collect()
    by_status, by_origin, ok_bytes = Counter(), Counter(), 0
    for group in groups:
        by_status[group["status"]] += group["rows"]
        if group["status"] == "ok":
            by_origin[group["origin"]] += group["rows"]
            ok_bytes += group["bytes"] or 0
    objects = (manifest.where(F.col("status") == "ok").select("object_key").distinct().count()
               if by_status.get("ok") else 0)
    rows_out = sum(by_status.values())
    rows_in = images.count() if rows_in is None else rows_in
    ok_total = by_status.get("ok", 0)
    fetched_ok = run_counts.get("ok", 0)
    return {
        "stage": "download", "run_id": run_id,
        "rows_in": rows_in, "rows_out": rows_out, "unaccounted": rows_in - rows_out,
        "ok": ok_total, "rejected": rows_out - ok_total,
        "counts": dict(sorted(by_status.items())),
        "ok_by_origin": dict(sorted(by_origin.items())),
        "standins_used": by_origin.get("standin", 0),
        "this_run": {"attempted": sum(run_counts.values()), "skipped": skipped,
                     "counts": dict(sorted(run_counts.items())), "bytes": run_bytes,
                     "seconds": round(elapsed, 3),
                     "images_per_s": round(fetched_ok / elapsed, 2) if elapsed else None,
                     "bytes_per_s": round(run_bytes / elapsed) if elapsed else None},
        "stored_objects": objects, "ok_bytes": ok_bytes,
        "duplicate_content": ok_total - objects,
        "store": store.public(),
    }


def run_download(spark, images_path: str, output_path: str, options: DownloadOptions = None,
                 store: storage.StoreOptions = None, retry_failed: bool = False) -> dict:
    """Downloads every image of ``images_path`` not already done; returns the job summary.

    Writes ``<output>/manifest/``, ``<output>/manifest_parts/``, ``_summary.json`` and
    ``_store.json``; images go to ``store`` (default: local folder ``<output>/objects``).
    """
    options = options or DownloadOptions()
    store = store or storage.store_options({}, _local(output_path) + "/objects")
    images = read_images(spark, images_path)
    run_id = new_run_id()
    rows = web_rows(images)
    done = _done_ids(spark, f"{output_path.rstrip('/')}/{PARTS}", retry_failed)
    if done is not None:
        rows = rows.join(done, "image_id", "left_anti")
    if _is_local(output_path):
        storage.record_store(output_path, store)
    started = time.time()
    stats = fetch_rows(spark, rows, output_path, options, store, run_id)
    elapsed = time.time() - started
    attempted = sum(sum(task["counts"].values()) for task in stats)
    manifest = consolidate(spark, images, output_path)
    rows_in = images.count()
    summary = summarize(spark, images, manifest, stats, elapsed, rows_in - attempted, run_id,
                        store, rows_in)
    _report(summary)
    runtime.write_summary(output_path, summary)
    return summary


def _report(summary: dict) -> None:
    run = summary["this_run"]
    log.info("download: %d rows in, %d in manifest, %d ok, %d rejected, %d unaccounted",
             summary["rows_in"], summary["rows_out"], summary["ok"], summary["rejected"],
             summary["unaccounted"])
    log.info("this run: %d fetched, %d skipped, %s images/s, %s bytes/s; by status %s",
             run["attempted"], run["skipped"], run["images_per_s"], run["bytes_per_s"],
             run["counts"])
    if summary["unaccounted"]:
        log.error("%d input rows have no manifest row", summary["unaccounted"])

"""Dataset: labelled, downloaded images -> training-ready Petastorm Parquet, one folder per split.

Reads ``labels/image_labels/`` and the ok rows of ``download/manifest/``, joins them by
``image_id``, fetches each image from object storage (threads inside each Spark task), prepares
it (:mod:`mlimages.imageprep`) and writes ``<output>/<split>/`` through petastorm's
``materialize_dataset`` with :data:`mlimages.schema.MLImagesSchema`. Images that cannot be
used go to ``<output>/rejects/`` with a reason; ``_summary.json`` accounts for every joined row.

The joined rows (ids and keys, no pixels) are partitioned once into the final file layout
before any image is read, so each task fetches, prepares and writes exactly one output file and
image bytes are never shuffled.
"""
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import math
import os

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mlimages import imageprep, runtime, schema, storage

log = logging.getLogger(__name__)

OK = "ok"
REJECTED = "rejected"
# Rejection reasons added to those of imageprep.REASONS.
MISSING_OBJECT = "missing_object"          # the manifest's object_key is not in the store
STORE_ERROR = "store_error"                # the store failed to return it
NO_CLASSES_LEFT = "no_classes_after_filter"  # the class filter removed every label
CLASS_FILTERS = ("all", "trainable")
PARQUET_CODECS = ("uncompressed", "snappy", "gzip", "lz4", "zstd")

# A prepared row: the dataset fields, then what happened to it.
PREPARED_SCHEMA = T.StructType(
    [T.StructField(f.name, f.dataType, True) for f in schema.spark_schema().fields] + [
        T.StructField("status", T.StringType(), False),
        T.StructField("reason", T.StringType(), True),
        T.StructField("detail", T.StringType(), True),
        T.StructField("object_key", T.StringType(), True),
    ])
REJECT_COLUMNS = ("image_id", "split", "source", "object_key", "reason", "detail")


@dataclasses.dataclass
class DatasetOptions:
    """The ``dataset`` section of a profile."""
    splits: tuple = ("train", "val")
    # "all" keeps every label; "trainable" keeps only classes marked trainable in class_counts/.
    # Class indices are never renumbered, so a model keeps its 11,166 outputs either way.
    class_filter: str = "all"
    # Keep this fraction of the joined images (deterministic by image_id and seed).
    sample_fraction: float = 1.0
    seed: int = 42
    # Output layout: files per split = ceil(images / rows_per_file), or ``files`` when set.
    files: int = 0
    rows_per_file: int = 2000
    row_group_size_mb: int = 16
    # JPEG bytes do not compress: a codec only costs CPU on every read of every epoch.
    compression: str = "uncompressed"
    # Images fetched and prepared at once in each task (Pillow releases the GIL while coding).
    read_threads: int = 8
    # Image preparation (see imageprep.PrepOptions).
    max_short_side: int = 384
    min_short_side: int = 32
    max_pixels: int = 100_000_000
    jpeg_quality: int = 90
    # Overrides of the store the download run recorded in its _store.json (e.g. a new root).
    store: dict = None

    def __post_init__(self):
        self.splits = tuple(self.splits)
        if self.class_filter not in CLASS_FILTERS:
            raise runtime.UserError(
                f"dataset.class_filter {self.class_filter!r}: expected one of {CLASS_FILTERS}")
        if not 0 < self.sample_fraction <= 1:
            raise runtime.UserError(
                f"dataset.sample_fraction {self.sample_fraction}: expected 0 < f <= 1")
        if self.compression not in PARQUET_CODECS:
            raise runtime.UserError(
                f"dataset.compression {self.compression!r}: expected one of {PARQUET_CODECS}")
        if self.rows_per_file < 1 or self.files < 0 or self.read_threads < 1:
            raise runtime.UserError("dataset: rows_per_file and read_threads must be >= 1, "
                                    "files >= 0")

    def prep_options(self) -> imageprep.PrepOptions:
        return imageprep.PrepOptions(
            max_short_side=self.max_short_side, min_short_side=self.min_short_side,
            max_pixels=self.max_pixels, jpeg_quality=self.jpeg_quality)


# ---------------------------------------------------------------- inputs


def read_joined(spark: SparkSession, labels_dir: str, download_dir: str) -> tuple:
    """Labels joined with the manifest's ok rows; returns ``(joined, counts)``."""
    labels = _read_table(spark, f"{labels_dir}/image_labels").select(
        "image_id", "split", "source", "classes", "confidences")
    manifest = _read_table(spark, f"{download_dir}/manifest")
    ok = manifest.where(F.col("status") == "ok").select("image_id", "object_key")
    joined = labels.join(ok, "image_id")
    counts = {"labelled_images": labels.count(), "manifest_rows": manifest.count(),
              "manifest_ok": ok.count()}
    return joined, counts


def _read_table(spark: SparkSession, path: str) -> DataFrame:
    local = path.removeprefix("file://")
    if "://" not in local and not os.path.isdir(local):
        raise runtime.UserError(f"input table {path} does not exist")
    return spark.read.parquet(path)


def sample(joined: DataFrame, fraction: float, seed: int) -> DataFrame:
    """Keeps about ``fraction`` of the rows, the same rows on every run with the same seed."""
    if fraction >= 1:
        return joined
    bucket = F.pmod(F.xxhash64(F.col("image_id"), F.lit(seed)), F.lit(1_000_000))
    return joined.where(bucket < F.lit(int(round(fraction * 1_000_000))))


def allowed_classes(spark: SparkSession, labels_dir: str, class_filter: str):
    """The class indices to keep, or None for all."""
    if class_filter == "all":
        return None
    counts = _read_table(spark, f"{labels_dir}/class_counts")
    return frozenset(r["class"] for r in counts.where("trainable").select("class").collect())


def resolve_store(download_dir: str, overrides=None) -> storage.StoreOptions:
    """The store the download run wrote to (its ``_store.json``), with ``overrides`` applied."""
    folder = download_dir.removeprefix("file://")
    path = os.path.join(folder, storage.STORE_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    else:
        log.warning("%s not found: reading images from the local folder %s/objects",
                    path, folder)
        values = {"backend": "local", "root": os.path.join(folder, "objects")}
    values.update(overrides or {})
    try:
        return storage.StoreOptions(**values)
    except (TypeError, ValueError) as err:
        raise runtime.UserError(f"object store options: {err}") from None


def files_for(images: int, options: DatasetOptions) -> int:
    """Output files of a split: at least one, at most one per image."""
    if images == 0:
        return 0
    wanted = options.files or math.ceil(images / options.rows_per_file)
    return max(1, min(wanted, images))


# ---------------------------------------------------------------- preparation (executors)


def _filter_labels(row, allowed):
    classes, confidences = row["classes"] or [], row["confidences"] or []
    if allowed is None:
        return classes, confidences
    kept = [(c, p) for c, p in zip(classes, confidences, strict=True) if c in allowed]
    return [c for c, _ in kept], [p for _, p in kept]


def prepare_row(row, store, prep: imageprep.PrepOptions, allowed) -> tuple:
    """One joined row -> one prepared row (status ok, or rejected with a reason)."""
    classes, confidences = _filter_labels(row, allowed)
    image_id, key = row["image_id"], row["object_key"]
    if not classes:
        return _rejected(row, NO_CLASSES_LEFT, "no label left after the class filter")
    try:
        data = store.get(key)
    except (FileNotFoundError, KeyError) as err:
        return _rejected(row, MISSING_OBJECT, str(err))
    except Exception as err:  # noqa: BLE001 - any store failure is this row's outcome
        if _is_missing(err):
            return _rejected(row, MISSING_OBJECT, f"{key} not in the store")
        return _rejected(row, STORE_ERROR, f"{type(err).__name__}: {err}"[:500])
    try:
        image = imageprep.prepare_image(data, prep)
    except imageprep.ImagePrepError as err:
        return _rejected(row, err.reason, err.detail[:500])
    return (image_id, image.jpeg, image.height, image.width, [int(c) for c in classes],
            [float(p) for p in confidences], row["source"], row["split"], OK, None, None, key)


def _is_missing(err) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code")
    return code in ("NoSuchKey", "404", "NotFound")


def _rejected(row, reason: str, detail: str) -> tuple:
    return (row["image_id"], None, None, None, None, None, row["source"], row["split"],
            REJECTED, reason, detail, row["object_key"])


def prepare_partition(rows, store_options, prep, allowed, threads: int):
    """Fetches and prepares a partition's images with ``threads`` threads, keeping order."""
    store = storage.open_store(store_options, min_connections=threads)
    rows = iter(rows)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        # A bounded window of rows in flight keeps memory flat whatever the partition size.
        while True:
            chunk = list(itertools.islice(rows, threads * 4))
            if not chunk:
                return
            yield from pool.map(lambda r: prepare_row(r, store, prep, allowed), chunk)


# ---------------------------------------------------------------- writing


def write_split(spark: SparkSession, prepared: DataFrame, url: str, options: DatasetOptions):
    """Writes the ok rows of one split through petastorm, keeping ``prepared``'s partitioning."""
    from petastorm.etl.dataset_metadata import materialize_dataset

    rows = prepared.where(F.col("status") == OK).select(*schema.FIELD_NAMES)
    with materialize_dataset(spark, url, schema.MLImagesSchema, options.row_group_size_mb):
        rows.write.mode("overwrite").option("compression", options.compression).parquet(url)
        drop_empty_files(url)


def drop_empty_files(url: str) -> int:
    """Deletes row-less Parquet files from ``url``; returns how many.

    Spark writes one for the first partition even when it is empty, and the first partition of
    ``prepared`` may belong to another split; it would only give readers an empty shard.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    filesystem, path = pafs.FileSystem.from_uri(url)
    dropped = 0
    for info in filesystem.get_file_info(pafs.FileSelector(path)):
        # A file holding even one image is far larger than an empty file's footer.
        if info.extension != "parquet" or info.size > 16384:
            continue
        with filesystem.open_input_file(info.path) as handle:
            empty = pq.ParquetFile(handle).metadata.num_rows == 0
        if empty:
            filesystem.delete_file(info.path)
            dropped += 1
    return dropped


def write_rejects(prepared: DataFrame, url: str) -> None:
    (prepared.where(F.col("status") == REJECTED).select(*REJECT_COLUMNS)
     .coalesce(1).write.mode("overwrite").parquet(url))


def dataset_url(path: str) -> str:
    """A URL petastorm accepts: local paths become ``file://`` URLs."""
    if "://" in path:
        return path
    return "file://" + os.path.abspath(path)


def outcome_counts(prepared: DataFrame) -> dict:
    """``{split: {"written": n, "rejected": {reason: n}}}`` from the prepared rows."""
    result = {}
    for r in prepared.groupBy("split", "status", "reason").count().collect():
        entry = result.setdefault(r["split"], {"written": 0, "rejected": {}})
        if r["status"] == OK:
            entry["written"] += r["count"]
        else:
            entry["rejected"][r["reason"]] = r["count"]
    return result


def folder_facts(url: str) -> dict:
    """Files, bytes and row groups of a written local Parquet folder."""
    import pyarrow.parquet as pq

    folder = url.removeprefix("file://")
    if "://" in folder or not os.path.isdir(folder):
        return {}
    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
    row_groups = sum(pq.ParquetFile(os.path.join(folder, f)).num_row_groups for f in files)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return {"files": len(files), "bytes": size, "row_groups": row_groups}


def finish(spark: SparkSession, prepared: DataFrame, output: str, splits,
           options: DatasetOptions, summary: dict) -> dict:
    """Writes each split, the rejects and the summary from persisted prepared rows."""
    outcomes = outcome_counts(prepared)
    written = {}
    for split in splits:
        if outcomes.get(split, {}).get("written", 0) == 0:
            log.warning("split %s: no usable image, nothing written", split)
            continue
        url = dataset_url(os.path.join(output, split))
        write_split(spark, prepared.where(F.col("split") == split), url, options)
        written[split] = dict(folder_facts(url), url=url, images=outcomes[split]["written"])
    write_rejects(prepared, os.path.join(output, "rejects"))
    max_labels = prepared.agg(F.max(F.size("classes"))).first()[0]
    summary.update(
        splits=written,
        images_written=sum(o["written"] for o in outcomes.values()),
        images_rejected=sum(sum(o["rejected"].values()) for o in outcomes.values()),
        rejected_by_reason=_merge_reasons(outcomes),
        max_labels_per_image=int(max_labels or 0))
    runtime.write_summary(output, summary)
    return summary


def _merge_reasons(outcomes: dict) -> dict:
    merged = {}
    for entry in outcomes.values():
        for reason, count in entry["rejected"].items():
            merged[reason] = merged.get(reason, 0) + count
    return dict(sorted(merged.items()))


# ---------------------------------------------------------------- the job


def layout(joined: DataFrame, splits, options: DatasetOptions) -> tuple:
    """Partitions the joined rows into the output files: ``(rows, files per split)``."""
    per_split = dict(joined.groupBy("split").count().collect())
    files = {s: files_for(per_split.get(s, 0), options) for s in splits}
    # Range partitioning on the (hash) image_id gives files of even size, each a random subset.
    parts = [joined.where(F.col("split") == s).repartitionByRange(n, "image_id")
             for s, n in files.items() if n]
    if not parts:
        return None, files, per_split
    rows = parts[0]
    for part in parts[1:]:
        rows = rows.union(part)
    return rows.sortWithinPartitions("image_id"), files, per_split


def run_dataset(spark: SparkSession, labels_dir: str, download_dir: str, output: str,
                options: DatasetOptions) -> dict:
    """Builds the Petastorm dataset under ``output``; returns the summary written beside it."""
    joined, counts = read_joined(spark, labels_dir, download_dir)
    joined = joined.where(F.col("split").isin(list(options.splits)))
    joined_count = joined.count()
    chosen = sample(joined, options.sample_fraction, options.seed)
    rows, files, per_split = layout(chosen, options.splits, options)
    summary = dict(counts, joined=joined_count,
                   sampled_out=joined_count - sum(per_split.get(s, 0) for s in options.splits),
                   files_planned=files, options=public_options(options))
    if rows is None:
        raise runtime.UserError(
            f"no image to write: {counts['labelled_images']} labelled images, "
            f"{counts['manifest_ok']} downloaded ok, {joined_count} in both for splits "
            f"{list(options.splits)}")
    store_options = resolve_store(download_dir, options.store)
    allowed = allowed_classes(spark, labels_dir, options.class_filter)
    prep, threads = options.prep_options(), options.read_threads
    prepared = rows.rdd.mapPartitions(
        lambda part: prepare_partition(part, store_options, prep, allowed, threads))
    prepared = spark.createDataFrame(prepared, PREPARED_SCHEMA).persist(
        StorageLevel.MEMORY_AND_DISK)
    try:
        summary = finish(spark, prepared, output, options.splits, options, summary)
    finally:
        prepared.unpersist()
    accounted = summary["images_written"] + summary["images_rejected"] + summary["sampled_out"]
    summary["all_joined_rows_accounted"] = accounted == joined_count
    runtime.write_summary(output, summary)
    log.info("dataset: %d labelled, %d downloaded ok, %d joined; %d written, %d rejected %s, "
             "%d sampled out", counts["labelled_images"], counts["manifest_ok"], joined_count,
             summary["images_written"], summary["images_rejected"],
             summary["rejected_by_reason"], summary["sampled_out"])
    return summary


def public_options(options: DatasetOptions) -> dict:
    values = dataclasses.asdict(options)
    values["splits"] = list(options.splits)
    if values.get("store"):
        values["store"] = {k: v for k, v in values["store"].items()
                           if k not in ("access_key_id", "secret_access_key")}
    return values


def describe(output: str, labels_dir: str = None, rows: int = 3) -> str:
    """A short text report of a built dataset: per split size, files, row groups, a few rows
    with class names (from ``<labels_dir>/class_counts`` when given). Reads with pyarrow only."""
    import pyarrow.parquet as pq

    folder = output.removeprefix("file://")
    names = {}
    if labels_dir:
        counts = pq.read_table(os.path.join(labels_dir.removeprefix("file://"), "class_counts"),
                               columns=["class", "name"]).to_pydict()
        names = dict(zip(counts["class"], counts["name"], strict=True))
    lines = []
    for split in ("train", "val"):
        facts = folder_facts(os.path.join(folder, split))
        if not facts:
            continue
        table = pq.read_table(os.path.join(folder, split), columns=[
            "image_id", "height", "width", "classes", "confidences", "source"])
        lines.append(f"{split}: {table.num_rows} images, {facts['files']} files, "
                     f"{facts['row_groups']} row groups, {facts['bytes'] / 2**20:.1f} MiB")
        for row in table.slice(0, rows).to_pylist():
            labels = ", ".join(f"{names.get(c, c)} ({p:.1f})"
                               for c, p in zip(row["classes"], row["confidences"], strict=True))
            lines.append(f"  {row['image_id']} {row['width']}x{row['height']} "
                         f"{row['source']}: {labels}")
    rejects = os.path.join(folder, "rejects")
    if os.path.isdir(rejects):
        reasons = pq.read_table(rejects, columns=["reason"]).column(0).to_pylist()
        summary = ", ".join(f"{r} {reasons.count(r)}" for r in sorted(set(reasons)))
        lines.append(f"rejects: {len(reasons)}" + (f" ({summary})" if reasons else ""))
    return "\n".join(lines)

"""Ingest: annotation files -> ``images/``, ``labels/`` and ``quarantine/`` Parquet tables.

Three published row shapes are read, fields split on any run of whitespace:

* ``URL class:conf ...`` (Open Images files, and the legacy ``train_urls.txt``/``val_urls.txt``
  whose leading rows are ImageNet images),
* ``imagenet_id URL class:conf ...`` (``*_urls_and_index_from_imagenet.txt``),
* ``wnid/wnid_N.JPEG class:conf ...`` (``*_image_id_from_imagenet.txt``).

All parsing runs as Spark SQL expressions on each row (no Python UDF, no shuffle); only the
merging of keys that occur on several rows needs a shuffle, and only for those keys.
"""
import dataclasses
import logging
import os

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mlimages import runtime

log = logging.getLogger(__name__)

URL_PATTERN = r"^(?i)https?://\S+$"
IMAGENET_ID_PATTERN = r"^n[0-9]{8}_[0-9]+$"
IMAGENET_PATH_PATTERN = r"^(n[0-9]{8})/(n[0-9]{8}_[0-9]+)\.(?i)jpe?g$"
TERM_LIKE_PATTERN = r"^[0-9]+(:\S*)?$"

# Row-level reasons: the line yields no image. Term-level reasons: one term is dropped.
ROW_REASONS = ("non_utf8", "line_too_long", "missing_key", "bad_key", "no_labels")
TERM_REASONS = ("bad_class", "unknown_class", "bad_confidence", "confidence_out_of_range")


@dataclasses.dataclass
class IngestOptions:
    max_line_chars: int = 65536
    # file name -> number of leading rows that come from ImageNet (legacy combined files)
    imagenet_rows: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.max_line_chars, bool) or not isinstance(self.max_line_chars, int) \
                or self.max_line_chars < 1:
            raise runtime.UserError(
                f"ingest.max_line_chars {self.max_line_chars!r}: expected an integer >= 1")
        if not isinstance(self.imagenet_rows, dict) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0
                for n in self.imagenet_rows.values()):
            raise runtime.UserError(f"ingest.imagenet_rows {self.imagenet_rows!r}: expected a "
                                    "mapping of file name to a row count >= 0")


def infer_split(path: str, default=None) -> str:
    """``train`` or ``val`` from an annotation file's name, else ``default``."""
    name = os.path.basename(path).lower()
    if name.startswith("val") or "_val" in name or "-val" in name:
        return "val"
    if "train" in name:
        return "train"
    if default:
        return default
    raise runtime.UserError(
        f"cannot tell whether {path} holds train or val rows from its name; pass --split")


def read_lines(spark: SparkSession, paths) -> DataFrame:
    """Lines of the text files with where they come from: ``raw, path, block_start, row_id``.

    ``row_id`` grows by one per line within a file split; :func:`with_line_numbers` turns
    these into line numbers once the lines have been parsed and staged.
    """
    return spark.read.text(paths).select(
        F.col("value").alias("raw"),
        F.col("_metadata.file_path").alias("path"),
        F.col("_metadata.file_block_start").alias("block_start"),
        F.monotonically_increasing_id().alias("row_id"))


def with_line_numbers(spark: SparkSession, rows: DataFrame) -> DataFrame:
    """Adds the 1-based ``line_number`` of each row in its file.

    Spark reads a large file as several splits; counting the rows of each split once gives
    the line number of each split's first row, without funnelling the data through one task.
    The count reads only the staged position columns, not the text again.
    """
    blocks = (rows.groupBy("path", "block_start")
              .agg(F.count("*").alias("rows"), F.min("row_id").alias("first_row_id"))
              .collect())
    if not blocks:
        raise runtime.UserError("no annotation lines found in the input files")
    offsets, next_line = [], {}
    for block in sorted(blocks, key=lambda b: (b["path"], b["block_start"])):
        first = next_line.get(block["path"], 1)
        offsets.append((block["path"], block["block_start"], block["first_row_id"], first))
        next_line[block["path"]] = first + block["rows"]
    offsets_frame = spark.createDataFrame(
        offsets, "path string, block_start long, first_row_id long, first_line long")
    line_number = F.col("first_line") + F.col("row_id") - F.col("first_row_id")
    return (rows.join(F.broadcast(offsets_frame), ["path", "block_start"])
            .withColumn("line_number", line_number)
            .drop("first_line", "first_row_id", "row_id", "block_start"))


def _only_chars(text, allowed: str):
    """True where ``text`` uses only ``allowed`` characters (cheaper than a regex per term)."""
    return F.translate(text, allowed, "") == ""


def _parse_term(term, num_classes: int):
    """Struct ``(term, class, confidence, reason)`` for one ``class[:confidence]`` token.

    A bare ``class`` or ``class:`` means confidence 1, as in the upstream files. The character
    checks reject what Spark's casts would otherwise accept: ``5.0`` as a class, ``NaN``,
    ``Infinity`` or ``1d`` as a confidence.
    """
    colon = F.instr(term, ":")
    class_text = F.when(colon > 0, F.substring_index(term, ":", 1)).otherwise(term)
    conf_text = F.when(colon > 0, F.substr(term, colon + 1)).otherwise(F.lit(""))
    class_value = class_text.try_cast("long")
    conf_value = F.when(conf_text == "", F.lit(1.0)).otherwise(conf_text.try_cast("double"))
    reason = (F.when(class_value.isNull() | ~_only_chars(class_text, "0123456789+-"),
                     "bad_class")
              .when((class_value < 0) | (class_value >= num_classes), "unknown_class")
              .when(conf_value.isNull() | ~_only_chars(conf_text, "0123456789.eE+-"),
                    "bad_confidence")
              .when((conf_value <= 0) | (conf_value > 1), "confidence_out_of_range"))
    return F.struct(term.alias("term"), class_value.cast("int").alias("class"),
                    conf_value.cast("float").alias("confidence"), reason.alias("reason"))


def _key_columns(fields):
    """Key shape of a row: key, url, imagenet_id, index of its first term, or a row reason."""
    first, second = F.get(fields, 0), F.get(fields, 1)
    id_and_url = first.rlike(IMAGENET_ID_PATTERN) & F.coalesce(second.rlike(URL_PATTERN),
                                                               F.lit(False))
    is_url = first.rlike(URL_PATTERN)
    is_path = first.rlike(IMAGENET_PATH_PATTERN)
    is_id = first.rlike(IMAGENET_ID_PATTERN)
    path_id = F.regexp_extract(first, IMAGENET_PATH_PATTERN, 2)
    return {
        "key": (F.when(is_url, first).when(is_path, path_id).when(is_id, first)),
        "url": F.when(id_and_url, second).when(is_url, first),
        "imagenet_id": F.when(is_path, path_id).when(is_id, first),
        "terms_from": F.when(id_and_url, 3).otherwise(2),
        "key_reason": (F.when(is_url | is_path | is_id, None)
                       .when(first.rlike(TERM_LIKE_PATTERN), "missing_key")
                       .otherwise("bad_key")),
        "shape_is_imagenet": is_path | is_id,
    }


def with_best_labels(frame: DataFrame, source: str, target: str, unique=None) -> DataFrame:
    """Adds ``target``: the ``(class, confidence)`` structs of ``source`` with only the highest
    confidence of each class. Rows where the column ``unique`` is true are taken as they are;
    the others are sorted by class to find the repeats.

    The sorted array is materialised as a column first: the filter's lambda looks at the next
    element, and an expression there would be re-evaluated for every element.
    """
    ordered = F.col("_sorted_labels")  # by class, then confidence: the best is last
    last = F.size(ordered) - 1
    best = F.filter(ordered, lambda x, i: (i == last)
                    | (F.get(ordered, i + 1)["class"] != x["class"]))
    if unique is None:
        return (frame.withColumn("_sorted_labels", F.sort_array(source))
                .withColumn(target, best).drop("_sorted_labels"))
    # Sorting structs is the dearest step of the parse; most rows need none.
    return (frame.withColumn("_sorted_labels", F.when(~F.col(unique), F.sort_array(source)))
            .withColumn(target, F.when(F.col(unique), F.col(source)).otherwise(best))
            .drop("_sorted_labels"))


# A term list made only of well-formed `class:confidence` terms, after bare classes got ":1".
_PLAIN_TERM = r"(?:^|\s)([0-9]{1,9}):([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?=\s|$)"
_BARE_CLASS = r"(^|\s)([0-9]{1,9}):?(?=\s|$)"
_BAD_TERMS_TYPE = "array<struct<term:string,reason:string>>"


def _plain_terms(frame: DataFrame, num_classes: int) -> DataFrame:
    """Parses rows whose terms are all well formed and valid with array functions only.

    Spark compiles these to code, unlike per-term lambdas; ``plain`` marks the rows where this
    parse is complete, and only the other rows go through :func:`_parse_term`.
    """
    text = F.regexp_replace(F.array_join("term_texts", " "), _BARE_CLASS, "$1$2:1")
    return (frame
            .withColumn("plain_class", F.regexp_extract_all(text, F.lit(_PLAIN_TERM), 1)
                        .cast("array<int>").alias("class"))
            .withColumn("plain_conf", F.regexp_extract_all(text, F.lit(_PLAIN_TERM), 2)
                        .cast("array<float>"))
            .withColumn("plain", (F.size("term_texts") > 0)
                        & (F.size("plain_class") == F.size("term_texts"))
                        & (F.array_max("plain_class") < num_classes)
                        & (F.array_min("plain_conf") > 0) & (F.array_max("plain_conf") <= 1)))


def _labelled_terms(frame: DataFrame, num_classes: int) -> DataFrame:
    """Adds ``good_labels`` (class, confidence structs) and ``bad_terms`` (term, reason)."""
    class_col, conf_col = F.col("plain_class"), F.col("plain_conf")
    plain_labels = F.arrays_zip(class_col.alias("class"), conf_col.alias("confidence"))
    terms, no_bad_terms = F.col("terms"), F.array().cast(_BAD_TERMS_TYPE)
    return (_plain_terms(frame, num_classes)
            .withColumn("terms", F.when(~F.col("plain"), F.transform(
                "term_texts", lambda t: _parse_term(t, num_classes))))
            .withColumn("good_labels", F.when(F.col("plain"), plain_labels).otherwise(
                F.transform(F.filter(terms, lambda t: t["reason"].isNull()),
                            lambda t: F.struct(t["class"].alias("class"),
                                               t["confidence"].alias("confidence")))))
            .withColumn("bad_terms", F.when(F.col("plain"), no_bad_terms).otherwise(
                F.transform(F.filter(terms, lambda t: t["reason"].isNotNull()),
                            lambda t: F.struct(t["term"].alias("term"),
                                               t["reason"].alias("reason"))))))


def parse_rows(lines: DataFrame, num_classes: int, options: IngestOptions,
               split_of: dict) -> DataFrame:
    """One row per input line: its outcome (``row_reason``), key columns and parsed labels.

    ``split_of`` maps file names to their split. The line number, and the source that
    depends on it, come later (:func:`with_line_numbers`, :func:`with_source`).

    Each derived column is computed once in its own projection and then referenced, so no
    expensive expression runs twice per row.
    """
    trimmed = F.regexp_replace(F.regexp_replace("raw", "^\ufeff", ""), r"^\s+|\s+$", "")
    keys = _key_columns(F.col("fields"))
    parsed = (lines
              .select("*", (trimmed == "").alias("blank"),
                      F.split(trimmed, r"\s+").alias("fields"))
              .select("*", *[v.alias(k) for k, v in keys.items()])
              .withColumn("term_texts",
                          F.slice("fields", F.col("terms_from"), F.size("fields"))))
    parsed = _labelled_terms(parsed, num_classes)
    unique = F.col("plain") & (F.size(F.array_distinct("plain_class")) == F.size("plain_class"))
    parsed = with_best_labels(parsed.withColumn("unique", unique), "good_labels", "labels",
                              "unique")
    row_reason = (F.when(F.col("blank"), None)
                  .when(~F.is_valid_utf8("raw"), "non_utf8")
                  .when(F.length("raw") > options.max_line_chars, "line_too_long")
                  .when(F.col("key_reason").isNotNull(), F.col("key_reason"))
                  .when(F.size("good_labels") == 0, "no_labels"))
    file_name = F.substring_index("path", "/", -1)
    return parsed.withColumn("row_reason", row_reason).select(
        "path", "block_start", "row_id", file_name.alias("file"), "blank", "row_reason",
        # The raw text is kept only where the quarantine needs it: most rows are clean. It is
        # made valid UTF-8 (U+FFFD for bad bytes) so every Parquet reader can open the table,
        # and capped like the lines themselves.
        F.when(F.col("row_reason").isNotNull() | (F.size("bad_terms") > 0),
               F.substring(F.make_valid_utf8("raw"), 1, options.max_line_chars))
        .alias("raw"), "key", "url", "imagenet_id",
        "shape_is_imagenet", _split_column(file_name, split_of).alias("split"),
        F.xxhash64("key").alias("image_id"),
        "labels", (F.size("good_labels") - F.size("labels")).alias("repeated_in_row"),
        "bad_terms")


def with_source(rows: DataFrame, options: IngestOptions) -> DataFrame:
    """``source``: ``imagenet`` for ImageNet keys and for the leading rows of the legacy
    combined files (``options.imagenet_rows``), else ``openimages``."""
    source = F.lit("openimages")
    for name, count in options.imagenet_rows.items():
        source = F.when((F.col("file") == name) & (F.col("line_number") <= int(count)),
                        "imagenet").otherwise(source)
    return (rows.withColumn("source", F.when(F.col("shape_is_imagenet"), "imagenet")
                            .otherwise(source))
            .drop("shape_is_imagenet"))


def _split_column(file_name, split_of: dict):
    column = F.lit(None).cast("string")
    for name, split in split_of.items():
        column = F.when(file_name == name, split).otherwise(column)
    return column


BROADCAST_REPEATED_KEYS = 2_000_000
IMAGE_COLUMNS = ("image_id", "key", "url", "imagenet_id", "source", "split", "file",
                 "line_number")


def merge_duplicate_keys(kept: DataFrame) -> DataFrame:
    """One row per image_id: rows sharing a key are merged, keeping each class's best confidence.

    Keys on several rows are rare, so only those rows are shuffled; the others pass through.
    """
    repeated = (kept.groupBy("image_id").count().where("count > 1")
                .select("image_id", (F.col("count") - 1).alias("merged_rows"))
                .persist(StorageLevel.MEMORY_AND_DISK))
    if repeated.count() <= BROADCAST_REPEATED_KEYS:
        repeated = F.broadcast(repeated)  # so the kept rows are never shuffled for the joins
    singles = (kept.join(repeated, "image_id", "left_anti")
               .select(*IMAGE_COLUMNS, F.lit(0).alias("merged_rows"), "labels"))
    # The first row in file-name order (the summary's order of files), then line order.
    first = F.min_by(F.struct(*IMAGE_COLUMNS), F.struct("file", "line_number"))
    merged = (kept.join(repeated, "image_id")
              .groupBy("image_id")
              .agg(first.alias("first"), F.max("url").alias("any_url"),
                   F.first("merged_rows").alias("merged_rows"),
                   F.flatten(F.collect_list("labels")).alias("all_labels")))
    merged = with_best_labels(merged, "all_labels", "labels").select(
        *[F.col(f"first.{c}").alias(c) for c in IMAGE_COLUMNS if c != "url"],
        F.coalesce("first.url", "any_url").alias("url"), "merged_rows", "labels")
    return singles.unionByName(merged)


def quarantine_rows(rows: DataFrame) -> DataFrame:
    """Row-level entries (the line gave no image) and term-level entries (one term dropped)."""
    whole = rows.where(F.col("row_reason").isNotNull()).select(
        "file", "line_number", F.lit("row").alias("level"), F.col("row_reason").alias("reason"),
        "raw", F.lit(None).cast("string").alias("term"))
    term_checked = F.col("row_reason").isNull() | (F.col("row_reason") == "no_labels")
    terms = (rows.where(term_checked & (F.size("bad_terms") > 0))
             .select("file", "line_number", "raw", F.explode("bad_terms").alias("t"))
             .select("file", "line_number", F.lit("term").alias("level"),
                     F.col("t.reason").alias("reason"), "raw", F.col("t.term").alias("term")))
    return whole.unionByName(terms)


def _count_outcomes(rows: DataFrame) -> dict:
    kept = F.col("row_reason").isNull() & ~F.col("blank")
    term_checked = kept | (F.col("row_reason") == "no_labels")
    agg = rows.agg(
        F.count("*").alias("lines_read"),
        F.count_if("blank").alias("blank_lines"),
        F.count_if(kept).alias("rows_kept"),
        F.sum(F.when(kept, F.col("repeated_in_row")).otherwise(0))
        .alias("repeated_classes_in_row"),
        F.sum(F.when(term_checked, F.size("bad_terms")).otherwise(0)).alias("terms_quarantined"),
    ).first().asDict()
    by_reason = rows.where(F.col("row_reason").isNotNull()).groupBy("row_reason").count()
    agg["rows_quarantined"] = {r["row_reason"]: r["count"] for r in by_reason.collect()}
    return {k: (v or 0) if not isinstance(v, dict) else v for k, v in agg.items()}


def run_ingest(spark: SparkSession, inputs, num_classes: int, output: str,
               options: IngestOptions, split=None) -> dict:
    """Parses ``inputs`` and writes ``images/``, ``labels/`` and ``quarantine/`` under ``output``.

    Returns the summary, whose counts satisfy: lines read = images kept + merged duplicate
    rows + rows quarantined + blank lines.
    """
    files = sorted(spark.read.text(inputs).inputFiles())
    if not files:
        raise runtime.UserError(f"no annotation files found in {inputs}")
    split_of = {os.path.basename(f): infer_split(f, split) for f in files}
    # Parsed once into a staging table that every output reads back column by column;
    # Parquet holds the nested label arrays far more cheaply than Spark's in-memory cache.
    staging = f"{output}/staging_rows"  # removed at the end (Spark skips names with "_")
    parsed = parse_rows(read_lines(spark, inputs), num_classes, options, split_of)
    parsed.write.mode("overwrite").parquet(staging)
    try:
        rows = with_source(with_line_numbers(spark, spark.read.parquet(staging)), options)
    except runtime.UserError:
        _delete_path(spark, staging)  # nothing else was written
        raise
    kept = rows.where(F.col("row_reason").isNull() & ~F.col("blank"))
    images = merge_duplicate_keys(kept)

    images.drop("labels").write.mode("overwrite").parquet(f"{output}/images")
    (images.select("image_id", F.explode("labels").alias("l"))
     .select("image_id", "l.class", "l.confidence")
     .write.mode("overwrite").parquet(f"{output}/labels"))
    quarantine_rows(rows).write.mode("overwrite").parquet(f"{output}/quarantine")

    summary = _count_outcomes(rows)
    # Counted from the written tables: recounting `images` would redo the merge.
    written = (spark.read.parquet(f"{output}/images")
               .agg(F.count("*").alias("images"), F.sum("merged_rows").alias("merged")).first())
    summary.update(files=sorted(split_of), images=written["images"],
                   merged_duplicate_rows=int(written["merged"] or 0),
                   labels=spark.read.parquet(f"{output}/labels").count())
    _delete_path(spark, staging)
    _check_accounting(summary)
    runtime.write_summary(output, summary)
    log.info("ingest: %d lines in, %d images and %d labels out, %d rows quarantined %s, "
             "%d terms quarantined, %d duplicate rows merged, %d blank",
             summary["lines_read"], summary["images"], summary["labels"],
             sum(summary["rows_quarantined"].values()), summary["rows_quarantined"],
             summary["terms_quarantined"], summary["merged_duplicate_rows"],
             summary["blank_lines"])
    return summary


def _delete_path(spark: SparkSession, path: str) -> None:
    """Deletes a folder through Hadoop's file system API, so any URI Spark writes to works."""
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).delete(
        hadoop_path, True)


def _check_accounting(summary: dict) -> None:
    accounted = (summary["images"] + summary["merged_duplicate_rows"]
                 + sum(summary["rows_quarantined"].values()) + summary["blank_lines"])
    if accounted != summary["lines_read"]:
        raise RuntimeError(f"ingest lost rows: {summary['lines_read']} read, {accounted} "
                           "accounted for")

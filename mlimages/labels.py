"""Labels: ancestor augmentation of the ingested labels, as a join with the hierarchy closure.

Each label brings in every ancestor of its class; an ancestor's confidence is the highest
confidence among the labelled classes below it (itself included) in the same image. Running the
augmentation on its own output changes nothing, because the closure is transitive.
"""
import dataclasses
import logging
import os

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mlimages import hierarchy, runtime

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LabelsOptions:
    # Classes with at least this many training images are "trainable" (the published rule).
    trainable_threshold: int = 100
    # Partitions of the per-image aggregation; 0 keeps spark.sql.shuffle.partitions.
    partitions: int = 0


def augment(labels: DataFrame, closure: DataFrame, partitions: int = 0) -> DataFrame:
    """``(image_id, class, confidence)`` -> one row per image with sorted, closed labels.

    Output: ``image_id, classes array<int>, confidences array<float>, tags_before int``.
    The labels are hash-partitioned by image once, before the join multiplies them, so both
    aggregations that follow reuse that partitioning instead of shuffling again.
    """
    by_image = (labels.repartition(partitions, "image_id") if partitions
                else labels.repartition("image_id"))
    expanded = by_image.join(F.broadcast(closure), "class")
    per_class = (expanded.groupBy("image_id", "ancestor")
                 .agg(F.max("confidence").alias("confidence"),
                      F.min("distance").alias("distance")))
    pairs = F.sort_array(F.collect_list(F.struct(
        F.col("ancestor").alias("class"), F.col("confidence"))))
    return (per_class.groupBy("image_id")
            .agg(pairs.alias("pairs"),
                 F.count_if(F.col("distance") == 0).cast("int").alias("tags_before"))
            .select("image_id", F.col("pairs")["class"].alias("classes"),
                    F.col("pairs")["confidence"].alias("confidences"), "tags_before"))


def explode_image_labels(image_labels: DataFrame) -> DataFrame:
    """The inverse view: ``(image_id, class, confidence)`` from per-image arrays."""
    return (image_labels
            .select("image_id", F.arrays_zip("classes", "confidences").alias("z"))
            .select("image_id", F.explode("z").alias("z"))
            .select("image_id", F.col("z.classes").alias("class"),
                    F.col("z.confidences").alias("confidence")))


def class_counts(image_labels: DataFrame, classes: DataFrame, threshold: int) -> DataFrame:
    """Positives per class by split, for every class of the hierarchy (zeros included)."""
    positives = (image_labels.select("split", F.explode("classes").alias("class"))
                 .groupBy("class")
                 .agg(F.count_if(F.col("split") == "train").alias("train_images"),
                      F.count_if(F.col("split") == "val").alias("val_images")))
    return (classes.join(positives, "class", "left")
            .select("class", "wnid", "name",
                    F.coalesce("train_images", F.lit(0)).alias("train_images"),
                    F.coalesce("val_images", F.lit(0)).alias("val_images"))
            .withColumn("trainable", F.col("train_images") >= threshold)
            .orderBy("class"))


def run_labels(spark: SparkSession, ingest_dir: str, hierarchy_path: str, output: str,
               options: LabelsOptions) -> dict:
    """Writes ``image_labels/`` and ``class_counts/`` under ``output``; returns the summary."""
    if os.path.abspath(output.removeprefix("file://")) == os.path.abspath(
            ingest_dir.removeprefix("file://")):
        raise runtime.UserError(f"--output {output} is the ingest folder; give a folder of its "
                                "own (labels would overwrite ingest's summary)")
    classes_info = hierarchy.load_hierarchy(hierarchy_path)
    classes = hierarchy.classes_frame(spark, classes_info).cache()
    closure = hierarchy.ancestor_closure(spark, classes_info).cache()
    images = spark.read.parquet(f"{ingest_dir}/images").select("image_id", "split", "source")
    labels = spark.read.parquet(f"{ingest_dir}/labels")
    check_classes_known(labels, len(classes_info.classes), ingest_dir, hierarchy_path)

    augmented = augment(labels, closure, options.partitions)
    image_labels = augmented.join(images, "image_id").select(
        "image_id", "split", "source", "classes", "confidences", "tags_before")
    image_labels.write.mode("overwrite").parquet(f"{output}/image_labels")

    written = spark.read.parquet(f"{output}/image_labels")
    counts = class_counts(written, classes, options.trainable_threshold)
    counts.write.mode("overwrite").parquet(f"{output}/class_counts")
    summary = _summary(spark, written, f"{output}/class_counts", ingest_dir)
    runtime.write_summary(output, summary)
    log.info("labels: %d images in, %d out (%d without labels); tags %d before, %d after "
             "augmentation; %d trainable classes", summary["images_in"], summary["images"],
             summary["images_without_labels"], summary["tags_before"], summary["tags_after"],
             summary["trainable_classes"])
    return summary


def check_classes_known(labels: DataFrame, num_classes: int, ingest_dir: str,
                        hierarchy_path: str) -> None:
    """Refuses labels whose class the hierarchy lacks: the join would drop them silently.

    This happens when ingest ran with another hierarchy file. Indexes are contiguous (the
    loader checks), so the class range is enough.
    """
    low, high = labels.agg(F.min("class"), F.max("class")).first()
    if low is not None and (low < 0 or high >= num_classes):
        raise runtime.UserError(
            f"{ingest_dir}/labels holds classes {low}..{high} but {hierarchy_path} has "
            f"{num_classes} classes (0..{num_classes - 1}); run labels with the hierarchy "
            "file that ingest used")


def _summary(spark, image_labels: DataFrame, counts_path: str, ingest_dir: str) -> dict:
    totals = image_labels.agg(
        F.count("*").alias("images"),
        F.count_if(F.col("split") == "train").alias("train_images"),
        F.count_if(F.col("split") == "val").alias("val_images"),
        F.sum("tags_before").alias("tags_before"),
        F.sum(F.size("classes")).alias("tags_after"),
        F.count_if(F.col("tags_before") == F.size("classes")).alias("images_already_closed"),
    ).first().asDict()
    images_in = spark.read.parquet(f"{ingest_dir}/images").count()
    labels_in = spark.read.parquet(f"{ingest_dir}/labels").count()
    if labels_in != totals["tags_before"]:
        raise RuntimeError(f"labels lost input labels: {labels_in} read, "
                           f"{totals['tags_before']} joined")
    counts = spark.read.parquet(counts_path)
    summary = {k: int(v or 0) for k, v in totals.items()}
    summary.update(
        images_in=images_in, labels_in=labels_in,
        images_without_labels=images_in - summary["images"],
        trainable_classes=counts.where("trainable").count(),
        classes_with_images=counts.where("train_images + val_images > 0").count())
    return summary

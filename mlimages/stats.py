"""Statistics: the table the upstream project publishes, plus hierarchy, augmentation and
download facts, computed from the pipeline's tables and written as JSON, Markdown and two PNGs.

Every pass over a large table is one aggregation whose result is small (at most a few thousand
rows), so the driver only formats numbers and draws; nothing proportional to the images is
collected.
"""
import dataclasses
import json
import logging
import os

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mlimages import hierarchy, runtime

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATS_JSON = "stats.json"
STATS_MARKDOWN = "stats.md"
FIGURES = {"images_per_class": "images_per_class.png",
           "annotations_per_image": "annotations_per_image.png"}
FIGURE_INCHES = (10, 5)
FIGURE_DPI = 100  # 1000 x 500 pixels


@dataclasses.dataclass
class StatsOptions:
    # Classes with at least this many training images are "trainable" (the published rule).
    trainable_threshold: int = 100
    # How many classes get their name written on the images-per-class figure.
    annotated_classes: int = 6


def _read(spark: SparkSession, path: str, what: str) -> DataFrame:
    try:
        return spark.read.parquet(*([path] if isinstance(path, str) else path))
    except AnalysisException as err:
        if "PATH_NOT_FOUND" in str(err) or "Path does not exist" in str(err):
            raise runtime.UserError(f"{what} not found at {path}") from None
        raise


def _split_folders(dataset: str):
    """The dataset job's split folders (``train/``, ``val/``) when given its output folder."""
    local = dataset.removeprefix("file://")
    if "://" in local or not os.path.isdir(local):
        return dataset
    splits = [os.path.join(local, s) for s in ("train", "val") if os.path.isdir(f"{local}/{s}")]
    return splits or dataset


def label_totals(image_labels: DataFrame) -> list:
    """One pass over ``image_labels``: image counts by split, source and tag counts.

    Returns dicts ``split, source, tags_before, tags_after, images``; every statistic about
    images and tags is a sum over these rows.
    """
    rows = (image_labels
            .groupBy("split", "source", "tags_before",
                     F.size("classes").alias("tags_after"))
            .agg(F.count("*").alias("images"))
            .collect())
    return [r.asDict() for r in rows]


def _count_by(rows, key, where=lambda r: True) -> dict:
    out = {}
    for r in rows:
        if where(r):
            out[r[key]] = out.get(r[key], 0) + r["images"]
    ordered = sorted(out, key=lambda k: (k is None, 0 if k is None else k))
    return {str(k): out[k] for k in ordered}


def label_stats(totals: list, class_counts: list, n_classes: int, threshold: int) -> dict:
    """The published table and the augmentation facts from :func:`label_totals` rows."""
    images = sum(r["images"] for r in totals)
    tags_before = sum(r["tags_before"] * r["images"] for r in totals)
    tags_after = sum(r["tags_after"] * r["images"] for r in totals)
    train = sum(r["images"] for r in totals if r["split"] == "train")
    hist_split = "train" if train else "all"
    in_hist = (lambda r: r["split"] == "train") if train else (lambda r: True)
    return {
        "train_images": train,
        "val_images": sum(r["images"] for r in totals if r["split"] == "val"),
        "images": images,
        "images_by_source": _count_by(totals, "source"),
        "classes": n_classes,
        "classes_with_images": sum(1 for c in class_counts
                                   if c["train_images"] + c["val_images"] > 0),
        "trainable_classes": sum(1 for c in class_counts if c["train_images"] >= threshold),
        "trainable_threshold": threshold,
        "avg_tags_per_image": _ratio(tags_after, images),
        "avg_images_per_class": _ratio(tags_after, n_classes),
        "augmentation": {
            "tags_before": tags_before,
            "tags_after": tags_after,
            "tags_added": tags_after - tags_before,
            "avg_tags_per_image_before": _ratio(tags_before, images),
            "images_already_closed": sum(r["images"] for r in totals
                                         if r["tags_before"] == r["tags_after"]),
        },
        "annotations_per_image": {
            "split": hist_split,
            "before": _count_by(totals, "tags_before", in_hist),
            "after": _count_by(totals, "tags_after", in_hist),
        },
    }


def _ratio(num, den) -> float:
    return round(num / den, 4) if den else 0.0


def download_stats(manifest: DataFrame, images) -> dict:
    """Download outcomes by status and by source; ``images`` (ingest ``images/``) gives the
    source when the manifest has no ``source`` column."""
    if "source" not in manifest.columns:
        if images is None:
            manifest = manifest.withColumn("source", F.lit("unknown"))
        else:
            manifest = manifest.join(images.select("image_id", "source"), "image_id", "left")
    rows = (manifest.groupBy(F.coalesce("source", F.lit("unknown")).alias("source"), "status")
            .agg(F.count("*").alias("images"),
                 F.sum(F.when(F.col("status") == "ok", F.col("bytes"))).alias("bytes"))
            .collect())
    rows = [r.asDict() for r in rows]
    by_source = {}
    for r in rows:
        by_source.setdefault(str(r["source"]), {})[str(r["status"])] = r["images"]
    return {
        "images": sum(r["images"] for r in rows),
        "bytes_ok": int(sum(r["bytes"] or 0 for r in rows)),
        "by_status": _count_by(rows, "status"),
        "by_source": {s: dict(sorted(v.items())) for s, v in sorted(by_source.items())},
    }


def dataset_stats(dataset: DataFrame) -> dict:
    """Rows of the training dataset by split and source."""
    rows = [r.asDict() for r in dataset.groupBy("split", "source")
            .agg(F.count("*").alias("images")).collect()]
    return {"rows": sum(r["images"] for r in rows),
            "by_split": _count_by(rows, "split"),
            "by_source": _count_by(rows, "source")}


def short_name(name: str) -> str:
    """The first synonym of a class name (``"object, physical object"`` -> ``"object"``)."""
    return name.split(",")[0].strip()


def named_classes(class_counts: list, names, annotated: int) -> list:
    """Classes to name on the per-class figure: ``(rank, class, train_images, label)`` at
    evenly spaced ranks among the classes with images, the most frequent and the rarest
    included; labels are the first synonym of the hierarchy's name."""
    shown = ranked_classes(class_counts)
    if not shown or annotated <= 0:
        return []
    step = max(1, (len(shown) - 1) // max(1, annotated - 1))
    ranks = sorted(set(range(0, len(shown), step)[:annotated - 1]) | {len(shown) - 1})
    return [(r + 1, shown[r]["class"], shown[r]["train_images"],
             short_name(names[shown[r]["class"]])) for r in ranks]


def ranked_classes(class_counts: list) -> list:
    """Classes with training images, most first (ties by class index)."""
    return sorted((c for c in class_counts if c["train_images"] > 0),
                  key=lambda c: (-c["train_images"], c["class"]))


def plot_images_per_class(class_counts: list, names, path: str, annotated: int) -> str:
    """Training images per class, classes sorted by count, log scale; a few classes named."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = ranked_classes(class_counts)  # log scale has no zero: empty classes are left out
    fig, ax = plt.subplots(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    ax.plot(range(1, len(shown) + 1), [c["train_images"] for c in shown], color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel(f"classes sorted by training images ({len(class_counts) - len(shown):,} "
                  "classes without images not shown)")
    ax.set_ylabel("training images (log scale)")
    ax.set_title("Training images per class")
    for rank, _, count, label in named_classes(class_counts, names, annotated):
        ax.plot([rank], [count], "o", color="tab:red", markersize=3)
        ax.annotate(label, (rank, count), xytext=(8, 8), textcoords="offset points",
                    fontsize=8, arrowprops={"arrowstyle": "-", "color": "gray"})
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_annotations_per_image(histogram: dict, path: str) -> str:
    """Histogram of labels per image, before and after ancestor augmentation."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    width = 0.4
    for offset, key, label in ((-width / 2, "before", "as annotated"),
                               (width / 2, "after", "with ancestors")):
        counts = histogram[key]
        ax.bar([int(k) + offset for k in counts], list(counts.values()), width=width,
               label=label)
    images = "training images" if histogram["split"] == "train" else "images"
    ax.set_xlabel("annotations per image")
    ax.set_ylabel(images)
    ax.set_title(f"Annotations per image ({images})")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _num(value) -> str:
    return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"


def _table(rows, header=("statistic", "value")) -> list:
    lines = [f"| {' | '.join(header)} |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
    return lines + [""]


def markdown(stats: dict, names) -> str:
    """The statistics as Markdown tables a person can read."""
    h, a = stats["hierarchy"], stats["augmentation"]
    roots = ", ".join(f"{short_name(names[int(k)])} ({v:,})" for k, v in h["roots"].items())
    lines = ["# Dataset statistics", ""] + _table([
        ("train images", _num(stats["train_images"])),
        ("validation images", _num(stats["val_images"])),
        ("classes", _num(stats["classes"])),
        (f"trainable classes (≥ {stats['trainable_threshold']} training images)",
         _num(stats["trainable_classes"])),
        ("average tags per image", _num(stats["avg_tags_per_image"])),
        ("average images per class", _num(stats["avg_images_per_class"])),
    ])
    lines += ["## Hierarchy", ""] + _table([
        ("classes", _num(h["classes"])),
        ("roots (subtree size)", roots),
        ("leaves", _num(h["leaves"])),
        ("deepest path (edges)", h["max_depth"]),
        ("mean depth (ancestors per class)", f"{h['mean_depth']:.4f}"),
    ])
    lines += ["## Ancestor augmentation", ""] + _table([
        ("tags as annotated", _num(a["tags_before"])),
        ("tags after augmentation", _num(a["tags_after"])),
        ("tags added", _num(a["tags_added"])),
        ("images already closed", _num(a["images_already_closed"])),
        ("classes with images", _num(stats["classes_with_images"])),
    ])
    lines += _markdown_download(stats["download"]) + _markdown_dataset(stats["dataset"])
    lines += ["## Figures", ""] + [f"![{k.replace('_', ' ')}]({v})"
                                   for k, v in stats["figures"].items()] + [""]
    return "\n".join(lines)


def _markdown_download(download) -> list:
    if not download:
        return []
    statuses = list(download["by_status"])
    rows = [(source, *(_num(counts.get(s, 0)) for s in statuses),
             _num(sum(counts.values())))
            for source, counts in download["by_source"].items()]
    rows.append(("all", *(_num(download["by_status"][s]) for s in statuses),
                 _num(download["images"])))
    return ["## Download outcomes", ""] + _table(rows, ("source", *statuses, "total"))


def _markdown_dataset(dataset) -> list:
    if not dataset:
        return []
    rows = [("rows", _num(dataset["rows"]))]
    rows += [(f"split {k}", _num(v)) for k, v in dataset["by_split"].items()]
    rows += [(f"source {k}", _num(v)) for k, v in dataset["by_source"].items()]
    return ["## Training dataset", ""] + _table(rows)


def run_stats(spark: SparkSession, labels_dir: str, hierarchy_path: str, output: str,
              options: StatsOptions, ingest_dir: str = None, manifest: str = None,
              dataset: str = None) -> dict:
    """Writes ``stats.json``, ``stats.md`` and the figures into local folder ``output``.

    Returns the statistics (the content of ``stats.json``).
    """
    if "://" in output and not output.startswith("file://"):
        raise runtime.UserError(f"--output must be a local folder (figures), got {output}")
    output = output.removeprefix("file://")
    os.makedirs(output, exist_ok=True)
    classes_info = hierarchy.load_hierarchy(hierarchy_path)
    names = [c.name for c in classes_info.classes]

    image_labels = _read(spark, f"{labels_dir}/image_labels", "labels image_labels/")
    counts = [r.asDict() for r in _read(spark, f"{labels_dir}/class_counts",
                                        "labels class_counts/")
              .select("class", "train_images", "val_images").collect()]
    stats = label_stats(label_totals(image_labels), counts, len(classes_info),
                        options.trainable_threshold)
    classes = hierarchy.classes_frame(spark, classes_info)
    closure = hierarchy.ancestor_closure(spark, classes_info).cache()
    stats["hierarchy"] = hierarchy.hierarchy_facts(closure, classes).as_dict()
    closure.unpersist()

    images = _read(spark, f"{ingest_dir}/images", "ingest images/") if ingest_dir else None
    if manifest and os.path.isdir(os.path.join(manifest, "manifest")):
        manifest = os.path.join(manifest, "manifest")  # the download output folder was given
    stats["download"] = (download_stats(_read(spark, manifest, "download manifest"), images)
                         if manifest else None)
    stats["dataset"] = (dataset_stats(_read(spark, _split_folders(dataset), "dataset"))
                        if dataset else None)

    stats["figures"] = dict(FIGURES)
    plot_images_per_class(counts, names, os.path.join(output, FIGURES["images_per_class"]),
                          options.annotated_classes)
    plot_annotations_per_image(stats["annotations_per_image"],
                               os.path.join(output, FIGURES["annotations_per_image"]))
    stats["schema_version"] = SCHEMA_VERSION
    stats["inputs"] = {"labels": labels_dir, "hierarchy": hierarchy_path,
                       "ingest": ingest_dir, "manifest": manifest, "dataset": dataset}
    _write(output, stats, names)
    log.info("stats: %d images (%d train, %d val), %d classes, %d trainable; written to %s",
             stats["images"], stats["train_images"], stats["val_images"], stats["classes"],
             stats["trainable_classes"], output)
    return stats


def _write(output: str, stats: dict, names) -> None:
    with open(os.path.join(output, STATS_JSON), "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=2, sort_keys=True)
    with open(os.path.join(output, STATS_MARKDOWN), "w", encoding="utf-8") as handle:
        handle.write(markdown(stats, names))
    runtime.write_summary(output, {
        "images_in": stats["images"], "classes": stats["classes"],
        "trainable_classes": stats["trainable_classes"],
        "files": [STATS_JSON, STATS_MARKDOWN, *FIGURES.values()]})


def report(output: str) -> str:
    """The Markdown table of a finished stats run and where its figures are (for the demo)."""
    folder = output.removeprefix("file://")
    with open(os.path.join(folder, STATS_MARKDOWN), encoding="utf-8") as handle:
        text = handle.read()
    figures = "\n".join(f"figure: {os.path.abspath(os.path.join(folder, name))}"
                        for name in FIGURES.values())
    return f"{text.rstrip()}\n\n{figures}\n"

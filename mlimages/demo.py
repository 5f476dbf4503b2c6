"""``make demo``: the pipeline on the real upstream sample, with a summary of each stage.

Runs every stage in one local Spark session on ``train_urls_tiny.txt`` (100 real annotated
URLs) and the real hierarchy, writing under ``runs/demo/``.
"""
import argparse
import logging
import os
import sys

from pyspark.sql import functions as F

from mlimages import (config, download, hierarchy, ingest, labels, runtime, sources, spark,
                      standin, stats)

log = logging.getLogger(__name__)

TOP_CLASSES = 10


def _print_header(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _ingest_and_labels(session, profile, run_dir, hierarchy_path, urls_path):
    classes = hierarchy.load_hierarchy(hierarchy_path)
    ingest_options = config.section(profile, "ingest", ingest.IngestOptions)
    ingested = ingest.run_ingest(session, [urls_path], len(classes), f"{run_dir}/ingest",
                                 ingest_options)
    labelled = labels.run_labels(session, f"{run_dir}/ingest", hierarchy_path,
                                 f"{run_dir}/labels",
                                 config.section(profile, "labels", labels.LabelsOptions))
    _print_header("ingest + labels")
    quarantined = ingested["rows_quarantined"] or {}
    print(f"annotation file     {urls_path}")
    print(f"lines in            {ingested['lines_read']}")
    print(f"images              {ingested['images']} "
          f"({ingested['merged_duplicate_rows']} duplicate rows merged, "
          f"{ingested['blank_lines']} blank lines)")
    print(f"rows quarantined    {sum(quarantined.values())} {quarantined or ''}".rstrip())
    print(f"terms quarantined   {ingested['terms_quarantined']}")
    print(f"tags before closure {labelled['tags_before']}")
    print(f"tags after closure  {labelled['tags_after']} "
          f"({labelled['images_already_closed']} images were already closed)")
    counts = session.read.parquet(f"{run_dir}/labels/class_counts")
    top = counts.orderBy(F.desc("train_images"), "class").limit(TOP_CLASSES).collect()
    print(f"top {TOP_CLASSES} classes by images:")
    for row in top:
        print(f"  {row['train_images']:4d}  {row['class']:5d} {row['wnid']}  {row['name']}")
    return ingested, labelled


def _download(session, profile, run_dir):
    """Fetches the sample's URLs; on a machine without internet, stand-ins fill the gaps."""
    out = f"{run_dir}/download"
    options, store = download.options_from_profile(profile, out)
    # No name is resolved outside loopback: the build machines may reach no DNS server.
    options = download.replace(options, offline=os.environ.get("MLIMAGES_DEMO_ONLINE") != "1")
    summary = standin.run_with_standins(session, f"{run_dir}/ingest/images", out, options, store)
    _print_header("download")
    web = (summary.get("web") or summary)["counts"]
    print(f"URLs                {summary['rows_in']}")
    print(f"fetched from web    {web}")
    print(f"manifest rows       {summary['rows_out']} (one per URL), ok {summary['ok']}")
    if summary.get("note"):
        print(f"NOTE                {summary['note']}")
    return summary


def _stats(session, profile, run_dir, hierarchy_path):
    out = f"{run_dir}/stats"
    options = config.section(profile, "stats", stats.StatsOptions)
    extra = {"manifest": f"{run_dir}/download"}
    if os.path.isdir(f"{run_dir}/dataset"):
        extra["dataset"] = f"{run_dir}/dataset"
    stats.run_stats(session, f"{run_dir}/labels", hierarchy_path, out, options,
                    ingest_dir=f"{run_dir}/ingest", **extra)
    _print_header("stats")
    print(stats.report(out))


def run_demo(run_dir: str) -> None:
    hierarchy_path = sources.sample_file(sources.HIERARCHY)
    urls_path = sources.sample_file(sources.TRAIN_URLS_TINY)
    profile = config.load_profile("local")
    session = spark.build_session("mlimages-demo", master=config.spark_master(profile),
                                  conf=config.spark_conf(profile))
    try:
        _ingest_and_labels(session, profile, run_dir, hierarchy_path, urls_path)
        _download(session, profile, run_dir)
        _stats(session, profile, run_dir, hierarchy_path)
    finally:
        session.stop()
    print(f"\nAll tables are under {os.path.abspath(run_dir)}/ (Parquet; see README).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/demo", help="where outputs go")
    args = parser.parse_args(argv)
    runtime.setup_logging("WARNING")
    run_demo(args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

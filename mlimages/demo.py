"""``make demo``: the pipeline on the real upstream sample, with a summary of each stage.

Runs the Spark stages (ingest, labels, download, dataset, stats) in one local Spark session on
``train_urls_tiny.txt`` (100 real annotated URLs) and the real hierarchy, then a few CPU
training steps with two Horovod ranks and classification of the four sample photos, writing
under ``runs/demo/``.
"""
import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings

from pyspark.sql import functions as F

from mlimages import (
    config,
    dataset,
    download,
    hierarchy,
    ingest,
    labels,
    runtime,
    sources,
    spark,
    standin,
    stats,
)

log = logging.getLogger(__name__)

TOP_CLASSES = 10
LINE_WIDTH = 100
# Two files of 50 images: at least one row group for each of the two training ranks.
DEMO_ROWS_PER_FILE = 50
TRAIN_RANKS = 2
TRAIN_CONFIG = os.path.join(sources.REPO_ROOT, "conf", "train", "tiny.yaml")
IMAGE_SIZE = 64
TOP_PREDICTIONS = 3
SUBPROCESS_TIMEOUT_S = 900


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
    # A rerun resumes from the manifest: the origin tells stand-ins from real images.
    print(f"ok by origin        {summary.get('ok_by_origin')}, "
          f"skipped (done before) {summary.get('this_run', {}).get('skipped', 0)}")
    if summary.get("note"):
        print(f"NOTE                {summary['note']}")
    return summary


def _dataset(session, profile, run_dir):
    out = f"{run_dir}/dataset"
    options = dataclasses.replace(config.section(profile, "dataset", dataset.DatasetOptions),
                                  rows_per_file=DEMO_ROWS_PER_FILE)
    summary = dataset.run_dataset(session, f"{run_dir}/labels", f"{run_dir}/download", out,
                                  options)
    _print_header("dataset")
    print(f"joined (labels x manifest ok) {summary['joined']}, written "
          f"{summary['images_written']}, rejected {summary['images_rejected']}")
    for line in dataset.describe(out, f"{run_dir}/labels").splitlines():
        # A sample row lists every class of the closure: show the start of it.
        print(line if len(line) <= LINE_WIDTH else line[:LINE_WIDTH - 3] + "...")
    return summary


def _stats(session, profile, run_dir, hierarchy_path):
    out = f"{run_dir}/stats"
    options = config.section(profile, "stats", stats.StatsOptions)
    extra = {"manifest": f"{run_dir}/download"}
    splits = [s for s in ("train", "val") if os.path.isdir(f"{run_dir}/dataset/{s}")]
    if len(splits) == 1:
        extra["dataset"] = f"{run_dir}/dataset/{splits[0]}"
    elif splits:
        # One Petastorm dataset per split; a Hadoop glob reads them as one table.
        extra["dataset"] = f"{run_dir}/dataset/{{{','.join(splits)}}}"
    stats.run_stats(session, f"{run_dir}/labels", hierarchy_path, out, options,
                    ingest_dir=f"{run_dir}/ingest", **extra)
    _print_header("stats")
    print(stats.report(out))


class StepFailed(RuntimeError):
    """A demo step run as a subprocess failed; its output has been shown."""


def _subprocess_env() -> dict:
    """The environment the Makefile exports, set here too so the demo runs on its own."""
    env = dict(os.environ)
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["TF_USE_LEGACY_KERAS"] = "1"  # Horovod's TensorFlow helpers need Keras 2
    return env


def _run_quietly(command: list, what: str) -> str:
    """Runs ``command``; its output is shown only when it fails (TF and Horovod are chatty)."""
    print("$ " + " ".join(os.path.relpath(c) if os.path.isabs(c) else c for c in command))
    done = subprocess.run(command, env=_subprocess_env(), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, check=False)
    if done.returncode != 0:
        print((done.stdout + done.stderr)[-6000:], file=sys.stderr)
        raise StepFailed(f"{what} failed with exit code {done.returncode}")
    return done.stdout


def _train(run_dir: str, dataset_summary: dict) -> str:
    """A few pre-training steps with two Horovod ranks (Gloo, CPU) on the demo dataset."""
    model_dir = os.path.abspath(f"{run_dir}/train")
    # A run folder holding checkpoints refuses to start again without --resume.
    shutil.rmtree(model_dir, ignore_errors=True)
    splits = dataset_summary["splits"]
    train_url = os.path.abspath(f"{run_dir}/dataset/train")
    # The sample has train rows only: without a val split, evaluate on the training rows.
    val_split = "val" if "val" in splits else "train"
    val_url = os.path.abspath(f"{run_dir}/dataset/{val_split}")
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    if not os.path.exists(horovodrun):
        raise runtime.UserError(f"no horovodrun beside {sys.executable}: run `make setup`")
    _print_header(f"train (ResNet-101, {IMAGE_SIZE} px, {TRAIN_RANKS} Horovod ranks on CPU)")
    started = time.monotonic()
    _run_quietly([horovodrun, "-np", str(TRAIN_RANKS), "-H", f"localhost:{TRAIN_RANKS}",
                  "--gloo", sys.executable, "-m", "mlimages.train", "pretrain",
                  "--config", TRAIN_CONFIG, f"data.train_url={train_url}",
                  f"data.val_url={val_url}", f"data.val_split={val_split}",
                  f"run.model_dir={model_dir}"], "training")
    with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        metrics = [json.loads(line) for line in handle]
    for entry in metrics:
        print("  " + ", ".join(f"{k} {_short(v)}" for k, v in sorted(entry.items())))
    checkpoints = sorted(f.removesuffix(".index") for f in os.listdir(model_dir)
                         if f.endswith(".index"))
    print(f"checkpoints         {', '.join(checkpoints)} in {os.path.relpath(model_dir)} "
          f"({time.monotonic() - started:.0f} s)")
    return model_dir


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def _classify(run_dir: str, model_dir: str) -> None:
    """Top classes of the four upstream sample photos with the demo model."""
    photos = [sources.sample_file(name) for name in sources.SAMPLE_PHOTOS]
    image_list = os.path.abspath(f"{run_dir}/sample_photos.txt")
    with open(image_list, "w", encoding="utf-8") as out:
        out.write("".join(f"{path}\n" for path in photos))
    output = os.path.abspath(f"{run_dir}/label_pred.txt")
    _print_header("classify the sample photos")
    _run_quietly([sys.executable, "-m", "mlimages.train", "classify", "--model", model_dir,
                  "--images", image_list, "--image-size", str(IMAGE_SIZE),
                  "--top-k", str(TOP_PREDICTIONS), "--output", output], "classify")
    with open(output.removesuffix(".txt") + ".json", encoding="utf-8") as handle:
        results = json.load(handle)
    for result in results:
        print(os.path.basename(result["path"]))
        if result["error"]:
            print(f"  error: {result['error']}")
        for p in result["predictions"]:
            print(f"  {p['score']:.3f}  {p['class']:5d}  {p['name']}")
    print(f"(upstream layout in {os.path.relpath(output)})")
    print("NOTE: a few CPU steps produce no useful model; these predictions only show that "
          "training, checkpoints and inference work end to end.")


def run_demo(run_dir: str) -> None:
    hierarchy_path = sources.sample_file(sources.HIERARCHY)
    urls_path = sources.sample_file(sources.TRAIN_URLS_TINY)
    profile = config.load_profile("local")
    session = spark.build_session("mlimages-demo", master=config.spark_master(profile),
                                  conf=config.spark_conf(profile))
    try:
        _ingest_and_labels(session, profile, run_dir, hierarchy_path, urls_path)
        _download(session, profile, run_dir)
        dataset_summary = _dataset(session, profile, run_dir)
        _stats(session, profile, run_dir, hierarchy_path)
    finally:
        session.stop()
    model_dir = _train(run_dir, dataset_summary)
    _classify(run_dir, model_dir)
    print(f"\nAll tables are under {os.path.abspath(run_dir)}/ (Parquet; see README).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/demo", help="where outputs go")
    args = parser.parse_args(argv)
    runtime.setup_logging("WARNING")
    # petastorm 0.13.1 uses pyarrow's legacy API: pages of FutureWarnings that need no action.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\.")
    # The same in Spark's Python workers, which inherit the environment.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning:petastorm.fs_utils")
    try:
        run_demo(args.run_dir)
    except (*runtime.USER_ERRORS, StepFailed) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

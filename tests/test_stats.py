"""Statistics on the real sample, checked against plain Python over the sample and hierarchy
files; figures opened with Pillow; the job run as a subprocess."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image, ImageStat

from mlimages import ingest, labels, stats

THRESHOLD = 5  # the sample has 100 images: the published 100 would leave nothing trainable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_KEYS = {"schema_version", "train_images", "val_images", "images", "images_by_source",
            "classes", "classes_with_images", "trainable_classes", "trainable_threshold",
            "avg_tags_per_image", "avg_images_per_class", "augmentation",
            "annotations_per_image", "hierarchy", "download", "dataset", "figures", "inputs"}
MANIFEST_STATUSES = ["ok", "ok", "ok", "http_error", "timeout", "ok", "not_an_image", "ok"]


def _hierarchy(path):
    """index -> (parent, name), read directly from the file."""
    rows = {}
    with open(path, encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            rows[int(fields[0])] = (int(fields[2]), " ".join(fields[3:]))
    return rows


def _ancestors(cls, rows):
    out = []
    while rows[cls][0] != -1:
        cls = rows[cls][0]
        out.append(cls)
    return out


@pytest.fixture(scope="module")
def expected(sample_urls_path, hierarchy_path):
    rows = _hierarchy(hierarchy_path)
    annotated = {}
    with open(sample_urls_path, encoding="utf-8") as handle:
        for line in handle:
            url, *terms = line.split()
            annotated.setdefault(url, set()).update(int(t.split(":")[0]) for t in terms)
    closed = {url: set(cs).union(*(_ancestors(c, rows) for c in cs))
              for url, cs in annotated.items()}
    per_class = Counter(c for cs in closed.values() for c in cs)
    depths = [len(_ancestors(c, rows)) for c in rows]
    roots = [c for c, (parent, _) in rows.items() if parent == -1]
    parents = {parent for parent, _ in rows.values()}
    before = sum(len(cs) for cs in annotated.values())
    after = sum(len(cs) for cs in closed.values())
    return {
        "per_class": per_class,
        "names": {c: name for c, (_, name) in rows.items()},
        "images": len(annotated),
        "classes": len(rows),
        "classes_with_images": len(per_class),
        "trainable": sum(1 for n in per_class.values() if n >= THRESHOLD),
        "tags_before": before,
        "tags_after": after,
        "closed_images": sum(annotated[u] == closed[u] for u in annotated),
        "avg_tags": round(after / len(annotated), 4),
        "avg_images_per_class": round(after / len(rows), 4),
        "hist_before": Counter(len(cs) for cs in annotated.values()),
        "hist_after": Counter(len(cs) for cs in closed.values()),
        "roots": {str(r): sum(1 for c in rows if c == r or r in _ancestors(c, rows))
                  for r in roots},
        "leaves": sum(1 for c in rows if c not in parents),
        "max_depth": max(depths),
        "mean_depth": round(sum(depths) / len(rows), 4),
    }


@pytest.fixture(scope="module")
def run(spark, sample_urls_path, hierarchy_path, tmp_path_factory):
    """ingest -> labels -> stats on the sample, with a small manifest and dataset beside."""
    out = tmp_path_factory.mktemp("stats")
    ingest.run_ingest(spark, [sample_urls_path], 11166, str(out / "ingest"),
                      ingest.IngestOptions())
    labels.run_labels(spark, str(out / "ingest"), hierarchy_path, str(out / "labels"),
                      labels.LabelsOptions())
    images = spark.read.parquet(str(out / "ingest" / "images")).orderBy("image_id")
    picked = images.limit(len(MANIFEST_STATUSES)).collect()
    manifest = [(r["image_id"], r["url"], status, 200 if status == "ok" else None, None, 1,
                 1000 if status == "ok" else None, None, "jpeg", 64, 48, None, None)
                for r, status in zip(picked, MANIFEST_STATUSES, strict=True)]
    spark.createDataFrame(manifest, (
        "image_id long, url string, status string, http_status int, error string, "
        "attempts int, bytes long, sha256 string, format string, width int, height int, "
        "object_key string, fetched_at timestamp")).write.parquet(
            str(out / "download" / "manifest"))
    spark.createDataFrame([(1, "train", "openimages"), (2, "train", "openimages"),
                           (3, "val", "imagenet")],
                          "image_id long, split string, source string").write.parquet(
        str(out / "dataset"))
    result = stats.run_stats(spark, str(out / "labels"), hierarchy_path, str(out / "stats"),
                             stats.StatsOptions(trainable_threshold=THRESHOLD),
                             ingest_dir=str(out / "ingest"), manifest=str(out / "download"),
                             dataset=str(out / "dataset"))
    return result, out / "stats", [r["source"] for r in picked]


def test_published_table_matches_independent_count(run, expected):
    result, _, _ = run
    assert result["train_images"] == expected["images"] == 100
    assert result["val_images"] == 0
    assert result["images_by_source"] == {"openimages": 100}
    assert result["classes"] == expected["classes"] == 11166
    assert result["classes_with_images"] == expected["classes_with_images"]
    assert result["trainable_classes"] == expected["trainable"] > 0
    assert result["trainable_threshold"] == THRESHOLD
    assert result["avg_tags_per_image"] == expected["avg_tags"]
    assert result["avg_images_per_class"] == expected["avg_images_per_class"]


def test_augmentation_and_histogram(run, expected):
    result, _, _ = run
    assert result["augmentation"] == {
        "tags_before": expected["tags_before"], "tags_after": expected["tags_after"],
        "tags_added": expected["tags_after"] - expected["tags_before"],
        "avg_tags_per_image_before": round(expected["tags_before"] / expected["images"], 4),
        "images_already_closed": expected["closed_images"]}
    hist = result["annotations_per_image"]
    assert hist["split"] == "train"
    assert hist["before"] == {str(k): v for k, v in sorted(expected["hist_before"].items())}
    assert hist["after"] == {str(k): v for k, v in sorted(expected["hist_after"].items())}


def test_hierarchy_facts(run, expected):
    facts = run[0]["hierarchy"]
    assert facts["roots"] == expected["roots"] == {"0": 67, "1": 1046, "2": 10038, "3": 15}
    assert facts["leaves"] == expected["leaves"] == 9219
    assert facts["max_depth"] == expected["max_depth"] == 16
    assert facts["mean_depth"] == expected["mean_depth"] == 7.4711


def test_download_and_dataset_sections(run):
    result, _, sources = run
    download = result["download"]
    assert download["images"] == len(MANIFEST_STATUSES)
    assert download["by_status"] == dict(sorted(Counter(MANIFEST_STATUSES).items()))
    assert download["bytes_ok"] == 1000 * MANIFEST_STATUSES.count("ok")
    expected = {}
    for source, status in zip(sources, MANIFEST_STATUSES, strict=True):
        expected.setdefault(source, Counter())[status] += 1
    assert download["by_source"] == {s: dict(sorted(c.items())) for s, c in expected.items()}
    assert result["dataset"] == {"rows": 3, "by_split": {"train": 2, "val": 1},
                                 "by_source": {"imagenet": 1, "openimages": 2}}


def test_json_file_has_stable_keys(run):
    result, folder, _ = run
    with open(folder / stats.STATS_JSON, encoding="utf-8") as handle:
        text = handle.read()
    written = json.loads(text)
    assert set(written) == TOP_KEYS
    assert list(written) == sorted(written)
    assert set(written["hierarchy"]) == {"classes", "roots", "leaves", "max_depth",
                                         "ancestor_pairs", "mean_depth"}
    assert written == json.loads(json.dumps(result))
    summary = json.loads((folder / "_summary.json").read_text())
    assert summary["images_in"] == 100


def test_markdown_table(run, expected):
    _, folder, _ = run
    text = (folder / stats.STATS_MARKDOWN).read_text(encoding="utf-8")
    for row in ("| train images | 100 |", "| validation images | 0 |",
                "| classes | 11,166 |",
                f"| trainable classes (≥ {THRESHOLD} training images) | "
                f"{expected['trainable']:,} |",
                f"| average tags per image | {expected['avg_tags']:.2f} |",
                f"| average images per class | {expected['avg_images_per_class']:.2f} |",
                "| leaves | 9,219 |", "| deepest path (edges) | 16 |",
                "| mean depth (ancestors per class) | 7.4711 |",
                "| roots (subtree size) | thing (67), matter (1,046), object (10,038), "
                "atmospheric phenomenon (15) |",
                f"| tags added | {expected['tags_after'] - expected['tags_before']:,} |"):
        assert row in text, row
    assert "## Download outcomes" in text and "## Training dataset" in text
    report = stats.report(str(folder))
    assert report.startswith(text.rstrip())
    for name in stats.FIGURES.values():
        assert f"figure: {folder / name}" in report


@pytest.mark.parametrize("figure", sorted(stats.FIGURES))
def test_figures_are_drawn(run, figure):
    _, folder, _ = run
    with Image.open(folder / stats.FIGURES[figure]) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 500)
        grey = image.convert("L")
        extrema = grey.getextrema()
        assert extrema[1] - extrema[0] > 100  # dark ink on a light page
        # Not blank: a real share of the pixels differs from the white background.
        inked = sum(grey.point(lambda v: 255 if v < 200 else 0).histogram()[255:])
        assert inked > 0.005 * image.size[0] * image.size[1]
        assert ImageStat.Stat(grey).stddev[0] > 10


def test_figure_names_classes_from_hierarchy(run, expected, hierarchy_path):
    result, folder, _ = run
    assert result["figures"] == stats.FIGURES
    counts = [{"class": c, "train_images": expected["per_class"].get(c, 0), "val_images": 0}
              for c in expected["names"]]
    names = [expected["names"][c] for c in sorted(expected["names"])]
    named = stats.named_classes(counts, names, 6)
    top = min(expected["per_class"], key=lambda c: (-expected["per_class"][c], c))
    rarest = max(expected["per_class"], key=lambda c: (-expected["per_class"][c], c))
    label = expected["names"][top].split(",")[0].strip()
    assert named[0] == (1, top, expected["per_class"][top], label)
    assert named[-1][:3] == (len(expected["per_class"]), rarest, expected["per_class"][rarest])
    assert len(named) == 6
    assert [n[0] for n in named] == sorted({n[0] for n in named})


def _job(args, env):
    return subprocess.run([sys.executable, os.path.join(REPO, "jobs", "stats.py"), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_job_reports_missing_labels_without_traceback(tmp_path, hierarchy_path, python_env):
    done = _job(["--labels", str(tmp_path / "nope"), "--hierarchy", hierarchy_path,
                 "--output", str(tmp_path / "out")], python_env)
    assert done.returncode == 2
    assert "labels image_labels/ not found" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_job_without_manifest(run, tmp_path, hierarchy_path, python_env):
    labels_dir = run[1].parent / "labels"
    done = _job(["--labels", str(labels_dir), "--hierarchy", hierarchy_path,
                 "--output", str(tmp_path / "out")], python_env)
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads((tmp_path / "out" / stats.STATS_JSON).read_text())
    assert set(written) == TOP_KEYS
    assert written["download"] is None and written["dataset"] is None
    assert written["trainable_threshold"] == 100 and written["trainable_classes"] == 0
    for name in stats.FIGURES.values():
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_empty_run_still_draws(tmp_path):
    """A run whose labels are empty gives zeros, not a division error or a missing figure."""
    result = stats.label_stats([], [{"class": 0, "train_images": 0, "val_images": 0}], 1, 100)
    assert result["avg_tags_per_image"] == 0.0
    assert result["annotations_per_image"]["split"] == "all"
    for name, draw in (("a.png", lambda p: stats.plot_images_per_class([], ["x"], p, 6)),
                       ("b.png", lambda p: stats.plot_annotations_per_image(
                           result["annotations_per_image"], p))):
        draw(str(tmp_path / name))
        with Image.open(tmp_path / name) as image:
            assert image.size == (1000, 500)

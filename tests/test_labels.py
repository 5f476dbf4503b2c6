"""Ancestor augmentation on the real sample, checked against a walk of the parents in Python."""
import pytest
from pyspark.sql import functions as F

from mlimages import hierarchy, ingest, labels

SAMPLE_TAGS_BEFORE, SAMPLE_TAGS_AFTER, SAMPLE_ALREADY_CLOSED = 827, 1103, 35


def _parents_from_file(path):
    parents = {}
    with open(path, encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            parents[int(fields[0])] = int(fields[2])
    return parents


def _closed_by_walk(terms, parents):
    """{class: confidence} with every ancestor at the best confidence below it."""
    closed = {}
    for cls, conf in terms.items():
        node = cls
        while node != -1:
            closed[node] = max(closed.get(node, 0.0), conf)
            node = parents[node]
    return closed


@pytest.fixture(scope="module")
def sample_run(spark, sample_urls_path, hierarchy_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    ingest.run_ingest(spark, [sample_urls_path], 11166, str(out / "ingest"),
                      ingest.IngestOptions())
    summary = labels.run_labels(spark, str(out / "ingest"), hierarchy_path, str(out / "labels"),
                                labels.LabelsOptions(trainable_threshold=5))
    return summary, out


@pytest.fixture(scope="module")
def expected(sample_urls_path, hierarchy_path):
    parents = _parents_from_file(hierarchy_path)
    by_url = {}
    with open(sample_urls_path, encoding="utf-8") as handle:
        for line in handle:
            url, *terms = line.split()
            parsed = {}
            for term in terms:
                cls, _, conf = term.partition(":")
                parsed[int(cls)] = max(parsed.get(int(cls), 0.0), float(conf or 1))
            by_url[url] = (parsed, _closed_by_walk(parsed, parents))
    return by_url


def test_sample_tag_counts(sample_run, expected):
    summary, _ = sample_run
    before = sum(len(terms) for terms, _ in expected.values())
    after = sum(len(closed) for _, closed in expected.values())
    closed = sum(len(terms) == len(full) for terms, full in expected.values())
    assert (summary["tags_before"], summary["tags_after"]) == (before, after)
    assert (before, after, closed) == (SAMPLE_TAGS_BEFORE, SAMPLE_TAGS_AFTER,
                                        SAMPLE_ALREADY_CLOSED)
    assert summary["images_already_closed"] == closed
    assert summary["images"] == summary["images_in"] == 100
    assert summary["labels_in"] == before


def test_labels_refuse_a_hierarchy_other_than_ingest_used(sample_run, hierarchy_path,
                                                          tmp_path, spark):
    from mlimages import runtime

    _, out = sample_run
    # A valid hierarchy of the first 5,000 classes: its parents all come before 5,000 here.
    with open(hierarchy_path, encoding="utf-8") as handle:
        lines = handle.readlines()
    kept = [lines[0]] + [line for line in lines[1:]
                         if int(line.split("\t")[0]) < 5000 and int(line.split("\t")[2]) < 5000]
    assert len(kept) == 5001
    small = tmp_path / "small_hierarchy.txt"
    small.write_text("".join(kept), encoding="utf-8")
    high = max(cls for cls in _label_classes(spark, out / "ingest"))
    assert high >= 5000  # the sample has labels the small hierarchy lacks
    with pytest.raises(runtime.UserError, match="has 5000 classes"):
        labels.run_labels(spark, str(out / "ingest"), str(small), str(tmp_path / "labels"),
                          labels.LabelsOptions())
    assert not (tmp_path / "labels" / "image_labels").exists()


def _label_classes(spark, ingest_dir):
    return [r["class"] for r in spark.read.parquet(str(ingest_dir / "labels")).collect()]


def test_each_image_matches_parent_walk(spark, sample_run, expected):
    _, out = sample_run
    images = spark.read.parquet(str(out / "ingest" / "images")).select("image_id", "url")
    rows = spark.read.parquet(str(out / "labels" / "image_labels")).join(images, "image_id")
    for row in rows.collect():
        terms, closed = expected[row["url"]]
        assert row["classes"] == sorted(closed)
        assert [round(c, 4) for c in row["confidences"]] == [closed[c] for c in sorted(closed)]
        assert row["tags_before"] == len(terms)
        assert (row["split"], row["source"]) == ("train", "openimages")


def test_augmenting_twice_changes_nothing(spark, sample_run, class_hierarchy):
    _, out = sample_run
    once = spark.read.parquet(str(out / "labels" / "image_labels"))
    closure = hierarchy.ancestor_closure(spark, class_hierarchy)
    twice = labels.augment(labels.explode_image_labels(once), closure)
    first = {r["image_id"]: (r["classes"], r["confidences"]) for r in once.collect()}
    second = {r["image_id"]: (r["classes"], r["confidences"]) for r in twice.collect()}
    assert first == second
    assert all(r["tags_before"] == len(r["classes"]) for r in twice.collect())


def test_class_counts(spark, sample_run, expected, class_hierarchy):
    _, out = sample_run
    counts = spark.read.parquet(str(out / "labels" / "class_counts"))
    positives = {}
    for _, closed in expected.values():
        for cls in closed:
            positives[cls] = positives.get(cls, 0) + 1
    assert counts.count() == len(class_hierarchy)
    got = {r["class"]: r["train_images"] for r in counts.where("train_images > 0").collect()}
    assert got == positives
    trainable = {r["class"] for r in counts.where("trainable").collect()}
    assert trainable == {c for c, n in positives.items() if n >= 5}
    root = counts.where(F.col("class") == 2).first()
    assert (root["wnid"], root["name"], root["val_images"]) == (
        "n00002684", "object, physical object", 0)

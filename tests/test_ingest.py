"""Ingest on the real sample and on a file holding every kind of defect the job must survive."""
import json
import os

import pytest
from pyspark.sql import functions as F

from mlimages import ingest, runtime
from mlimages_jobs import ingest as ingest_job

NUM_CLASSES = 11166

# (line, what the job must make of it)
MESSY_LINES = [
    b"\xef\xbb\xbfhttp://a.example/1.jpg\t5:1\t10:0.9",  # BOM, tabs
    b"https://a.example/2.jpg   5:0.8  7  8:  \t",  # spaces, bare class, 'class:', trailing tab
    b"http://a.example/3.jpg\t5:1\r",  # CRLF ending (\r\n)
    b"",
    b"   \t ",
    b"http://a.example/4.jpg\t5:1\xff",  # not UTF-8
    b"http://a.example/5.jpg\t" + b"5:1\t" * 80,  # over-long (limit set to 300 below)
    b"5:1 6:1",  # no key
    b"ftp://a.example/6.jpg 5:1",  # key not a URL or ImageNet id
    b"photo.jpg 5:1",
    b"http://a.example/7.jpg abc:1 5:1",  # bad class term
    b"http://a.example/8.jpg 99999:1 5:1 -3:1",  # classes outside the hierarchy
    b"http://a.example/9.jpg 5:high 6:nan 7:1",  # confidences that are not numbers
    b"http://a.example/10.jpg 5:0 6:1.5 7:-0.1 8:1",  # out of (0, 1]
    b"http://a.example/11.jpg 99999:1",  # no valid term left
    b"http://a.example/12.jpg",  # no term at all
    b"http://a.example/13.jpg 5:0.8 5:0.9 6:1",  # same class twice in a row
    b"http://a.example/1.jpg 6:0.8 10:1",  # repeats line 1: merged
    b"n04310904/n04310904_8388.JPEG 2367:1",  # ImageNet relative path
    b"n04310904_8388 http://img.example/steel.jpg 2367:0.9 5:1",  # same image, id + URL
    b"n01440764_10026 5:1",  # bare ImageNet id
]


@pytest.fixture(scope="module")
def messy_run(spark, tmp_path_factory):
    folder = tmp_path_factory.mktemp("messy")
    path = folder / "train_messy.txt"
    path.write_bytes(b"\n".join(MESSY_LINES) + b"\n")
    options = ingest.IngestOptions(max_line_chars=300)
    summary = ingest.run_ingest(spark, [str(path)], NUM_CLASSES, str(folder / "out"), options)
    out = folder / "out"
    tables = {name: spark.read.parquet(str(out / name)) for name in
              ("images", "labels", "quarantine")}
    return summary, tables


def _labels_of(tables, key):
    images, labels = tables["images"], tables["labels"]
    rows = labels.join(images.where(F.col("key") == key), "image_id").collect()
    return {r["class"]: round(r["confidence"], 3) for r in rows}


def _quarantine(tables, level):
    return sorted((r["line_number"], r["reason"], r["term"]) for r in
                  tables["quarantine"].where(F.col("level") == level).collect())


def test_every_line_is_accounted_for(messy_run):
    summary, tables = messy_run
    assert summary["lines_read"] == len(MESSY_LINES)
    assert summary["blank_lines"] == 2
    assert summary["rows_quarantined"] == {
        "non_utf8": 1, "line_too_long": 1, "missing_key": 1, "bad_key": 2, "no_labels": 2}
    assert summary["merged_duplicate_rows"] == 2  # line 18 into line 1, line 20 into line 19
    assert summary["images"] == 10
    assert (summary["images"] + summary["merged_duplicate_rows"] + 7 + 2
            == summary["lines_read"])
    assert tables["images"].count() == 10


def test_row_level_quarantine_keeps_raw_line(messy_run):
    _, tables = messy_run
    assert _quarantine(tables, "row") == [
        (6, "non_utf8", None), (7, "line_too_long", None), (8, "missing_key", None),
        (9, "bad_key", None), (10, "bad_key", None), (15, "no_labels", None),
        (16, "no_labels", None)]
    reasons = {r["level"]: set() for r in tables["quarantine"].collect()}
    for r in tables["quarantine"].collect():
        reasons[r["level"]].add(r["reason"])
    assert reasons["row"] <= set(ingest.ROW_REASONS)
    assert reasons["term"] <= set(ingest.TERM_REASONS)
    raw = tables["quarantine"].where("line_number = 9").first()["raw"]
    assert raw == "ftp://a.example/6.jpg 5:1"


def test_quarantine_raw_text_is_valid_utf8_and_capped(messy_run, tmp_path):
    import duckdb
    import pyarrow.parquet as pq

    _, tables = messy_run
    raw = {r["line_number"]: r["raw"] for r in tables["quarantine"].collect()}
    assert raw[6] == "http://a.example/4.jpg\t5:1\ufffd"
    assert raw[7] == MESSY_LINES[6].decode()[:300]
    # Readers that insist on valid UTF-8 open the whole table.
    folder = tables["quarantine"].inputFiles()[0].rsplit("/", 1)[0].removeprefix("file:")
    frame = pq.read_table(folder).to_pandas()
    assert len(frame) == tables["quarantine"].count()
    got = duckdb.sql(f"select raw from read_parquet('{folder}/*.parquet') "
                     "where line_number = 6").fetchall()
    assert got == [(raw[6],)]


def test_key_in_train_and_val_keeps_the_first_file_by_name(spark, tmp_path):
    (tmp_path / "a_train.txt").write_text("http://x.example/0.jpg 5:1\n"
                                          "http://x.example/1.jpg 5:1\n"
                                          "http://x.example/dup.jpg 6:1\n")
    (tmp_path / "b_val.txt").write_text("http://x.example/dup.jpg 7:0.5\n")
    ingest.run_ingest(spark, [str(tmp_path / "*.txt")], NUM_CLASSES, str(tmp_path / "out"),
                      ingest.IngestOptions())
    images = spark.read.parquet(str(tmp_path / "out" / "images"))
    dup = images.where(F.col("key") == "http://x.example/dup.jpg").first()
    # The val row has the smaller line number; the train file still comes first.
    assert (dup["split"], dup["file"], dup["line_number"], dup["merged_rows"]) == (
        "train", "a_train.txt", 3, 1)


def test_empty_input_is_a_user_error_and_leaves_nothing(spark, tmp_path):
    (tmp_path / "train_empty.txt").write_bytes(b"")
    with pytest.raises(runtime.UserError, match="no annotation lines"):
        ingest.run_ingest(spark, [str(tmp_path / "train_empty.txt")], NUM_CLASSES,
                          str(tmp_path / "out"), ingest.IngestOptions())
    assert not (tmp_path / "out" / "staging_rows").exists()
    assert not (tmp_path / "out" / "images").exists()


def test_bad_ingest_options_are_user_errors():
    for bad in ({"max_line_chars": "lots"}, {"max_line_chars": -5}, {"max_line_chars": True},
                {"imagenet_rows": {"train_urls.txt": -1}}, {"imagenet_rows": ["x"]}):
        with pytest.raises(runtime.UserError, match="ingest."):
            ingest.IngestOptions(**bad)


def test_bad_terms_are_quarantined_and_good_terms_kept(messy_run):
    summary, tables = messy_run
    assert _quarantine(tables, "term") == [
        (11, "bad_class", "abc:1"), (12, "unknown_class", "-3:1"),
        (12, "unknown_class", "99999:1"), (13, "bad_confidence", "5:high"),
        (13, "bad_confidence", "6:nan"), (14, "confidence_out_of_range", "5:0"),
        (14, "confidence_out_of_range", "6:1.5"), (14, "confidence_out_of_range", "7:-0.1"),
        (15, "unknown_class", "99999:1")]
    assert summary["terms_quarantined"] == 9
    assert _labels_of(tables, "http://a.example/7.jpg") == {5: 1.0}
    assert _labels_of(tables, "http://a.example/9.jpg") == {7: 1.0}
    assert _labels_of(tables, "http://a.example/10.jpg") == {8: 1.0}


def test_separators_bare_classes_and_repeats(messy_run):
    summary, tables = messy_run
    assert _labels_of(tables, "https://a.example/2.jpg") == {5: 0.8, 7: 1.0, 8: 1.0}
    assert _labels_of(tables, "http://a.example/3.jpg") == {5: 1.0}
    assert _labels_of(tables, "http://a.example/13.jpg") == {5: 0.9, 6: 1.0}
    assert summary["repeated_classes_in_row"] == 1


def test_duplicate_keys_merge_with_max_confidence(messy_run):
    _, tables = messy_run
    assert _labels_of(tables, "http://a.example/1.jpg") == {5: 1.0, 6: 0.8, 10: 1.0}
    first = tables["images"].where(F.col("key") == "http://a.example/1.jpg").first()
    assert (first["line_number"], first["merged_rows"]) == (1, 1)
    steel = tables["images"].where(F.col("key") == "n04310904_8388").first()
    assert steel["url"] == "http://img.example/steel.jpg"
    assert (steel["imagenet_id"], steel["source"], steel["line_number"]) == (
        "n04310904_8388", "imagenet", 19)
    assert _labels_of(tables, "n04310904_8388") == {2367: 1.0, 5: 1.0}


def test_key_shapes_source_split_and_ids(spark, messy_run):
    _, tables = messy_run
    rows = {r["key"]: r for r in tables["images"].collect()}
    assert rows["n01440764_10026"]["url"] is None
    assert rows["n01440764_10026"]["source"] == "imagenet"
    assert rows["https://a.example/2.jpg"]["source"] == "openimages"
    assert {r["split"] for r in rows.values()} == {"train"}
    assert {r["file"] for r in rows.values()} == {"train_messy.txt"}
    expected = spark.range(1).select(F.xxhash64(F.lit("https://a.example/2.jpg"))).first()[0]
    assert rows["https://a.example/2.jpg"]["image_id"] == expected


def test_real_sample(spark, sample_urls_path, tmp_path):
    summary = ingest.run_ingest(spark, [sample_urls_path], NUM_CLASSES, str(tmp_path),
                                ingest.IngestOptions())
    with open(sample_urls_path, encoding="utf-8") as handle:
        rows = [line.split() for line in handle if line.strip()]
    expected_terms = sum(len({t.split(":")[0] for t in row[1:]}) for row in rows)
    assert summary["lines_read"] == len(rows) == 100
    assert summary["images"] == 100
    assert summary["labels"] == expected_terms == 827
    assert summary["rows_quarantined"] == {}
    images = spark.read.parquet(str(tmp_path / "images"))
    by_line = {r["line_number"]: r["url"] for r in images.collect()}
    assert [by_line[i + 1] for i in range(100)] == [row[0] for row in rows]
    assert json.loads((tmp_path / "_summary.json").read_text())["labels"] == 827


def test_line_numbers_across_many_splits(spark, tmp_path):
    lines = [f"http://a.example/{i}.jpg\t{i % 50}:1" for i in range(3000)]
    path = tmp_path / "val_many.txt"
    path.write_text("\n".join(lines) + "\n")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "4096")
    try:
        ingest.run_ingest(spark, [str(path)], NUM_CLASSES, str(tmp_path / "out"),
                          ingest.IngestOptions())
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    images = spark.read.parquet(str(tmp_path / "out" / "images"))
    got = {r["url"]: r["line_number"] for r in images.collect()}
    assert got == {f"http://a.example/{i}.jpg": i + 1 for i in range(3000)}
    assert {r["split"] for r in images.select("split").distinct().collect()} == {"val"}


def test_legacy_combined_file_source_by_row_range(spark, tmp_path):
    path = tmp_path / "train_urls.txt"
    path.write_text("".join(f"http://a.example/{i}.jpg\t5:1\n" for i in range(5)))
    options = ingest.IngestOptions(imagenet_rows={"train_urls.txt": 2})
    ingest.run_ingest(spark, [str(path)], NUM_CLASSES, str(tmp_path / "out"), options)
    images = spark.read.parquet(str(tmp_path / "out" / "images"))
    sources = {r["line_number"]: r["source"] for r in images.collect()}
    assert sources == {1: "imagenet", 2: "imagenet", 3: "openimages", 4: "openimages",
                       5: "openimages"}


def test_split_must_be_known(tmp_path):
    assert ingest.infer_split("/x/val_urls_from_openimages.txt") == "val"
    assert ingest.infer_split("/x/train_image_id_from_imagenet.txt") == "train"
    assert ingest.infer_split("/x/annotations.txt", "val") == "val"
    with pytest.raises(runtime.UserError, match="--split"):
        ingest.infer_split("/x/annotations.txt")


def test_job_reports_user_mistakes_without_traceback(tmp_path, hierarchy_path, capfd, caplog):
    code = ingest_job._main(["--hierarchy", hierarchy_path, "--output", str(tmp_path / "o"),
                             str(tmp_path / "missing.txt")])
    assert code == 2
    code = ingest_job._main(["--hierarchy", str(tmp_path / "nope.txt"),
                             "--output", str(tmp_path / "o"), hierarchy_path])
    assert code == 2
    assert "Traceback" not in capfd.readouterr().err
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2
    assert "PATH_NOT_FOUND" in errors[0] and "missing.txt" in errors[0]
    assert "nope.txt" in errors[1]
    assert not os.path.exists(tmp_path / "o" / "images")


def test_wrong_hierarchy_files_and_spark_conf_are_user_errors(tmp_path, hierarchy_path, capfd,
                                                              caplog):
    binary = tmp_path / "photo.jpg"
    binary.write_bytes(b"\xff\xd8\xff\xe0 not text")
    for wrong in (binary, tmp_path):
        code = ingest_job._main(["--hierarchy", str(wrong), "--output", str(tmp_path / "o"),
                                 hierarchy_path])
        assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "not UTF-8" in errors[0] and "photo.jpg" in errors[1 - 1]
    assert "Is a directory" in errors[1]
    with pytest.raises(SystemExit) as exit_info:
        ingest_job._main(["--spark-conf", "spark.sql.shuffle.partitions", "--hierarchy",
                          hierarchy_path, "--output", str(tmp_path / "o"), hierarchy_path])
    assert exit_info.value.code == 2
    err = capfd.readouterr().err
    assert "expected KEY=VALUE" in err and "Traceback" not in err

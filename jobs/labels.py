"""Labels: add every ancestor of each label (hierarchy closure join) and count images per class."""
import sys

from mlimages import config, labels, runtime


def _main(argv=None) -> int:
    parser = runtime.job_parser(
        "labels", __doc__,
        "--ingest runs/x/ingest --hierarchy dictionary_and_semantic_hierarchy.txt "
        "--output runs/x/labels")
    parser.add_argument("--ingest", required=True, help="output folder of the ingest job")
    parser.add_argument("--hierarchy", required=True, help="dictionary_and_semantic_hierarchy.txt")
    parser.add_argument("--output", required=True, help="output folder (Parquet tables)")
    args = parser.parse_args(argv)

    def body(spark, profile):
        options = config.section(profile, "labels", labels.LabelsOptions)
        labels.run_labels(spark, args.ingest, args.hierarchy, args.output, options)

    return runtime.run("labels", args, body)


def main() -> int:
    return _main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

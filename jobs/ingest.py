"""Ingest: parse ML-Images annotation files into images, labels and quarantine Parquet tables."""
import sys

from mlimages import config, hierarchy, ingest, runtime


def _main(argv=None) -> int:
    parser = runtime.job_parser(
        "ingest", __doc__,
        "--hierarchy dictionary_and_semantic_hierarchy.txt --output runs/x/ingest "
        "train_urls.txt")
    parser.add_argument("inputs", nargs="+", help="annotation files, folders or globs")
    parser.add_argument("--hierarchy", required=True, help="dictionary_and_semantic_hierarchy.txt")
    parser.add_argument("--output", required=True, help="output folder (Parquet tables)")
    parser.add_argument("--split", choices=("train", "val"),
                        help="split of files whose name does not say it")
    args = parser.parse_args(argv)

    def body(spark, profile):
        classes = hierarchy.load_hierarchy(args.hierarchy)
        options = config.section(profile, "ingest", ingest.IngestOptions)
        ingest.run_ingest(spark, args.inputs, len(classes), args.output, options, args.split)

    return runtime.run("ingest", args, body)


def main() -> int:
    return _main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

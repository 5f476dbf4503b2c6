"""Import upstream TFRecord shards (tfrecord.py output) into the Petastorm dataset layout."""
import sys

from mlimages import config, dataset, runtime, tfrecords


def _main(argv=None) -> int:
    parser = runtime.job_parser(
        "import_tfrecords", __doc__,
        "--train 'data/tfrecords/train/*.tfrecords' --num-classes 11166 --output runs/x/dataset")
    parser.add_argument("--train", help="folder or glob of training shards")
    parser.add_argument("--val", help="folder or glob of validation shards")
    parser.add_argument("--output", required=True, help="output folder (one dataset per split)")
    parser.add_argument("--num-classes", type=int, default=11166,
                        help="length of the dense float32 label (default: %(default)s)")
    parser.add_argument("--source", default="openimages", choices=("openimages", "imagenet"),
                        help="value of the source column (default: %(default)s)")
    args = parser.parse_args(argv)
    sources = {split: pattern for split, pattern in (("train", args.train), ("val", args.val))
               if pattern}
    if not sources:
        parser.error("give --train and/or --val")

    def body(spark, profile):
        options = config.section(profile, "dataset", dataset.DatasetOptions)
        tfrecords.import_tfrecords(spark, sources, args.output, args.num_classes, options,
                                   args.source)

    return runtime.run("import_tfrecords", args, body)


def main() -> int:
    return _main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

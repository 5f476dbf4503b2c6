"""Command line of the training stage.

  horovodrun -np 2 -H localhost:2 --gloo python -m mlimages.train pretrain \\
      --config conf/train/pretrain.yaml data.train_url=/data/mlimages run.max_steps=100
  horovodrun -np 2 ... python -m mlimages.train finetune --config conf/train/finetune.yaml \\
      finetune.pretrained=runs/pretrain
  python -m mlimages.train classify --model runs/finetune --images list.txt
  python -m mlimages.train extract-features --model runs/pretrain --images folder/ \\
      --output features.parquet
  python -m mlimages.train extract-features --model runs/pretrain --dataset /data/mlimages \\
      --output features/          (distributed with Spark)

Overrides are ``section.key=value`` (values parsed as YAML), applied after the config file.
"""
import argparse
import json
import logging
import os
import sys

import mlimages.train  # noqa: F401  (Keras 2 before TensorFlow)
from mlimages import runtime
from mlimages.config import ConfigError

log = logging.getLogger("mlimages.train")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlimages.train", description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("pretrain", "multi-label pre-training (run with horovodrun)"),
                       ("finetune", "single-label fine-tuning (run with horovodrun)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", default="", help="YAML file (e.g. conf/train/*.yaml)")
        sub.add_argument("--resume", action="store_true",
                         help="continue from the latest checkpoint in run.model_dir")
        sub.add_argument("overrides", nargs="*", metavar="section.key=value")
    sub = commands.add_parser("classify", help="top-k classes of an image list or folder")
    sub.add_argument("--model", required=True, help="training output folder or checkpoint")
    sub.add_argument("--images", required=True, help="image list file or folder")
    sub.add_argument("--top-k", type=int, default=5)
    sub.add_argument("--image-size", type=int, default=224)
    sub.add_argument("--dictionary", default="", help="class names file (default: by model)")
    sub.add_argument("--output", default="label_pred.txt", help="upstream-style text result")
    sub.add_argument("--json", default="", help="JSON result (default: OUTPUT with .json)")
    sub = commands.add_parser("extract-features", help="2048-d features to Parquet")
    sub.add_argument("--model", required=True)
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image list file or folder")
    source.add_argument("--dataset", help="Petastorm dataset URL (distributed with Spark)")
    sub.add_argument("--output", required=True, help="Parquet file (images) or folder (dataset)")
    sub.add_argument("--image-size", type=int, default=224)
    sub.add_argument("--batch-size", type=int, default=16)
    sub.add_argument("--profile", default="local", help="Spark profile for --dataset")
    return parser


def _train(args) -> dict:
    from mlimages.train import config

    if args.command == "pretrain":
        from mlimages.train.pretrain import run_pretrain
        return run_pretrain(config.load(config.PretrainConfig, args.config, args.overrides),
                            args.resume)
    from mlimages.train.finetune import run_finetune
    return run_finetune(config.load(config.FinetuneConfig, args.config, args.overrides),
                        args.resume)


def _classify(args) -> dict:
    from mlimages.train import classify

    results = classify.classify(args.model, args.images, args.top_k, args.image_size,
                                dictionary=args.dictionary)
    classify.write_label_pred(results, args.output)
    json_path = args.json or os.path.splitext(args.output)[0] + ".json"
    classify.write_json(results, json_path)
    failed = sum(bool(r.error) for r in results)
    log.info("classified %d images (%d failed): %s, %s", len(results) - failed, failed,
             args.output, json_path)
    return {"images": len(results), "failed": failed}


def _extract(args) -> dict:
    from mlimages.train import features

    if args.images:
        return features.extract_images(args.model, args.images, args.output, args.image_size,
                                       args.batch_size)
    from mlimages import config, spark

    profile = config.load_profile(args.profile)
    args.master, args.spark_conf = config.spark_master(profile), []
    with spark.session_from_args(args, "mlimages-features", config.spark_conf(profile)) as ss:
        return features.extract_dataset(ss, args.model, args.dataset, args.output,
                                        args.image_size, args.batch_size)


def _rank() -> int:
    return int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Horovod: only rank 0 logs at INFO; the others report warnings and errors.
    level = args.log_level if _rank() == 0 else "WARNING"
    runtime.setup_logging(level)
    try:
        if args.command in ("pretrain", "finetune"):
            result = _train(args)
        elif args.command == "classify":
            result = _classify(args)
        else:
            result = _extract(args)
    except (*runtime.USER_ERRORS, ConfigError) as err:
        log.error("%s failed: %s", args.command, err)
        return 2
    if _rank() == 0:
        print(json.dumps(result, sort_keys=True, default=float))
    return 0


def main() -> int:
    return _main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

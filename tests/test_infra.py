"""infra/: container images, Kubernetes manifests and the MinIO compose file, checked by parsing.

Nothing here can be built or deployed on the build machines (no container engine, no cluster),
so each manifest is checked against the repository: the job scripts and arguments it runs are
accepted by the real job parsers, the profiles and training configs it names exist and load,
its images are built by a Dockerfile in infra/docker, and the Dockerfiles copy files that exist.
"""
import glob
import importlib
import os
import re
import subprocess

import pyspark
import pytest
import yaml

from mlimages import config, runtime
from mlimages.train import config as train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")
IMAGE_ROOT = "/opt/mlimages/"  # where the Dockerfiles put the repository
MANIFESTS = sorted(glob.glob(os.path.join(INFRA, "k8s", "*.yaml")))
DOCKERFILES = sorted(p for p in glob.glob(os.path.join(INFRA, "docker", "Dockerfile.*"))
                     if not p.endswith(".dockerignore"))
SPARK_JOBS = {"ingest", "labels", "download", "dataset", "stats"}


def documents(path):
    with open(path, encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def of_kind(kind):
    return [(path, doc) for path in MANIFESTS for doc in documents(path) if doc["kind"] == kind]


def repo_path(image_path: str) -> str:
    """The repository file behind a path inside the image (``local:///opt/mlimages/x``)."""
    path = image_path.removeprefix("local://")
    assert path.startswith(IMAGE_ROOT), path
    return os.path.join(ROOT, path.removeprefix(IMAGE_ROOT))


def built_images() -> dict:
    """image tag -> Dockerfile, from each Dockerfile's ``docker build -f <it> -t <tag>`` line."""
    images = {}
    for dockerfile in DOCKERFILES:
        with open(dockerfile, encoding="utf-8") as handle:
            text = handle.read()
        rel = os.path.relpath(dockerfile, ROOT)
        tags = re.findall(rf"docker build -f {re.escape(rel)} -t (\S+) \.", text)
        assert len(tags) == 1, f"{rel}: document its build command with one -t tag"
        images[tags[0]] = dockerfile
    return images


def parsed_job_args(job: str, argv, monkeypatch):
    """The arguments as the job's own parser reads them (the job body is not run)."""
    seen = {}

    def capture(name, args, body):
        seen["args"] = args
        return 0

    monkeypatch.setattr(runtime, "run", capture)
    module = importlib.import_module(f"mlimages_jobs.{job}")
    assert module._main(list(argv)) == 0
    return seen["args"]


def mounts(pod: dict) -> set:
    return {m["mountPath"] for m in pod.get("volumeMounts", [])}


def check_local_paths(path, spec, job: str, args) -> None:
    """Local paths in the arguments lie on mounted volumes: on the driver for the files only
    the driver reads or writes (hierarchy, stats report), on the executors too for the rest."""
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for pod in (spec["driver"], spec["executor"]):
        assert {m["name"] for m in pod.get("volumeMounts", [])} <= volumes, path
    driver_only = {"hierarchy"} | ({"output"} if job == "stats" else set())
    for name, value in vars(args).items():
        if not isinstance(value, str) or not value.startswith("/") or name == "profile":
            continue
        pods = [spec["driver"]] + ([] if name in driver_only else [spec["executor"]])
        for pod in pods:
            assert any(value.startswith(m + "/") for m in mounts(pod)), f"{path}: {value}"


def test_every_manifest_parses_and_has_a_kind():
    assert MANIFESTS and DOCKERFILES
    kinds = [doc["kind"] for path in MANIFESTS for doc in documents(path)]
    assert {"SparkApplication", "MPIJob", "ServiceAccount"} <= set(kinds)
    for path in MANIFESTS:
        for doc in documents(path):
            assert doc.get("apiVersion") and doc["metadata"]["name"], path


def test_spark_applications_run_existing_jobs_with_valid_arguments(monkeypatch):
    apps = of_kind("SparkApplication")
    jobs = {os.path.basename(doc["spec"]["mainApplicationFile"])[:-3] for _, doc in apps}
    assert jobs == SPARK_JOBS
    images = built_images()
    for path, doc in apps:
        spec = doc["spec"]
        script = repo_path(spec["mainApplicationFile"])
        assert os.path.exists(script), f"{path}: no {script}"
        assert spec["image"] in images, f"{path}: image {spec['image']} has no Dockerfile"
        assert images[spec["image"]].endswith("Dockerfile.spark")
        assert spec["type"] == "Python" and spec["sparkVersion"] == pyspark.__version__
        job = os.path.basename(script)[:-3]
        args = parsed_job_args(job, spec["arguments"], monkeypatch)
        profile_file = repo_path(args.profile)
        profile = config.load_profile(profile_file)  # exists, and is valid YAML
        assert os.path.dirname(profile_file) == config.CONF_DIR
        assert args.master.startswith("k8s://")
        check_local_paths(path, spec, job, args)
        # The profile's executor sizing is what the job applies: the manifest must agree.
        conf = config.spark_conf(profile)
        executor = spec["executor"]
        assert str(executor["cores"]) == conf["spark.executor.cores"], path
        assert executor["memory"] == conf["spark.executor.memory"], path
        assert executor["memoryOverhead"] == conf["spark.executor.memoryOverhead"], path


def test_training_job_runs_horovodrun_on_an_existing_config():
    from mlimages.train.__main__ import _parser

    (path, job), = of_kind("MPIJob")
    assert job["apiVersion"] == "kubeflow.org/v2beta1"
    replicas = job["spec"]["mpiReplicaSpecs"]
    launcher = replicas["Launcher"]["template"]["spec"]["containers"][0]
    worker = replicas["Worker"]["template"]["spec"]["containers"][0]
    images = built_images()
    for container in (launcher, worker):
        assert images[container["image"]].endswith("Dockerfile.train")
    assert launcher["command"] == ["horovodrun"]
    args = launcher["args"]
    ranks = int(args[args.index("-np") + 1])
    assert ranks == replicas["Worker"]["replicas"] * job["spec"]["slotsPerWorker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == job["spec"]["slotsPerWorker"]
    start = args.index("python")
    assert args[start:start + 3] == ["python", "-m", "mlimages.train"]
    importlib.import_module("mlimages.train.__main__")
    command = _parser().parse_args(args[start + 3:])
    cls = {"pretrain": train_config.PretrainConfig,
           "finetune": train_config.FinetuneConfig}[command.command]
    loaded = train_config.load(cls, repo_path(command.config), command.overrides)
    assert loaded.data.train_url.startswith("s3://")


def dockerfile_lines(dockerfile):
    """Instructions with their continuation lines joined."""
    with open(dockerfile, encoding="utf-8") as handle:
        text = re.sub(r"\\\n", " ", handle.read())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=os.path.basename)
def test_dockerfiles_copy_existing_files_and_pinned_requirements(dockerfile):
    lines = dockerfile_lines(dockerfile)
    assert lines[0].startswith(("FROM", "ARG"))
    copied = []
    for line in lines:
        if line.startswith("COPY") and "--from" not in line:
            *sources, _target = line.split()[1:]
            copied += sources
    for source in copied:
        assert os.path.exists(os.path.join(ROOT, source)), f"{dockerfile}: COPY {source}"
    requirement_files = [s for s in copied if s.startswith("requirements/")]
    assert "requirements/base.txt" in requirement_files
    text = " ".join(lines)
    for name in requirement_files:  # every copied requirement file is used after the COPY
        assert text.count(name) >= 2, f"{dockerfile}: {name} copied but not used"
    ignore = dockerfile + ".dockerignore"
    with open(ignore, encoding="utf-8") as handle:
        allowed = {line.strip().strip("!").rstrip("/") for line in handle
                   if line.startswith("!")}
    for source in copied:  # the build context keeps what the Dockerfile copies
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
    assert "python3.11" in text or "python:3.11" in text


def test_train_image_builds_horovod_like_the_local_recipe():
    (train,) = [d for d in DOCKERFILES if d.endswith("Dockerfile.train")]
    text = " ".join(dockerfile_lines(train))
    with open(os.path.join(INFRA, "build_horovod.sh"), encoding="utf-8") as handle:
        recipe = handle.read()
    version = re.search(r'HOROVOD_VERSION="\$\{HOROVOD_VERSION:-([0-9.]+)\}"', recipe).group(1)
    assert f"ARG HOROVOD_VERSION={version}" in text
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in text
    patch = r"sed -i '/xla_mpi_ops\.cc/d'"
    assert patch in recipe and patch in text
    # TensorFlow: the version of the CPU stack, read from the same requirement file.
    with open(os.path.join(ROOT, "requirements", "train.txt"), encoding="utf-8") as handle:
        assert re.search(r"^tensorflow-cpu==2\.21\.", handle.read(), re.M)
    assert "sed -n 's/^tensorflow-cpu==//p' requirements/train.txt" in text


def test_spark_image_entrypoint_and_scripts_are_valid_shell():
    scripts = glob.glob(os.path.join(INFRA, "docker", "*.sh")) + [
        os.path.join(INFRA, "build_horovod.sh")]
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True)
        assert os.access(script, os.X_OK), f"{script} is not executable"
    (spark,) = [d for d in DOCKERFILES if d.endswith("Dockerfile.spark")]
    text = " ".join(dockerfile_lines(spark))
    assert 'ENTRYPOINT ["/opt/spark-entrypoint.sh"]' in text
    assert "openjdk-17" in text and "pip install --no-cache-dir --no-deps -e ." in text


def test_compose_creates_the_profile_bucket_on_minio():
    (compose,) = documents(os.path.join(INFRA, "compose.yaml"))
    services = compose["services"]
    assert services["minio"]["image"].split(":")[0].endswith("minio/minio")
    assert "healthcheck" in services["minio"]
    init = services["create-bucket"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    bucket = config.load_profile("cluster")["store"]["bucket"]
    assert init["environment"]["BUCKET"] == bucket
    assert "mc mb --ignore-existing" in " ".join(init["command"])
    # Only loopback ports: a local S3 with default credentials must not face the network.
    assert all(port.startswith("127.0.0.1:") for port in services["minio"]["ports"])

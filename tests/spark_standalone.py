"""A real Spark standalone cluster on 127.0.0.1, started from the pyspark distribution itself.

The pip wheel of pyspark has ``bin/spark-class`` but not the ``sbin/start-*.sh`` scripts, so the
master and workers are started as ``spark-class org.apache.spark.deploy.{master.Master,
worker.Worker}``, each in its own process group: stopping a group also ends the executors and
Python workers it launched. Ports are chosen free at start; logs and work dirs live in a folder
the caller gives. Also used by ``bench/cluster.py``.

Executors and the driver run a *clean* interpreter (:func:`clean_python`): the project's
virtual environment without its editable install of ``mlimages``, so a job that works proves the
``--py-files`` zip is what the cluster imports.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile

import pyspark

SPARK_HOME = os.path.dirname(os.path.abspath(pyspark.__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_zip(target: str) -> str:
    """``mlimages.zip`` as ``make dist`` builds it: the package, without caches."""
    package = os.path.join(ROOT, "mlimages")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder, dirs, files in os.walk(package):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    archive.write(path, os.path.relpath(path, ROOT))
    return target


def clean_python(folder: str) -> str:
    """A venv whose only packages are the project venv's site-packages, read through a ``.pth``
    line: ``.pth`` files inside that folder are not processed, so the editable install of
    ``mlimages`` is not active and the package can come only from ``--py-files``."""
    python = os.path.join(folder, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True)
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                               "'purelib'))"], check=True, capture_output=True, text=True)
        with open(os.path.join(site.stdout.strip(), "project_venv.pth"), "w") as handle:
            handle.write(sysconfig.get_path("purelib") + "\n")
    return python


def submit_env(python: str, conf_dir: str) -> dict:
    """Environment for spark-submit: the clean interpreter, loopback, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYSPARK_GATEWAY_PORT")}
    env.update(SPARK_HOME=SPARK_HOME, SPARK_LOCAL_IP="127.0.0.1", SPARK_CONF_DIR=conf_dir,
               PYSPARK_PYTHON=python, PYSPARK_DRIVER_PYTHON=python,
               PYTHONDONTWRITEBYTECODE="1")
    return env


class StandaloneCluster:
    """A master and ``workers`` workers of ``cores`` cores; a context manager that stops all."""

    def __init__(self, folder: str, workers: int = 2, cores: int = 1, memory: str = "1g"):
        self.folder = str(folder)
        self.workers, self.cores, self.memory = workers, cores, memory
        self.port, self.webui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.conf_dir = os.path.join(self.folder, "conf")  # empty: no spark-defaults.conf
        self.log_dir = os.path.join(self.folder, "logs")
        self._procs = []

    def worker_dir(self, index: int) -> str:
        return os.path.join(self.folder, f"worker-{index}")

    def _env(self, index=None) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(SPARK_HOME=SPARK_HOME, SPARK_LOCAL_IP="127.0.0.1",
                   SPARK_CONF_DIR=self.conf_dir, SPARK_LOG_DIR=self.log_dir)
        if index is not None:
            env["SPARK_WORKER_DIR"] = self.worker_dir(index)
        return env

    def _launch(self, name: str, args, env) -> None:
        log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
        proc = subprocess.Popen([os.path.join(SPARK_HOME, "bin", "spark-class"), *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self._procs.append((name, proc))

    def state(self) -> dict:
        """The master's status page as JSON (workers, apps)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.webui_port}/json/",
                                    timeout=5) as response:
            return json.load(response)

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}: {self.log_tail(name)}")
            try:
                if ready(self.state()):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as handle:
            return handle.read()[-chars:]

    def start(self, timeout: float = 180) -> "StandaloneCluster":
        for path in (self.conf_dir, self.log_dir):
            os.makedirs(path, exist_ok=True)
        try:
            self._launch("master", ["org.apache.spark.deploy.master.Master", "--host",
                                    "127.0.0.1", "--port", str(self.port), "--webui-port",
                                    str(self.webui_port)], self._env())
            self._wait(lambda s: s.get("status") == "ALIVE", "master", timeout)
            for index in range(self.workers):
                os.makedirs(self.worker_dir(index), exist_ok=True)
                self._launch(f"worker-{index}", [
                    "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                    "--cores", str(self.cores), "--memory", self.memory,
                    "--work-dir", self.worker_dir(index), "--webui-port", str(free_port()),
                    self.url], self._env(index))
            self._wait(lambda s: s.get("aliveworkers") == self.workers, "workers", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminates each process group (master, workers and their executors), then kills."""
        for _, proc in self._procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.time() + 20
        for _, proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # stragglers: executors, Python daemons
            proc.wait()
        self._procs = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def submit(self, script: str, args, py_files: str, python: str, log_path: str,
               extra=(), timeout: float = 600) -> subprocess.CompletedProcess:
        """``spark-submit --master <this cluster> --py-files <zip> script args``."""
        cmd = [os.path.join(SPARK_HOME, "bin", "spark-submit"), "--master", self.url,
               "--py-files", py_files, "--driver-memory", "1g",
               "--conf", "spark.ui.enabled=false", *extra, script, *args]
        with open(log_path, "wb") as log:
            return subprocess.run(cmd, env=submit_env(python, self.conf_dir), stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, cwd=self.folder)

    def executor_dirs(self) -> dict:
        """app id -> sorted worker indexes that ran an executor for it."""
        apps = {}
        for index in range(self.workers):
            for app in os.listdir(self.worker_dir(index)):
                if app.startswith("app-"):
                    apps.setdefault(app, []).append(index)
        return {app: sorted(workers) for app, workers in apps.items()}


def _signal_group(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass

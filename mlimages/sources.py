"""Where the upstream sample files come from.

Looked up in order: ``$MLIMAGES_SAMPLE_DIR``, the ``shared/data/ml-images`` folder beside the
repository, then a cache folder filled from the upstream repository's public download location
(``$MLIMAGES_SAMPLE_BASE_URL`` overrides it, for mirrors and tests).
"""
import logging
import os
import shutil
import tempfile
import urllib.request

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SAMPLE_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "ml-images")
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "mlimages", "ml-images")
PUBLIC_BASE_URL = "https://github.com/Tencent/tencent-ml-images/raw/master/data"

HIERARCHY = "dictionary_and_semantic_hierarchy.txt"
TRAIN_URLS_TINY = "train_urls_tiny.txt"
IMAGENET_DICTIONARY = "imagenet2012_dictionary.txt"
SAMPLE_PHOTOS = tuple(f"images/im_{i}.jpg" for i in range(4))


def _local_dirs():
    override = os.environ.get("MLIMAGES_SAMPLE_DIR")
    return [d for d in (override, SHARED_SAMPLE_DIR, CACHE_DIR) if d]


def _download(name: str, target: str) -> None:
    base = os.environ.get("MLIMAGES_SAMPLE_BASE_URL", PUBLIC_BASE_URL).rstrip("/")
    url = f"{base}/{name}"
    log.info("fetching %s", url)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sample_file(name: str) -> str:
    """Returns a local path to upstream sample file ``name``, fetching it when needed."""
    for folder in _local_dirs():
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    target = os.path.join(CACHE_DIR, name)
    try:
        _download(name, target)
    except OSError as err:
        raise FileNotFoundError(
            f"{name} is not in {_local_dirs()[:-1]} and could not be fetched ({err}); "
            f"set MLIMAGES_SAMPLE_DIR to a folder holding the upstream data/ files") from None
    return target

"""Run profiles: YAML files in ``conf/`` holding Spark settings and per-stage options.

``conf/local.yaml`` is the embedded default (local Spark, local folders); ``conf/cluster.yaml``
shows the settings that matter on a cluster. Each stage reads its own section into a typed
dataclass, so an unknown or misspelt key is an error rather than a silently ignored setting.
"""
import dataclasses
import logging
import os

import yaml

log = logging.getLogger(__name__)

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
DEFAULT_PROFILE = "local"
SECTIONS = ("spark", "ingest", "labels", "download", "store", "stats", "dataset")


class ConfigError(ValueError):
    """A profile or option is invalid; the message names the file, key and allowed values."""


def profile_path(name_or_path: str) -> str:
    """Resolves a profile name (``local``, ``cluster``) or a path to a YAML file."""
    if os.path.exists(name_or_path):
        return name_or_path
    candidate = os.path.join(CONF_DIR, f"{name_or_path}.yaml")
    if os.path.exists(candidate):
        return candidate
    known = sorted(f[:-5] for f in os.listdir(CONF_DIR) if f.endswith(".yaml"))
    raise ConfigError(f"no profile {name_or_path!r}: give a YAML path or one of {known}")


def load_profile(name_or_path: str = DEFAULT_PROFILE) -> dict:
    """Reads a profile; returns a dict of sections (``spark``, ``ingest``, ...)."""
    path = profile_path(name_or_path)
    with open(path, encoding="utf-8") as handle:
        try:
            profile = yaml.safe_load(handle) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(profile, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(profile) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    profile["_path"] = path
    return profile


def section(profile: dict, name: str, cls):
    """Builds dataclass ``cls`` from section ``name`` of ``profile``, rejecting unknown keys."""
    values = dict(profile.get(name) or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        where = profile.get("_path", "profile")
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} in section {name!r}; allowed: {sorted(fields)}")
    return cls(**values)


def _spark_value(value) -> str:
    # YAML reads `true` as a Python bool; Spark expects the lower-case word.
    return str(value).lower() if isinstance(value, bool) else str(value)


def spark_conf(profile: dict) -> dict:
    """The ``spark.conf`` mapping of a profile, values as Spark expects them (strings)."""
    spark = profile.get("spark") or {}
    return {key: _spark_value(value) for key, value in (spark.get("conf") or {}).items()}


def spark_master(profile: dict):
    return (profile.get("spark") or {}).get("master")

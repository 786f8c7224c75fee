"""The store builder's config: reading and validating it (`load_config`, `validate_config`).

Config (JSON), file patterns relative to ``<root>/<subject>/`` (``*`` wildcards allowed)::

    {"groups": {
        "dwi": {"type": "volume", "files": ["dwi.nii.gz"], "standardization": "independent",
                "mask": "mask.nii.gz", "dtype": "float32"},
        "bundles": {"type": "streamlines", "files": ["*.trk"], "reference": "dwi.nii.gz",
                    "step_size": 1.0, "dps_keys": ["bundle"]}},
     "subjects": {"train": ["sub-01", "sub-02"], "valid": ["sub-03"], "test": []}}

docs/builder.md documents every key, its default and its meaning. Errors are `ConfigError`
naming the key and what was expected (with a suggestion for a misspelt key).
`tractrain.data.builder.build_store` builds the store a config describes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tractrain.data.format import SPLITS, is_plain_name
from tractrain.errors import ConfigError

TOP_KEYS = ("groups", "subjects")
STANDARDIZATION = ("all", "independent", "per_file", "none")
VOLUME_KEYS = {"type", "files", "standardization", "mask", "dtype"}
STREAMLINE_KEYS = {"type", "files", "reference", "step_size", "compress", "dps_keys",
                   "allow_outside"}
DTYPES = ("float32", "float16")


def _suggest(name: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(path: str | os.PathLike) -> dict:
    """Read and validate a JSON builder config; raise `ConfigError` naming the problem."""
    return validate_config(read_json(path), str(path))


def read_json(path: str | os.PathLike):
    """The JSON document in ``path``; `ConfigError` if missing, not UTF-8 or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} "
                          f"column {err.colno})") from None
    return config


def validate_config(config, where: str = "config") -> dict:
    """Check the builder config's structure; return it unchanged."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object with keys 'groups' and 'subjects'")
    for key in TOP_KEYS:
        if key not in config:
            raise ConfigError(f"{where}: missing key {key!r}")
    unknown = set(config) - set(TOP_KEYS)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"{where}: unknown key {name!r}{_suggest(name, TOP_KEYS)}")
    groups = config["groups"]
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{where}: 'groups' must be a non-empty object")
    for name, group in groups.items():
        at = f"{where}: groups.{name}"
        if not is_plain_name(name):
            raise ConfigError(f"{at}: a group name must be a plain name (non-empty, no '/', "
                              "not '.' or '..')")
        if not isinstance(group, dict):
            raise ConfigError(f"{at}: expected an object")
        kind = group.get("type")
        if kind not in ("volume", "streamlines"):
            raise ConfigError(f"{at}.type: expected 'volume' or 'streamlines', got {kind!r}")
        allowed = VOLUME_KEYS if kind == "volume" else STREAMLINE_KEYS
        for key in group:
            if key not in allowed:
                raise ConfigError(f"{at}: unknown key {key!r}{_suggest(key, allowed)}")
        files = group.get("files")
        if isinstance(files, str):
            group["files"] = files = [files]
        if not isinstance(files, list) or not files or not all(
                isinstance(f, str) for f in files):
            raise ConfigError(f"{at}.files: expected a non-empty list of file patterns")
        for key in ("mask", "reference"):  # one file pattern each
            if group.get(key) is not None and not isinstance(group[key], str):
                raise ConfigError(f"{at}.{key}: expected one file pattern (a string), got "
                                  f"{group[key]!r}")
        if kind == "volume":
            mode = group.setdefault("standardization", "none")
            if mode not in STANDARDIZATION:
                raise ConfigError(f"{at}.standardization: unknown mode {mode!r} "
                                  f"(expected one of {', '.join(STANDARDIZATION)})")
            dtype = group.setdefault("dtype", "float32")
            if dtype not in DTYPES:
                raise ConfigError(f"{at}.dtype: expected one of {DTYPES}, got {dtype!r}")
        else:
            for key in ("step_size", "compress"):
                value = group.get(key)
                if value is not None and (not isinstance(value, int | float) or value <= 0):
                    raise ConfigError(f"{at}.{key}: expected a positive number (mm), got {value!r}")
            if not isinstance(group.get("allow_outside", False), bool):
                raise ConfigError(f"{at}.allow_outside: expected true or false")
            keys = group.get("dps_keys")
            if keys is not None and (not isinstance(keys, list) or not all(
                    isinstance(k, str) for k in keys)):
                raise ConfigError(f"{at}.dps_keys: expected a list of data-per-streamline names")
            if group.get("step_size") and group.get("compress"):
                raise ConfigError(f"{at}: set either 'step_size' or 'compress', not both")
    subjects = config["subjects"]
    if not isinstance(subjects, dict) or not subjects:
        raise ConfigError(f"{where}: 'subjects' must map splits {list(SPLITS)} to subject lists")
    seen: dict[str, str] = {}
    for split, ids in subjects.items():
        if split not in SPLITS:
            raise ConfigError(f"{where}: subjects.{split}: unknown split{_suggest(split, SPLITS)} "
                              f"(expected {', '.join(SPLITS)})")
        if not isinstance(ids, list) or not all(isinstance(s, str) for s in ids):
            raise ConfigError(f"{where}: subjects.{split}: expected a list of subject ids")
        for subject in ids:
            if not is_plain_name(subject):
                raise ConfigError(f"{where}: subjects.{split}: {subject!r} is not a subject "
                                  "folder name (non-empty, no '/', not '.' or '..')")
            if subject in seen:
                raise ConfigError(f"{where}: subject {subject!r} is listed in both "
                                  f"{seen[subject]!r} and {split!r}")
            seen[subject] = split
    if not seen:
        raise ConfigError(f"{where}: 'subjects' lists no subject")
    return config

"""dwi_ml's builder input (the JSON group config of ``dwiml_create_hdf5_dataset`` and its
train/valid/test subject-list files) translated to tractrain's builder config (`translate`).

dwi_ml's group keys (its ``hdf5_creation.py``): ``type`` and ``files`` for every group;
``standardization`` (required) and ``std_mask`` for volumes; ``dps_keys`` (default: none kept)
and the connectivity keys for streamlines. They map to ``type``, ``files``,
``standardization``, ``mask`` and ``dps_keys``; streamline groups get the first file of the
first volume group as ``reference`` (dwi_ml's reference grid). Connectivity keys have no
place in a store and are refused, like unknown keys, with one line naming them. Subject
files are read as dwi_ml reads them: ids separated by white space, possibly none.

Differences that remain (docs/coming-from-dwi_ml.md): tractrain writes zeros outside the
standardization mask (dwi_ml standardizes every voxel with the in-mask statistics), and
without ``std_mask`` takes its statistics over voxels with *any* non-zero feature (dwi_ml:
*all* features non-zero).
"""

from __future__ import annotations

from pathlib import Path

from tractrain.data.build_config import validate_config
from tractrain.data.format import SPLITS
from tractrain.errors import ConfigError

VOLUME_KEYS = ("type", "files", "standardization", "std_mask")
STREAMLINE_KEYS = ("type", "files", "dps_keys")
CONNECTIVITY_KEYS = ("connectivity_matrix", "connectivity_nb_blocs", "connectivity_labels")
MAX_LIST_BYTES = 16 * 2**20


def is_dwi_ml_config(config: object) -> bool:
    """True for a dwi_ml group config: a non-empty object of groups, each with a ``type``,
    and no tractrain ``groups``/``subjects`` keys."""
    return (isinstance(config, dict) and bool(config) and "groups" not in config
            and "subjects" not in config
            and all(isinstance(g, dict) and "type" in g for g in config.values()))


def read_subject_list(path: str | Path, flag: str) -> list[str]:
    """Subject ids in the text file ``path`` (separated by white space; may be empty)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: subject list not found ({flag})")
    if path.stat().st_size > MAX_LIST_BYTES:
        raise ConfigError(f"{path}: too large for a subject list ({flag})")
    try:
        return path.read_bytes().decode("utf-8").split()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}; {flag})") from None


def _files(value: object, at: str) -> list[str]:
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ConfigError(f"{at}.files: expected a file name or a non-empty list of them")
    return files


def _group(name: str, group: dict, where: str) -> dict:
    at = f"{where}: {name}"
    kind = group.get("type")
    if kind not in ("volume", "streamlines"):
        raise ConfigError(f"{at}.type: expected 'volume' or 'streamlines', got {kind!r}")
    allowed = VOLUME_KEYS if kind == "volume" else STREAMLINE_KEYS
    unknown = sorted(set(group) - set(allowed))
    connectivity = [k for k in unknown if k in CONNECTIVITY_KEYS]
    if connectivity:
        raise ConfigError(f"{at}: dwi_ml keys {connectivity} not supported (a tractrain store "
                          "holds no connectivity data; remove them)")
    if unknown:
        raise ConfigError(f"{at}: unknown dwi_ml keys {unknown} (a {kind} group takes "
                          f"{', '.join(allowed)})")
    files = _files(group.get("files"), at)
    if kind == "streamlines":
        keys = group.get("dps_keys", [])
        keys = [keys] if isinstance(keys, str) else keys
        return {"type": kind, "files": files, "dps_keys": keys}
    if "standardization" not in group:
        raise ConfigError(f"{at}: missing 'standardization' (dwi_ml requires one of all, "
                          "independent, per_file, none)")
    out = {"type": kind, "files": files, "standardization": group["standardization"]}
    mask = group.get("std_mask")
    if mask is not None and group["standardization"] != "none":  # dwi_ml ignores it for none
        masks = [mask] if isinstance(mask, str) else mask
        if not isinstance(masks, list) or len(masks) != 1 or not isinstance(masks[0], str):
            raise ConfigError(f"{at}.std_mask: expected one mask file (tractrain takes one "
                              f"mask pattern; merge the masks), got {mask!r}")
        out["mask"] = masks[0]
    return out


def translate(groups: object, subjects: dict[str, list[str]], where: str = "config") -> dict:
    """tractrain's builder config (validated) for dwi_ml's group config ``groups`` and
    ``subjects`` ``{split: ids}`` read from its subject-list files."""
    if not is_dwi_ml_config(groups):
        raise ConfigError(f"{where}: not a dwi_ml group config (expected an object mapping "
                          "group names to objects with 'type' and 'files')")
    out = {name: _group(name, group, where) for name, group in groups.items()}
    volumes = [g for g in out.values() if g["type"] == "volume"]
    for group in out.values():
        if group["type"] == "streamlines" and volumes:
            group["reference"] = volumes[0]["files"][0]
    return validate_config({"groups": out, "subjects": {k: subjects.get(k, []) for k in SPLITS}},
                           where)

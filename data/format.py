"""Store format v1: names and schema checks shared by the builder and the reader.

See docs/store-format.md for the layout.
"""

from __future__ import annotations

from tractrain.data.errors import StoreError

FORMAT_NAME = "tractrain-store"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
STREAMLINE_ARRAYS = ("points", "offsets", "lengths", "lengths_mm")
ROOT_KEYS = ("format", "version", "subjects", "splits", "volume_groups", "streamline_groups",
             "provenance")


def check_root_attrs(attrs: dict, path: str) -> None:
    """Raise `StoreError` unless ``attrs`` are the root attributes of a v1 store."""
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(
            f"{path}: not a tractrain store (root attribute 'format' is "
            f"{attrs.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    version = attrs.get("version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {version!r} is not supported "
            f"(this tractrain reads version {FORMAT_VERSION})"
        )
    missing = [k for k in ROOT_KEYS if k not in attrs]
    if missing:
        raise StoreError(f"{path}: root attributes {missing} missing (store format v1)")
    splits = attrs["splits"]
    if not isinstance(splits, dict) or set(splits) - set(SPLITS):
        raise StoreError(f"{path}: root attribute 'splits' must map {list(SPLITS)} to lists")
    subjects = set(attrs["subjects"])
    for name, ids in splits.items():
        unknown = sorted(set(ids) - subjects)
        if unknown:
            raise StoreError(f"{path}: split {name!r} lists subjects {unknown} not in 'subjects'")

"""docs/builder.md documents every key of the builder config (and of dwi_ml's, translated),
each with a default and a meaning, and no key the builder does not take; the config refuses
what the doc rules out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tractrain.data import build_config, dwi_ml_config
from tractrain.errors import ConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "builder.md"


def _tables() -> dict[str, list[list[str]]]:
    """Rows (cells) of the first table under each ``## heading`` of the doc."""
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif heading and line.startswith("|") and not re.fullmatch(r"[|\-\s]+", line):
            tables.setdefault(heading, []).append([c.strip() for c in line.strip("|")
                                                   .split("|")])
    return {name: rows[1:] for name, rows in tables.items()}  # without the header row


def _keys(rows: list[list[str]]) -> set[str]:
    return {m.group(1) for row in rows for m in [re.fullmatch(r"`(\w+)`", row[0])] if m}


def test_every_builder_key_is_documented_with_default_and_meaning():
    tables = _tables()
    expected = {"Top level": set(build_config.TOP_KEYS),
                "Volume group (`\"type\": \"volume\"`)": build_config.VOLUME_KEYS,
                "Streamline group (`\"type\": \"streamlines\"`)": build_config.STREAMLINE_KEYS}
    for heading, keys in expected.items():
        rows = tables[heading]
        assert _keys(rows) == set(keys), heading
        for row in rows:
            assert len(row) == 3 and row[1] and row[2], row  # a default and a meaning
    text = DOC.read_text()
    for value in (*build_config.STANDARDIZATION, *build_config.DTYPES, *build_config.SPLITS):
        assert f"`\"{value}\"`" in text or f"`{value}`" in text, value


def test_every_dwi_ml_key_has_its_translation():
    rows = _tables()["A dwi_ml group config, translated"]
    documented = {k for row in rows for k in re.findall(r"`(\w+)`", row[0])}
    assert documented == {*dwi_ml_config.VOLUME_KEYS, *dwi_ml_config.STREAMLINE_KEYS,
                          *dwi_ml_config.CONNECTIVITY_KEYS}


def test_config_refuses_what_the_doc_rules_out():
    def config(group_name="tracts", subject="s1", **keys):
        return {"groups": {group_name: {"type": "streamlines", "files": ["*.trk"], **keys}},
                "subjects": {"train": [subject]}}

    for bad, fragment in ((config(subject="../elsewhere"), "'../elsewhere' is not a subject"),
                          (config(group_name="a/b"), "groups.a/b: a group name must be"),
                          (config(reference=["dwi.nii.gz"]), "groups.tracts.reference: expected "
                                                             "one file pattern")):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            build_config.validate_config(bad, "c.json")
    volume = {"groups": {"dwi": {"type": "volume", "files": ["dwi.nii.gz"], "mask": ["m.nii"]}},
              "subjects": {"train": ["s1"]}}
    with pytest.raises(ConfigError, match=r"groups\.dwi\.mask: expected one file pattern"):
        build_config.validate_config(volume, "c.json")

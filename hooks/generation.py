"""`GenerationValidation`: every K epochs, track from validation seeds and score the endpoints.

A fixed set of validation streamlines is drawn once (from ``seed``, stratified by subject and
bundle). Each is resampled to
``step_mm``; its first ``seed_points`` points warm the model's recurrent state up (teacher
forcing, `tractrain.generation.tracker.continue_tracks`), then the model tracks on alone. The hook
writes into ``trainer.state.metrics``:

- ``gen_endpoint_dist``: mean distance (mm) between generated and reference last points;
- ``gen_within``: share of streamlines ending within ``within_mm`` of the reference end;
- ``gen_length``: mean length (mm) of the generated streamlines (prefix included).

On the other epochs the three values are NaN (an empty cell in the logs; a NaN never improves
a monitored metric and counts as an epoch without improvement for `Patience`). Attach it like
a producer: after the Validation hook, before BestModel, Patience and NpyLogs. Any of the three
can be monitored (``BestModel(..., metric="gen_endpoint_dist")``; ``gen_within`` with
``mode="max"``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from ignite.engine import Engine, Events

from tractrain.data.augment import resample
from tractrain.data.interpolation import InputConfig
from tractrain.data.split_index import split_index
from tractrain.data.store import expand_ranges
from tractrain.data.valid_sample import store_strata, stratified_sample
from tractrain.errors import CheckpointError, ConfigError
from tractrain.generation.field import subject_field
from tractrain.generation.scores import endpoint_scores
from tractrain.generation.tracker import continue_tracks
from tractrain.util import unwrap

METRICS = ("gen_endpoint_dist", "gen_within", "gen_length")


class GenerationValidation:
    """Track from the first points of fixed validation streamlines every ``every`` epochs.

    Args:
        model: the trained module, implementing the generation contract of
            `tractrain.generation.tracker` (``init_state``, ``step``); wrappers are unwrapped.
        store: an open `Store`; group: its streamline group; inputs: the training inputs.
        every: run at epochs ``every``, ``2 * every``, ...
        n_streamlines: how many validation streamlines (fewer if the split has fewer).
        seed_points: prefix points fed to the model before it tracks alone (>= 1).
        step_mm: tracking step (use the training ``step_size``).
        max_length_mm: length limit; default 1.5 x the longest selected reference.
        within_mm: radius of ``gen_within``.
        split: store split to draw from; seed: seed of the draw.
        max_angle_deg: optional curvature limit; device: default the model's device;
        mask_group: volume group of the tracking mask (default: non-zero input voxels).
    """

    def __init__(self, model: torch.nn.Module, store, group: str, inputs: InputConfig, *,
                 every: int = 1, n_streamlines: int = 100, seed_points: int = 5,
                 step_mm: float = 1.0, max_length_mm: float | None = None,
                 within_mm: float = 5.0, split: str = "valid", seed: int = 0,
                 max_angle_deg: float | None = None, device: torch.device | str | None = None,
                 mask_group: str | None = None) -> None:
        for name, value in (("every", every), ("n_streamlines", n_streamlines),
                            ("seed_points", seed_points)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"GenerationValidation {name}: expected an integer >= 1, "
                                  f"got {value!r}")
        for name, value in (("step_mm", step_mm), ("within_mm", within_mm),
                            ("max_length_mm", max_length_mm)):
            if value is not None and not (isinstance(value, int | float)
                                          and math.isfinite(value) and value > 0):
                raise ConfigError(f"GenerationValidation {name}: expected a number > 0, "
                                  f"got {value!r}")
        if group not in store.streamline_groups:
            raise ConfigError(f"GenerationValidation group {group!r}: the store has "
                              f"{sorted(store.streamline_groups)}")
        if not store.splits.get(split):
            raise ConfigError(f"GenerationValidation split {split!r}: no subjects in the store's "
                              f"split (have {sorted(k for k, v in store.splits.items() if v)})")
        self.model, self.store, self.group, self.inputs = model, store, group, inputs
        self.every, self.n_streamlines, self.seed_points = every, n_streamlines, seed_points
        self.step_mm, self.within_mm = float(step_mm), float(within_mm)
        self.max_length_mm = max_length_mm
        self.split, self.seed, self.max_angle_deg = split, int(seed), max_angle_deg
        self.device, self.mask_group = device, mask_group
        self.selection: list[tuple[str, np.ndarray]] | None = None
        self.last: dict | None = None

    # -- the fixed validation set ---------------------------------------------------------
    def select(self) -> list[tuple[str, np.ndarray]]:
        """The fixed ``[(subject, sorted ids), ...]``, drawn once from ``seed``: a sample
        stratified by subject and bundle (`tractrain.data.valid_sample`).

        Only streamlines longer than the prefix (``seed_points`` steps) are candidates."""
        if self.selection is None:
            full = split_index(self.store, self.split, self.group)
            long_enough = tuple(np.flatnonzero((n >= 2) & (mm > self.seed_points * self.step_mm))
                                for n, mm in zip(full.lengths, full.lengths_mm, strict=True))
            pool = full.subset(long_enough)
            if pool.counts.sum() == 0:
                raise ConfigError(f"GenerationValidation: no {self.split} streamline of "
                                  f"{self.group!r} is longer than {self.seed_points} steps of "
                                  f"{self.step_mm} mm")
            chosen = stratified_sample(pool, self.n_streamlines, self.seed,
                                       store_strata(self.store, pool))
            self.selection = [(s, np.sort(ids)) for s, ids in
                              zip(chosen.subjects, chosen.ids, strict=True) if ids.size]
        return self.selection

    def _prefixes(self, subject: str, ids: np.ndarray):
        """(prefix points, prefix lengths, reference last points, reference lengths mm)."""
        points, lengths = self.store.gather(subject, self.group, ids)
        vs = self.store.streamline_info(subject, self.group)["voxel_sizes"]
        ends = points[np.cumsum(lengths) - 1]
        res_points, res_lengths = resample(points, lengths, self.step_mm, vs)
        k = np.minimum(res_lengths, self.seed_points)
        starts = np.cumsum(res_lengths) - res_lengths
        take = expand_ranges(starts, k)
        ref_mm = self.store.streamline_index(subject, self.group).lengths_mm[ids]
        return (torch.from_numpy(res_points[take]), torch.from_numpy(k.astype(np.int64)),
                torch.from_numpy(ends), ref_mm)

    # -- running -------------------------------------------------------------------------
    def _device(self, model: torch.nn.Module) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        param = next(model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def evaluate(self) -> dict[str, float]:
        """Track from the fixed seeds now; returns the three metrics (model left in its mode)."""
        model = unwrap(self.model)
        device = self._device(model)
        was_training = model.training
        model.eval()
        parts: dict[str, list[np.ndarray]] = {"dist": [], "within": [], "length": []}
        try:
            prepared = [(s, self._prefixes(s, ids)) for s, ids in self.select()]
            limit = self.max_length_mm
            if limit is None:
                limit = 1.5 * max(float(np.max(p[3])) for _, p in prepared)
            for subject, (points, lengths, ends, _) in prepared:
                field = subject_field(self.store, subject, self.group, self.inputs, device,
                                      self.mask_group)
                tracks = continue_tracks(model, field, points, lengths, step_mm=self.step_mm,
                                         max_length_mm=limit, max_angle_deg=self.max_angle_deg)
                affine = self.store.streamline_info(subject, self.group)["affine"]
                for key, value in endpoint_scores(tracks, ends, affine, self.within_mm).items():
                    parts[key].append(value)
        finally:
            model.train(was_training)
        values = {k: np.concatenate(v) for k, v in parts.items()}
        return {"gen_endpoint_dist": float(values["dist"].mean()),
                "gen_within": float(values["within"].mean()),
                "gen_length": float(values["length"].mean())}

    def attach(self, trainer: Engine) -> GenerationValidation:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        return self

    def _on_epoch_completed(self, trainer: Engine) -> None:
        epoch = int(trainer.state.epoch)
        if epoch % self.every == 0:
            self.last = {"epoch": epoch, **self.evaluate()}
            trainer.state.metrics.update({k: self.last[k] for k in METRICS})
        else:
            trainer.state.metrics.update(dict.fromkeys(METRICS, math.nan))

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The fixed selection (so a resumed run scores the same streamlines) and last result."""
        selection = None if self.selection is None else [
            [s, ids.tolist()] for s, ids in self.selection]
        return {"selection": selection, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        selection = state.get("selection")
        if selection is not None:
            try:
                self.selection = [(str(s), np.asarray(ids, dtype=np.int64))
                                  for s, ids in selection]
            except (TypeError, ValueError) as err:
                message = f"GenerationValidation state: bad selection ({err})"
                raise CheckpointError(message) from None
        self.last = None if state.get("last") is None else dict(state["last"])

"""Turn a resolved option dict (see `tractrain.bin.options`) into a training run.

This is all `tractrain-train` and `tractrain-resume` do beyond parsing: open the store, build
samplers and loaders, import the user's model and loss, then call `train_and_validate`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from tractrain.bin.options import (
    DEMO_LOSS,
    DEMO_MODEL,
    DEMO_MODEL_CONFIG,
    check_monitor,
    comet_mode,
    tracker_list,
)
from tractrain.data.augment import AugmentConfig
from tractrain.data.batch import DeviceInputs
from tractrain.data.dataloader import make_dataloader
from tractrain.data.interpolation import InputConfig, neighborhood_size, num_input_features
from tractrain.data.packing import SamplerConfig
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import split_index
from tractrain.data.store import open_store
from tractrain.data.valid_sample import (
    coverage,
    describe,
    sample_size,
    store_strata,
    stratified_sample,
)
from tractrain.engine.contract import ZeroInputsCheck
from tractrain.engine.distributed import get_rank, get_world_size, local_rank
from tractrain.engine.fit import train_and_validate
from tractrain.engine.optim import lr_for_epoch, make_optimizer, parse_lr_schedule
from tractrain.engine.rng import seed_everything, set_deterministic
from tractrain.errors import ConfigError
from tractrain.imports import import_object

# The demo dataset: 4 phantom subjects (2 train, 1 valid, 1 test), built in a few seconds.
DEMO_PHANTOM = {"n_subjects": 4, "streamlines_per_subject": 300, "seed": 0}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tractrain"


def demo_cache(config: dict) -> Path:
    """The absolute folder where a run without ``store`` caches the demo phantom store."""
    return (Path(config["cache_dir"]) if config.get("cache_dir") else default_cache_dir()).resolve()


def recorded_store(config: dict, exp_dir: Path, store: str | None = None) -> str:
    """The store that the experiment ``exp_dir`` (options ``config``) trained on, for commands
    that only read it (eval, track): ``store`` (their ``--store``) if given, else the recorded
    store, else the demo phantom's in the recorded cache, which is found, never built."""
    if store is not None:
        if not Path(store).exists():
            raise ConfigError(f"--store {store}: no such store")
        return store
    if config.get("store") is not None:
        if not Path(config["store"]).exists():
            raise ConfigError(f"{exp_dir}: its store {config['store']} is gone; if it moved, "
                              "pass --store PATH")
        return config["store"]
    from tractrain.data.phantom import demo_store_paths

    cache = demo_cache(config)
    path = demo_store_paths(cache, **DEMO_PHANTOM)[1]
    if not path.exists():
        raise ConfigError(
            f"{exp_dir}: trained on the demo phantom store, no longer cached in {cache}; "
            f"rebuild it with 'tractrain-train --cache-dir {cache} --name NEW --max-epochs 1' "
            "(any run without --store builds it), or pass --store PATH")
    return str(path)


def open_run_store(config: dict):
    """The configured store, or the demo phantom's (built and cached on first use)."""
    lazy, budget = bool(config["lazy"]), int(config["cache_gb"] * 2**30)
    if config["store"] is None:
        from tractrain.data.phantom import demo_store

        cache = demo_cache(config)
        print(f"demo: phantom store cached under {cache}", flush=True)
        store = demo_store(cache, **DEMO_PHANTOM)
        return open_store(store.path, lazy=lazy, cache_bytes=budget)
    path = Path(config["store"])
    if not path.exists():
        raise ConfigError(f"--store {path}: no such store")
    return open_store(path, lazy=lazy, cache_bytes=budget)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and get_world_size() > 1:
        name = f"cuda:{local_rank()}"  # one GPU per process
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


MAX_NEIGHBORHOOD_POINTS = 10_000


def check_options(config: dict) -> None:
    """Validate option values that no component checks by itself (before any training)."""
    if config["max_epochs"] is None or config["max_epochs"] < 1:
        raise ConfigError(f"max_epochs: expected >= 1, got {config['max_epochs']}")
    parse_lr_schedule(config["lr"])
    lr_for_epoch(config["lr"], 1)
    check_monitor(config)
    run_precision(config)
    cap, nproc = config.get("max_batches_valid"), config.get("nproc_per_node") or 1
    if cap is not None and nproc > 1 and cap < nproc:  # a process would have no batch
        raise ConfigError(f"--max-batches-valid {cap} with --nproc-per-node {nproc}: every "
                          f"process needs a validation batch; use {nproc} or more")
    trackers, comet = tracking(config)
    from tractrain.hooks.trackers import check_available

    check_available(trackers)
    if comet is not None and comet["online"]:
        from tractrain.hooks.comet import import_comet

        import_comet()
        from comet_ml.config import get_api_key, get_config

        if not get_api_key(None, get_config()):
            raise ConfigError("--comet online: no Comet API key is configured (set "
                              "COMET_API_KEY or api_key in ~/.comet.config), or use --comet "
                              "auto/offline")
    points = neighborhood_size(input_config(config))
    if points > MAX_NEIGHBORHOOD_POINTS:
        raise ConfigError(
            f"--neighborhood {config.get('neighborhood')} --radius-mm {config.get('radius_mm')} "
            f"--resolution-mm {config.get('resolution_mm')}: {points} points per streamline "
            f"point (limit {MAX_NEIGHBORHOOD_POINTS}); use a smaller radius or a coarser "
            "resolution")


def tracking(config: dict) -> tuple[list[str], dict | None]:
    """``(trackers, comet)``: the ``--trackers`` list and the `CometLogger` keywords (None:
    Comet off). ``--trackers comet`` with ``--comet off`` means auto. Old experiments recorded
    ``comet: true/false``, read as auto/off."""
    trackers = tracker_list(config.get("trackers") or [])
    mode = comet_mode(config.get("comet") or False)
    if mode == "off" and "comet" in trackers:
        mode = "auto"
    if mode == "off":
        return trackers, None
    online = {"auto": None, "online": True, "offline": False}[mode]
    return trackers, {"project_name": config.get("comet_project") or "tractrain",
                      "workspace": config.get("comet_workspace"),
                      "experiment_name": config["name"], "online": online}


def run_training(config: dict, exp_dir: Path, resume: bool = False):
    """Build everything from ``config`` and train (or resume) in ``exp_dir``."""
    check_options(config)
    set_deterministic(bool(config.get("deterministic")))  # before CUDA starts
    seed_everything(config["seed"])  # before anything draws, the model's factory included
    model_factory = import_object(config["model"], "model")
    loss_fn = import_object(config["loss"], "loss")
    store = open_run_store(config)
    group = config["group"]
    if group not in store.streamline_groups:
        raise ConfigError(f"--group {group!r}: the store has streamline groups "
                          f"{sorted(store.streamline_groups)}")
    if config["volume_group"] not in store.volume_groups:
        raise ConfigError(f"--volume-group {config['volume_group']!r}: the store has volume "
                          f"groups {sorted(store.volume_groups)}")
    rank, world = get_rank(), get_world_size()
    device = resolve_device(config["device"])
    train_sampler = BatchSampler(
        split_index(store, "train", group), sampler_config(config, config["max_batches_train"]),
        seed=config["seed"], rank=rank, world_size=world, drop_uneven=world > 1)
    augment, inputs = augment_config(config), input_config(config)
    prepare = device_inputs(store, config)  # refuses volumes over device_cache_gb now
    train_loader = make_dataloader(store, train_sampler, augment=augment,
                                   **feeding(config, device))
    valid_loader = None
    if store.splits.get("valid"):
        full = split_index(store, "valid", group)  # read once, with its strata
        strata = store_strata(store, full)
        valid_loader = eval_loader(store, config,
                                   validation_index(store, group, config, full, strata),
                                   max_batches=config["max_batches_valid"], rank=rank,
                                   world_size=world, device=device)
        if rank == 0:
            coverage_line = valid_coverage(store, group, valid_loader.sampler, full, strata)
            print(f"validation: {coverage_line}", flush=True)
    check_monitor(config, has_valid=valid_loader is not None)  # before the first epoch
    first = store.splits["train"][0]
    n_inputs = num_input_features(store.volume_groups[config["volume_group"]]["n_features"],
                                  inputs, store.volume_info(first, inputs.volume_group)
                                  ["voxel_sizes"])
    model_config = {**factory_config(config), "n_inputs": n_inputs}
    if config.get("torch_seed") is not None:
        torch.manual_seed(config["torch_seed"])
    model = model_factory(model_config)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"--model {config['model']!r}: returned {type(model).__name__}, "
                          "expected a torch.nn.Module")
    model.to(device)
    optimizer = make_optimizer(model.parameters(), config["optimizer"],
                               lr=lr_for_epoch(config["lr"], 1),
                               weight_decay=config["weight_decay"])
    trackers, comet = tracking(config)
    trainer = train_and_validate(
        model, optimizer, loss_fn, train_loader, valid_loader=valid_loader, exp_dir=exp_dir,
        max_epochs=config["max_epochs"], device=device, precision=run_precision(config),
        clip_grad_norm=config["clip_grad_norm"], lr_schedule=config["lr"],
        nan_policy=config["nan_policy"], patience=config["patience"],
        min_delta=config["min_delta"], monitor=config["monitor"],
        monitor_mode=config.get("monitor_mode", "min"), config=config,
        producers=generation_hooks(config, model, store, group, inputs, device),
        model_config={**model_config, "factory": config["model"]}, comet=comet,
        progress=config["progress"], checkpoint_every=config["checkpoint_every"],
        resume=resume, prepare_batch=prepare, resume_hint=f"tractrain-resume {exp_dir}",
        log_every=config.get("log_every"), batch_check=zero_inputs_check(config, store),
        keep_checkpoints=config.get("keep_checkpoints") or 0,
        trackers=trackers,
    )
    if config["loss"] == DEMO_LOSS and valid_loader is not None and world == 1:
        from tractrain.examples.next_direction import baselines

        trainer.state.baselines = baselines(valid_loader)  # same points as valid_loss
    return trainer


def zero_inputs_check(config: dict, store) -> ZeroInputsCheck | None:
    """The first-batch check that stops a run on mostly all-zero inputs (None when
    ``allow_zero_inputs``)."""
    if config.get("allow_zero_inputs"):
        return None
    return ZeroInputsCheck(hint=f"check the store with 'tractrain-store-info {store.path} "
                                "--check', or pass --allow-zero-inputs true to train anyway")


def factory_config(config: dict) -> dict:
    """The ``model_config`` given, else the demo's default for the demo model, else ``{}``."""
    if config["model_config"] is not None:
        return dict(config["model_config"])
    return dict(DEMO_MODEL_CONFIG) if config["model"] == DEMO_MODEL else {}


def validation_index(store, group: str, config: dict, full=None, strata=None):
    """The valid split's index; when validation is capped (``max_batches_valid``,
    ``valid_fraction``) a fixed sample of it, seeded by ``seed`` and stratified by subject and
    bundle (`tractrain.data.valid_sample`): the same streamlines at every epoch and resume.
    ``full`` / ``strata``: the valid split's index and strata, if already read."""
    full = split_index(store, "valid", group) if full is None else full
    cap, fraction = config["max_batches_valid"], config.get("valid_fraction")
    if cap is None and fraction is None:
        return full
    max_cost = None if cap is None else cap * float(config["batch_size"])
    size = sample_size(full, fraction=fraction, max_cost=max_cost, units=config["batch_units"])
    strata = store_strata(store, full) if strata is None else strata
    return stratified_sample(full, size, config["seed"], strata)


def valid_coverage(store, group: str, sampler: BatchSampler, full=None, strata=None) -> str:
    """One line: the share of the valid split that the sampler's (fixed) epoch evaluates
    (``full`` / ``strata`` as for `validation_index`)."""
    full = split_index(store, "valid", group) if full is None else full
    strata = store_strata(store, full) if strata is None else strata
    seen: dict[str, list] = {s: [np.empty(0, np.int64)] for s in full.subjects}
    for batch in sampler.batches(0):
        for subject, ids in batch:
            seen[subject].append(ids)
    positions = tuple(np.sort(np.concatenate(seen[s])) for s in full.subjects)
    line = describe(coverage(full.subset(positions), full, strata))
    whole = all(p.size == n for p, n in zip(positions, full.counts.tolist(), strict=True))
    return line + ("" if whole else f" (fixed sample, seed {sampler.seed})")


def input_config(config: dict) -> InputConfig:
    """The `InputConfig` of a run's options (``neighborhood: none`` is no neighbourhood)."""
    neighborhood = config.get("neighborhood")
    return InputConfig(config["volume_group"],
                       neighborhood=None if neighborhood in (None, "none") else neighborhood,
                       radius_mm=config.get("radius_mm") or 0.0,
                       resolution_mm=config.get("resolution_mm"),
                       outside=config.get("outside") or "zeros")


def augment_config(config: dict) -> AugmentConfig:
    """The training augmentation of a run's options."""
    return AugmentConfig(step_size=config["step_size"], compress=config["compress"],
                         split_ratio=config["split_ratio"], reverse_ratio=config["reverse_ratio"],
                         noise_mm=config["noise_mm"], noise_truncation=config["noise_truncation"])


def sampler_config(config: dict, max_batches: int | None) -> SamplerConfig:
    """The batch budget of a run's options, with at most ``max_batches`` per epoch."""
    return SamplerConfig(batch_size=config["batch_size"], units=config["batch_units"],
                         subjects_per_batch=config["subjects_per_batch"],
                         cycles=config["cycles"], max_batches=max_batches)


def feeding(config: dict, device: torch.device | None = None) -> dict:
    """`make_dataloader` keywords shared by the training and evaluation loaders; batches are
    pinned if ``pin_memory``, by default when ``device`` is a GPU."""
    pin = config.get("pin_memory")
    if pin is None:
        pin = device is not None and torch.device(device).type == "cuda"
    return {"group": config["group"], "inputs": input_config(config),
            "num_workers": config["num_workers"], "interpolate": config["interpolate"],
            "persistent_workers": config["num_workers"] > 0, "pin_memory": bool(pin)}


def run_precision(config: dict) -> str:
    """``precision``, or ``16-mixed`` for the older ``amp: true`` (its alias)."""
    from tractrain.engine.precision import resolve_precision

    amp, precision = bool(config.get("amp")), config.get("precision")
    try:
        return resolve_precision(precision, amp)
    except ConfigError:
        raise ConfigError(f"--amp true is --precision 16-mixed; it contradicts --precision "
                          f"{precision}: give one of them") from None


def eval_loader(store, config: dict, index, *, max_batches: int | None = None, rank: int = 0,
                world_size: int = 1, device: torch.device | None = None):
    """The validation loader of a run over ``index`` (a `SplitIndex`): the run's inputs and
    batch budget, deterministic augmentation, fixed order (no shuffle)."""
    budget = sampler_config(config, max_batches)
    if world_size > 1:  # every rank computes the same count, so all refuse together
        total = BatchSampler(index, budget, seed=config["seed"], shuffle=False).epoch_length()
        if total < world_size:
            raise ConfigError(
                f"validation: {total} batch(es) for {world_size} processes, and every process "
                f"needs one: raise --max-batches-valid to {world_size} or more, or use fewer "
                "processes")
    sampler = BatchSampler(index, budget, seed=config["seed"], shuffle=False, rank=rank,
                           world_size=world_size)
    return make_dataloader(store, sampler, augment=augment_config(config).deterministic(),
                           **feeding(config, device))


def device_inputs(store, config: dict) -> DeviceInputs | None:
    """The ``prepare_batch`` of ``interpolate: device`` runs (None otherwise); refuses a
    training or validation volume larger than ``device_cache_gb``."""
    if config["interpolate"] != "device":
        return None
    used = [s for split in ("train", "valid") for s in store.splits.get(split, ())]
    budget = float(config.get("device_cache_gb") or 2.0)
    return DeviceInputs(store, config["group"], input_config(config),
                        cache_bytes=int(budget * 2**30), subjects=used)


def generation_hooks(config: dict, model, store, group: str, inputs, device) -> tuple:
    """The generation-validation producer when ``gen_every`` is set (needs a valid split)."""
    if not config.get("gen_every"):
        return ()
    if not store.splits.get("valid"):
        raise ConfigError("--gen-every: the store has no validation subjects to track from")
    from tractrain.hooks.generation import GenerationValidation

    return (GenerationValidation(model, store, group, inputs, every=config["gen_every"],
                                 n_streamlines=config.get("gen_streamlines", 100),
                                 within_mm=config.get("gen_within_mm", 5.0),
                                 step_mm=config["step_size"] or 1.0, seed=config["seed"],
                                 device=device),)

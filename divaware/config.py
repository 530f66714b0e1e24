"""The training configuration: one schema, every default defined once, checked once before any data is read.

:class:`TrainConfig` holds every setting of a training run. Each field is declared with

* its **default** (the only one: functions below take the config object, or a value from it, never a
  default of their own; ``tests/test_config.py`` checks that no function in ``divaware/`` re-defaults a
  field);
* its **section** (``data``, ``model``, ``optimisation``, ``weighting``, ``store``, ``engine``): how
  ``config.yaml`` is laid out, and how a YAML file may nest its fields (``store: {cache: preprocessed,
  store_precision: uint8}`` is the same as the two flat keys);
* its **constraints**: ``choices``, a range (``ge``/``gt``/``le``/``lt``), a ``check`` of the value alone
  and a ``requires`` rule on the rest of the config (what the field needs to act at all).

The config is frozen and validated in ``__post_init__``: a ``TrainConfig`` that exists is valid, and a change
is a new object (``dataclasses.replace`` or :meth:`TrainConfig.with_values`), validated in turn. A setting
that cannot act in the chosen mode (``store_precision`` or ``val_patches`` without the preprocessed store,
``cache: preprocessed`` without ``patch_size``) is an error naming the field and why, not silently ignored.

Flat YAML files (``configs/*.yaml``, the ``config.yaml`` of every run folder written so far) load unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from divaware.data import CACHE_MODES, DataSpec
from divaware.losses import LOSSES, WEIGHT_NORMS, make_loss
from divaware.model import MODELS, check_model_kwargs, network_divisor
from divaware.preprocess import PRECISIONS
from divaware.runfolder import write_text
from divaware.weighting import REFRESH_SCHEDULE

SECTIONS = ("data", "model", "optimisation", "weighting", "store", "engine")
AMP_MODES = ("auto", "bf16", "off")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "poly")
SCORES = ("dice", "challenge")
MAX_LR = 1.0
"""Largest learning rate accepted: above it Adam/AdamW/SGD steps are larger than the weights themselves."""

# Fields that do not change what a run computes: they may differ when resuming (e.g. more epochs, more
# loader workers, another machine) and are ignored when checking a run folder against a config.
OPERATIONAL_FIELDS = frozenset({
    "epochs", "num_workers", "progress", "cache", "cache_dir", "cache_max_gb", "out_dir", "device", "compile",
    "cpu_threads",
})

# What a run folder written before a field existed computed: its absence in an old config.yaml means this
# value, not the current default (so resuming such a run under the new default is refused, not silent).
LEGACY_VALUES: dict[str, Any] = {"weight_norm": "batch"}

Why = str | None
"""A constraint's answer: None when satisfied, else why not (one line, appended to the field's name)."""


def _f(default: Any, doc: str, section: str, *, choices: tuple | None = None, ge: float | None = None,
       gt: float | None = None, le: float | None = None, lt: float | None = None, note: str = "",
       check: Callable[[Any], Why] | None = None, requires: Callable[[Any], Why] | None = None) -> Any:
    """A dataclass field with its documentation, section and constraints attached.

    ``choices``/``ge``/``gt``/``le``/``lt`` constrain the value (``None`` passes where the type allows it);
    ``note`` is appended to a range error; ``check(value)`` and ``requires(config)`` return why the value
    or the rest of the config does not work, or None.
    """
    assert section in SECTIONS, section
    meta = {"doc": doc, "section": section, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "note": note, "check": check, "requires": requires}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# -- checks of single values ---------------------------------------------------------------------------------


def _spacing(value: Any) -> Why:
    if value is not None and (len(value) != 3 or not all(math.isfinite(v) and v > 0 for v in value)):
        return "must be 3 positive voxel sizes in mm, or null"
    return None


def _patch_size(value: Any) -> Why:
    return "must be 3 positive sizes, or null" if value is not None and not all(v > 0 for v in value) else None


def _positive_list(value: Any) -> Why:
    return "must be positive" if any(int(c) < 1 for c in value) else None


def _lr(value: float) -> Why:
    if not value > 0:
        return "must be > 0"
    if not math.isfinite(value) or value > MAX_LR:
        return f"must be a finite number <= {MAX_LR:g} (typical: 1e-4 to 1e-2)"
    return None


def _finite_ge0(value: float) -> Why:
    return None if math.isfinite(value) and value >= 0 else "must be >= 0"


def _grad_clip(value: float | None) -> Why:
    if value is not None and not (math.isfinite(value) and value > 0):
        return "must be > 0 (a gradient-norm limit), or null for no clipping"
    return None


def _device(value: str) -> Why:
    return None if value in ("auto", "cpu") or value.startswith("cuda") else "must be auto, cpu, cuda or cuda:N"


def _hard_fraction(value: float | None) -> Why:
    return None if value is None or 0.0 < value < 1.0 else "must be between 0 and 1 (exclusive), or null"


def _disparity(value: str) -> Why:
    from divaware.synthetic import DISPARITIES

    return None if value in DISPARITIES else f"must be one of {DISPARITIES}"


def _strategy(value: str) -> Why:
    from divaware.weighting import STRATEGIES

    return None if value in STRATEGIES else f"must be one of {sorted(STRATEGIES)}"


# -- rules between fields (what a field needs to act) ---------------------------------------------------------


def _store_in_use(config: TrainConfig) -> bool:
    """Whether this run may read the preprocessed store: ``cache: preprocessed``, or ``auto`` with patch
    training (``auto`` picks the store for patch training when the cases do not fit in memory)."""
    return config.cache == "preprocessed" or (config.cache == "auto" and config.patch_size is not None)


def _no_store_why(config: TrainConfig) -> str:
    mode = f"cache: {config.cache}" + (", patch_size: null" if config.patch_size is None else "")
    return (f"acts only on the preprocessed store, which this run cannot use ({mode}); set cache: preprocessed "
            "(or auto) with a patch_size, or leave the field at its default")


def _needs_store(name: str) -> Callable[[TrainConfig], Why]:
    def rule(config: TrainConfig) -> Why:
        if getattr(config, name) == default(name) or _store_in_use(config):
            return None
        return _no_store_why(config)
    return rule


def _cache_needs_patches(config: TrainConfig) -> Why:
    if config.cache == "preprocessed" and config.patch_size is None:
        return ("the preprocessed store serves patch training: set patch_size, or choose cache auto, memory, disk "
                "or none for whole volumes")
    return None


def _loss_params(config: TrainConfig) -> Why:
    try:
        make_loss(config.loss, **config.loss_params)
    except (ValueError, TypeError) as err:
        return f"{err} (loss_params: {config.loss_params})"
    return None


def _strategy_params(config: TrainConfig) -> Why:
    from divaware.weighting import check_strategy_params

    try:  # names only: a typo must fail here, before any data is read
        check_strategy_params(config.strategy, config.strategy_params)
    except ValueError as err:
        return str(err)
    return None


def _model_kwargs(config: TrainConfig) -> Why:
    try:
        check_model_kwargs(config.model, config.model_kwargs)
    except ValueError as err:
        return str(err)
    return None


def _out_dir(config: TrainConfig) -> Why:
    try:
        config.run_dir()
    except (KeyError, IndexError, ValueError) as err:
        return f"placeholder {err} is not a config field"
    return None


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Load with :meth:`from_yaml`, save with :meth:`to_yaml`; valid once made."""

    # == data ================================================================================================
    data_root: str = _f("", "MAMA-MIA root folder; empty: $DIVAWARE_DATA, else the synthetic cohort "
                            "(generated on first use in the divaware cache with the synthetic_* settings)", "data")
    synthetic_cases: int = _f(300, "cases of the synthetic cohort used when no data_root is given", "data", ge=1)
    synthetic_seed: int = _f(0, "seed of the synthetic cohort", "data")
    synthetic_preset: str = _f("default", "preset of the synthetic cohort", "data")
    synthetic_disparity: str = _f("default", "what makes the synthetic hard subgroup hard: default, "
                                             "representation, intrinsic (irreducible), lookalike (learnable) "
                                             "or lookalike_weak (its dose control)", "data", check=_disparity)
    synthetic_counterfactual: bool = _f(False, "look-alike mechanisms: the same patients rendered without their "
                                               "lesions (the counterfactual cohort)", "data")
    synthetic_hard_fraction: float | None = _f(None, "share of hard-subgroup cases in the synthetic cohort (more "
                                                     "distinct hard patients, e.g. 0.5); null: the natural ~13 %",
                                               "data", check=_hard_fraction)
    phases: list[int] = _f([0, 1, 2], "phases loaded as channels: 0 = _0000 pre-contrast, 1 = first post-contrast, "
                                      "...", "data")
    subtraction: bool = _f(False, "add the post1 - pre subtraction image as an extra channel", "data")
    spacing: list[float] | None = _f(None, "resample to this spacing in mm (RAS order); null keeps each case's grid",
                                     "data", check=_spacing)
    crop_to_breast: bool = _f(False, "crop every case to the breast box of its patient-info JSON", "data")
    breast_margin: int = _f(0, "voxels added around the breast box when cropping", "data", ge=0)
    patch_size: list[int] | None = _f(None, "train on random patches of this size (tumour/background balanced) "
                                            "and validate by sliding window; null: whole volumes", "data",
                                      check=_patch_size)
    samples_per_case: int = _f(2, "patches drawn per loaded case (patch training only)", "data", ge=1)
    pos_fraction: float = _f(0.5, "fraction of patches centred on tumour (patch training only)", "data")
    augment: bool = _f(True, "random flips, small rotations/scaling and intensity changes while training", "data")
    affine_prob: float = _f(0.2, "probability of the random rotation/scaling per training sample", "data")
    val_fraction: float = _f(0.2, "fraction of the challenge train split held out as fairness-validation", "data",
                             gt=0.0, le=0.5, note=": the fairness-validation split is carved from the training "
                                                  "cases, and above half of them too few are left to train on")
    min_val_cases: int = _f(96, "at least this many fairness-validation cases where the cohort allows: the split "
                                "takes max(val_fraction, min_val_cases) but never more than 40 % of the cases "
                                "(see val_case_count); 0: val_fraction alone", "data", ge=0,
                            note=" (0: val_fraction alone)")
    stratify: list[str] = _f(["age_group", "menopause", "breast_density"],
                             "metadata columns the train/val split is stratified by (rare strata merged)", "data")
    attributes: list[str] = _f(["age_group", "menopause", "breast_density", "dense"],
                               "subgroup attributes: given to the weighting strategy and used for the "
                               "worst-group validation Dice (dense: BI-RADS c/d vs a/b, derived from "
                               "breast_density)", "data")
    min_group_size: int = _f(3, "validation groups smaller than this are left out of the worst-group Dice", "data",
                             ge=1, note=" (groups smaller than this are left out of the worst-group Dice)")
    # == model ===============================================================================================
    model: str = _f("unet", f"network: one of {', '.join(MODELS)}", "model")
    channels: list[int] = _f([16, 32, 64, 128, 256], "feature channels per resolution level", "model",
                             check=_positive_list)
    strides: list[int] = _f([2, 2, 2, 2], "down-sampling stride between levels", "model", check=_positive_list)
    num_res_units: int = _f(2, "residual units per block (unet; dynunet uses residual blocks if > 0)", "model")
    dropout: float = _f(0.0, "dropout probability", "model", ge=0.0, lt=1.0)
    model_kwargs: dict = _f({}, "extra keyword arguments for the MONAI network constructor", "model",
                            requires=_model_kwargs)
    # == optimisation ========================================================================================
    loss: str = _f("dice_ce", f"per-case loss: one of {', '.join(LOSSES)}", "optimisation", requires=_loss_params)
    loss_params: dict = _f({}, "extra loss parameters, e.g. {gamma: 2.0, lambda_dice: 1.0, lambda_other: 1.0}",
                           "optimisation")
    epochs: int = _f(20, "training epochs (may be raised when resuming)", "optimisation", ge=1)
    batch_size: int = _f(4, "cases per batch (times samples_per_case patches in patch training)", "optimisation",
                         ge=1)
    lr: float = _f(1e-3, "learning rate", "optimisation", check=_lr)
    weight_decay: float = _f(1e-5, "weight decay", "optimisation", check=_finite_ge0)
    optimizer: str = _f("adamw", f"optimiser: one of {', '.join(OPTIMIZERS)}", "optimisation", choices=OPTIMIZERS)
    scheduler: str = _f("cosine", "learning-rate schedule over `schedule_epochs`: constant, cosine or poly "
                                  "(exponent 0.9)", "optimisation", choices=SCHEDULERS)
    schedule_epochs: int | None = _f(None, "epochs the lr schedule spans; null: the run's `epochs` at its first "
                                           "start, kept when a resumed run raises `epochs` (epochs past the "
                                           "schedule keep its final lr); set it to plan a longer run",
                                     "optimisation", ge=1, note=" or null")
    grad_clip: float | None = _f(12.0, "clip the gradient norm to this; null: no clipping", "optimisation",
                                 check=_grad_clip)
    seed: int = _f(0, "seed of the split, initialisation, loader order and augmentations", "optimisation")
    # == weighting ===========================================================================================
    alpha: float = _f(0.5, "L = alpha * mean(l) + (1 - alpha) * weighted term (see weight_norm); 1 = plain ERM",
                      "weighting", ge=0.0, le=1.0)
    weight_norm: str = _f("global", "weighted term: global = sum(w l) / B with weights of training-set mean 1 "
                                    "(each case's gradient follows its weight at any batch size); batch = "
                                    "sum(w l) / sum(w) (the former form: no effect at batch size 1)", "weighting",
                          choices=WEIGHT_NORMS)
    strategy: str = _f("divaware", "weighting strategy: erm, inverse_frequency, group_dro, paper, divaware, "
                                   "febs, oracle (synthetic cohorts only)", "weighting", check=_strategy)
    strategy_params: dict = _f({}, "extra parameters of the strategy (e.g. tau, w_min, w_max, min_support; "
                                   "names are checked; defaults: divaware.weighting.DEFAULTS)", "weighting",
                               requires=_strategy_params)
    warmup_epochs: int = _f(REFRESH_SCHEDULE["warmup_epochs"], "epochs of plain training before the first weight "
                            "refresh (refreshing strategies; default: divaware.weighting.REFRESH_SCHEDULE)",
                            "weighting", ge=0)
    update_every: int = _f(REFRESH_SCHEDULE["update_every"], "epochs between weight refreshes after the warm-up",
                           "weighting", ge=1)
    score: str = _f("dice", "per-case validation score given to the strategy: dice, or challenge "
                            "(= (Dice + 1 - NormHD) / 2)", "weighting", choices=SCORES)
    # == store: caching of preprocessed cases and cheap validation on its windows ================================
    cache: str = _f("auto", "cache of preprocessed cases: auto (memory when the cases fit cache_max_gb, else "
                            "preprocessed for patch training, disk otherwise), memory, disk, none, or "
                            "preprocessed (the store shared by all runs: divaware.preprocess)", "store",
                    choices=CACHE_MODES, requires=_cache_needs_patches)
    cache_dir: str = _f("", "disk-cache folder; empty: <out_dir>/cache, or for preprocessed the shared store "
                            "($DIVAWARE_PREPROCESSED, else <divaware cache>/preprocessed); never inside the data",
                        "store")
    cache_max_gb: float = _f(2.0, "auto cache: in memory up to this many GiB, on disk beyond", "store", ge=0.0)
    store_precision: str = _f("float16", "image precision in the preprocessed store: float16 (2 bytes per phase "
                                         "and voxel) or uint8 (1 byte: per case and phase, linear over the "
                                         "non-zero range, error <= half a step)", "store", choices=PRECISIONS,
                              requires=_needs_store("store_precision"))
    val_patches: int = _f(0, "cheap validation (preprocessed cache only): score each val case on patch-size "
                             "windows covering its tumour plus this many fixed random windows; the metrics "
                             "and selection use these, refreshes and the last epoch add full sliding-window "
                             "scores (the refresh uses them); 0: full sliding window at every validation",
                          "store", ge=0, requires=_needs_store("val_patches"))
    # == engine ==============================================================================================
    device: str = _f("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N", "engine", check=_device)
    amp: str = _f("auto", "mixed precision: auto (bf16 autocast on CUDA, off on CPU), bf16 or off", "engine",
                  choices=AMP_MODES)
    compile: bool = _f(False, "torch.compile the network for training (CUDA only; minutes of compilation; "
                              "meant for patch training: whole volumes of varying size recompile per shape)",
                       "engine")
    channels_last: bool | None = _f(None, "channels_last_3d memory format; null: on for CUDA", "engine")
    deterministic: bool = _f(False, "deterministic algorithms (slower on CUDA; CPU runs are reproducible anyway)",
                             "engine")
    num_workers: int = _f(0, "data-loader worker processes (0: load in the main process)", "engine", ge=0)
    cpu_threads: int = _f(0, "torch CPU threads; 0: torch's default (use 1 on a busy shared machine, where "
                             "threads spinning against other processes slow CPU training down many times)",
                          "engine", ge=0)
    sw_overlap: float = _f(0.25, "sliding-window overlap for validation in patch training", "engine", ge=0.0,
                           lt=1.0)
    val_every: int = _f(1, "validate every this many epochs (refreshes and the last epoch always validate)",
                        "engine", ge=1)
    out_dir: str = _f("runs/{strategy}_seed{seed}", "run folder; {field} placeholders are filled from this config",
                      "engine", requires=_out_dir)
    progress: bool = _f(True, "show tqdm progress bars", "engine")

    def __post_init__(self) -> None:
        _coerce(self)
        self.validate()

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Field name -> documentation."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}

    @classmethod
    def sections(cls) -> dict[str, list[str]]:
        """Section -> its field names, in order."""
        out: dict[str, list[str]] = {s: [] for s in SECTIONS}
        for f in dataclasses.fields(cls):
            out[f.metadata["section"]].append(f.name)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from a mapping of fields, flat or nested by section (``store: {cache: ...}``); unknown keys
        raise (a typo must not silently fall back to a default)."""
        flat = flatten(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**flat)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """Load a YAML file (missing fields take their defaults), with ``overrides`` on top (e.g. the command
        line's ``--out``), validated once as a whole."""
        return cls.from_dict({**read_yaml(path), **(overrides or {})})

    def with_values(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated as a whole); unknown names raise."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as commented YAML, one block per section, each field preceded by its documentation;
        written if ``path``."""
        docs, values = self.field_docs(), self.to_dict()
        lines = ["# divaware training configuration (see divaware.config.TrainConfig)"]
        for section, names in self.sections().items():
            lines.append(f"# == {section} ==")
            for key in names:
                lines.append(f"# {docs[key]}")
                lines.append(yaml.safe_dump({key: values[key]}, default_flow_style=False, sort_keys=False).rstrip())
        text = "\n".join(lines) + "\n"
        if path is not None:
            write_text(path, text)
        return text

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first field whose value cannot work, and why: each field's
        declared constraints, then what it requires of the others. Runs once, when the config is made."""
        for f in dataclasses.fields(self):
            why = _field_problem(f, getattr(self, f.name))
            if why:
                raise ValueError(f"config field {f.name!r} = {getattr(self, f.name)!r}: {why}")
        try:
            self.data_spec()
        except ValueError as err:
            raise ValueError(f"config: {err}") from None
        for f in dataclasses.fields(self):
            rule = f.metadata.get("requires")
            why = rule(self) if rule else None
            if why:
                raise ValueError(f"config field {f.name!r} = {getattr(self, f.name)!r}: {why}")

    # -- what the run builds from it ------------------------------------------------------------------
    def divisor(self) -> int:
        return network_divisor(self.model, self.strides, **self.model_kwargs)

    def data_spec(self) -> DataSpec:
        """The data pipeline settings of this run (shared with ``predict``)."""
        return DataSpec(
            phases=tuple(self.phases), subtraction=bool(self.subtraction),
            spacing=None if self.spacing is None else tuple(self.spacing),
            crop_to_breast=bool(self.crop_to_breast), breast_margin=int(self.breast_margin),
            patch_size=None if self.patch_size is None else tuple(self.patch_size),
            samples_per_case=int(self.samples_per_case), pos_fraction=float(self.pos_fraction),
            augment=bool(self.augment), affine_prob=float(self.affine_prob), divisor=self.divisor(),
        )

    def build_model(self) -> Any:
        """The network of this run (weights freshly initialised from the global torch RNG)."""
        from divaware.model import build_model

        return build_model(self.model, in_channels=self.data_spec().in_channels, out_channels=2,
                           channels=self.channels, strides=self.strides, num_res_units=self.num_res_units,
                           dropout=self.dropout, **self.model_kwargs)

    def run_dir(self) -> Path:
        """The run folder, with ``{field}`` placeholders of ``out_dir`` filled in."""
        return Path(self.out_dir.format(**self.to_dict())).expanduser()

    def store_in_use(self) -> bool:
        """Whether this run may read the preprocessed store (``store_precision``, ``val_patches`` act there)."""
        return _store_in_use(self)


def default(name: str) -> Any:
    """The one default of field ``name``."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """Fields nested under a section name (``store: {cache: preprocessed}``) made flat; flat keys pass through.
    ``model`` is both a section and a field: a mapping is the section, a name the network."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, Mapping):
            inner = sorted(set(value) & set(flat))
            if inner:
                raise ValueError(f"config field(s) {inner} given twice (flat and in section {key!r})")
            flat.update(value)
        elif key in flat:
            raise ValueError(f"config field {key!r} given twice (flat and in a section)")
        else:
            flat[key] = value
    return flat


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a config YAML file holds; a one-line error for a missing, non-UTF-8 or invalid file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it "
                         "as UTF-8") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML ({yaml_error(err)}); fix the syntax") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value")
    return values


def yaml_error(err: Exception) -> str:
    """Where and what a YAML error is, in one line."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(err, "problem", None) or err).splitlines()[0]


def result_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that change what a run computes (all but :data:`OPERATIONAL_FIELDS`)."""
    return {k: v for k, v in values.items() if k not in OPERATIONAL_FIELDS}


def _field_problem(f: dataclasses.Field, value: Any) -> Why:
    """Why ``value`` breaks the constraints declared on field ``f`` (None: it does not)."""
    meta = f.metadata
    if value is None:
        return None  # only nullable fields hold None after _coerce
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"must be one of {meta['choices']}"
    bounds = [(meta["ge"], ">=", lambda v, b: v >= b), (meta["gt"], ">", lambda v, b: v > b),
              (meta["le"], "<=", lambda v, b: v <= b), (meta["lt"], "<", lambda v, b: v < b)]
    given = [(b, op, ok) for b, op, ok in bounds if b is not None]
    if given and not all(ok(value, b) for b, op, ok in given):  # NaN fails every comparison: refused too
        if len(given) == 2:
            (lo, lo_op, _), (hi, hi_op, _) = given
            text = f"must lie in {'[' if lo_op == '>=' else '('}{lo:g}, {hi:g}{']' if hi_op == '<=' else ')'}"
        else:
            text = f"must be {given[0][1]} {given[0][0]:g}"
        return text + meta["note"]
    return meta["check"](value) if meta["check"] else None


def _coerce(config: TrainConfig) -> None:
    """Normalise types once, at construction: YAML and Python callers hand in tuples, strings such as "1e-3"
    (PyYAML reads that as text) or ints for floats, so that comparisons between configs and the YAML round
    trip are exact. A fractional count or a boolean number is refused here, naming the field."""
    def whole(value: Any) -> int:
        # int(2.7) would silently train 2 epochs: a fractional value for a count is an error; and
        # `epochs: true` (YAML's yes/true) is a typo, not 1
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is a boolean, not a number")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        if abs(int(value)) >= 2**63:  # torch and numpy take 64-bit integers (seed: 1e20 overflowed there)
            raise ValueError(f"{value!r} is too large (at most {2**63 - 1})")
        return int(value)

    def as_list(value: Any, kind: type) -> list | None:
        if value is not None and isinstance(value, (str, bytes, int, float)):
            raise TypeError(f"{value!r} is not a list (write it as [{value}, ...])")
        return None if value is None else [(whole if kind is int else kind)(v) for v in value]

    def put(name: str, value: Any) -> None:
        object.__setattr__(config, name, value)  # the config is frozen once made

    current = ""  # the field being coerced: every type error names it
    try:
        for current, kind in (("phases", int), ("channels", int), ("strides", int), ("patch_size", int),
                              ("spacing", float), ("stratify", str), ("attributes", str)):
            put(current, as_list(getattr(config, current), kind))
        for f in dataclasses.fields(config):
            current, value = f.name, getattr(config, f.name)
            if isinstance(value, bool) and f.type in ("int", "float", "int | None", "float | None"):
                raise ValueError(f"field {f.name!r}: {value!r} is a boolean, not a number")
            if f.type == "int":
                try:
                    put(f.name, whole(value))
                except ValueError as err:
                    raise ValueError(f"field {f.name!r}: {err}") from None
            elif f.type == "float" or (f.type == "float | None" and value is not None):
                put(f.name, float(value))
            elif f.type == "int | None" and value is not None:
                put(f.name, int(value))
            elif f.type == "dict":
                put(f.name, dict(value or {}))
            elif f.type == "str":
                put(f.name, "" if value is None else str(value))
    except (TypeError, ValueError, OverflowError) as err:
        given = getattr(config, current, None)
        expected = {"int": "a whole number", "float": "a number", "int | None": "a whole number or null",
                    "float | None": "a number or null"}.get(config.__dataclass_fields__[current].type, "")
        detail = (str(err) if str(err).startswith("field ") else f"field {current!r} is null (empty)"
                  if given is None else f"field {current!r} = {given!r}: {err}")
        raise ValueError(f"config {detail}" + (f"; give {expected}" if expected else "")) from None

"""The decisive experiment: strategies x seeds on one synthetic disparity mechanism, with a large held-out test set.

One YAML file per mechanism (``configs/experiment_<mechanism>.yaml``)::

    disparity: lookalike               # the synthetic mechanism (divaware.synthetic.DISPARITIES)
    strategies: [erm, ..., oracle]     # weighting strategies compared
    arms: [counterfactual, balanced]   # data arms (ERM on another training cohort, see ARMS); optional
    seeds: [0, 1, 2, 3, 4]             # training seeds (split, initialisation, loader order)
    heldout: {cases: 800, seed: 1000}  # the held-out test cohort: same generator, another seed
    training: {epochs: 20, ...}        # TrainConfig fields shared by every run
    per_strategy: {group_dro: {alpha: 0.0}}   # TrainConfig fields for one strategy only

:func:`run_experiment` trains every (strategy, seed) into ``<out>/runs/<strategy>_seed<seed>`` and evaluates
it twice: on the **held-out cohort** (all of its cases; ``evaluation_all_heldout``), which is generated once
from the same generator and mechanism with another seed and is never seen by training, model selection or
the weights, and on the training cohort's own challenge test split (``evaluation_test``, the split that
``divaware evaluate`` uses by default). The **arms** rung a mechanism's ladder: ERM trained on another cohort
of the same size and seed, into ``<out>/runs/<arm>_seed<seed>`` --

* ``counterfactual`` (look-alike mechanisms): the same patients rendered without their lesions; evaluated on
  the held-out cohort (with lesions) and on the counterfactual held-out cohort (the same held-out patients
  without lesions; ``evaluation_all_heldout_counterfactual``): what the hard group scores without the cue;
* ``balanced``: a cohort whose hard subgroup is half of the cases (more distinct hard patients): the data
  ceiling, what more data of that group would buy.

Everything resumes: a finished run is not retrained (an interrupted
one continues from its last checkpoint), an evaluation newer than the run's checkpoint is kept, so the
sweep can be run in parts (``seeds``/``strategies`` overrides, one process per seed) and re-run to fill gaps.
``benchmarks/experiment_report.py`` turns the folders into the report.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

HELDOUT_TAG = "heldout"
HELDOUT_SPLIT = "all"
HELDOUT_CF_TAG = "heldout_counterfactual"
_KEYS = {"disparity", "strategies", "arms", "seeds", "heldout", "training", "per_strategy"}
# The data arms: ERM on another training cohort (TrainConfig overrides), and whether it needs a look-alike mechanism.
ARMS: dict[str, dict[str, Any]] = {
    "counterfactual": {"training": {"synthetic_counterfactual": True}, "lesions": True},
    "balanced": {"training": {"synthetic_hard_fraction": 0.5}, "lesions": False},
}


def load_experiment(path: str | Path) -> dict[str, Any]:
    """Read and check an experiment YAML file (see the module docstring); errors name the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"experiment config {path} not found")
    config = yaml.safe_load(path.read_text()) or {}
    return check_experiment(config, str(path))


def check_experiment(config: Mapping[str, Any], where: str = "experiment config") -> dict[str, Any]:
    """The config with defaults filled in, or a ValueError naming the bad key."""
    from divaware.synthetic import DISPARITIES, mechanism_of
    from divaware.weighting import STRATEGIES

    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: must hold a mapping")
    unknown = sorted(set(config) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected {sorted(_KEYS)}")
    cfg = {"disparity": "default", "strategies": ["erm", "oracle"], "arms": [], "seeds": [0], "heldout": {},
           "training": {}, "per_strategy": {}, **dict(config)}
    if cfg["disparity"] not in DISPARITIES:
        raise ValueError(f"{where}: disparity {cfg['disparity']!r} is not one of {DISPARITIES}")
    bad = [s for s in cfg["strategies"] if s not in STRATEGIES]
    if bad or not cfg["strategies"]:
        raise ValueError(f"{where}: strategies {bad or '[]'} not among {sorted(STRATEGIES)}")
    cfg["arms"] = [str(a) for a in (cfg["arms"] or [])]
    bad = [a for a in cfg["arms"] if a not in ARMS]
    if bad:
        raise ValueError(f"{where}: arms {bad} not among {sorted(ARMS)}")
    for arm in cfg["arms"]:
        if ARMS[arm]["lesions"] and not mechanism_of(cfg["disparity"]).has_lesions:
            raise ValueError(f"{where}: arm {arm!r} needs a look-alike mechanism (lookalike, lookalike_weak), "
                             f"not disparity {cfg['disparity']!r}; remove it from arms")
    cfg["seeds"] = [int(s) for s in cfg["seeds"]]
    held = {"cases": 800, "seed": 1000, **dict(cfg["heldout"] or {})}
    if set(held) != {"cases", "seed"}:
        raise ValueError(f"{where}: heldout takes cases and seed, got {sorted(held)}")
    cfg["heldout"] = {"cases": int(held["cases"]), "seed": int(held["seed"])}
    training = dict(cfg["training"] or {})
    for key in ("strategy", "seed", "out_dir", "synthetic_disparity", "data_root", "synthetic_counterfactual",
                "synthetic_hard_fraction"):
        if key in training:
            raise ValueError(f"{where}: training.{key} is set by the experiment itself; remove it")
    if cfg["heldout"]["seed"] == int(training.get("synthetic_seed", 0)):
        raise ValueError(f"{where}: heldout.seed equals training.synthetic_seed; the held-out cohort must be "
                         "another cohort")
    cfg["training"] = training
    per = {str(k): dict(v or {}) for k, v in dict(cfg["per_strategy"] or {}).items()}
    cfg["per_strategy"] = per
    for s in [*cfg["strategies"], *cfg["arms"]]:  # fail now on a bad field, not after hours of training
        run_config(cfg, s, cfg["seeds"][0] if cfg["seeds"] else 0, "runs/check")
    return cfg


def run_config(cfg: Mapping[str, Any], strategy: str, seed: int, out: str | Path) -> Any:
    """The :class:`~divaware.train.TrainConfig` of one run of the experiment (``strategy``: a strategy or an arm)."""
    from divaware.train import TrainConfig

    arm = ARMS.get(strategy) if strategy in cfg.get("arms", ()) else None
    values = {**cfg["training"], **(arm["training"] if arm else {}), **cfg["per_strategy"].get(strategy, {}),
              "strategy": "erm" if arm else strategy, "seed": int(seed), "synthetic_disparity": cfg["disparity"],
              "out_dir": str(Path(out) / "runs" / f"{strategy}_seed{int(seed)}")}
    return TrainConfig.from_dict(values)


def heldout_root(cfg: Mapping[str, Any], counterfactual: bool = False) -> Path:
    """The held-out test cohort of the experiment (generated once, atomically, in the divaware cache);
    ``counterfactual``: the same held-out patients without their lesions (look-alike mechanisms)."""
    from divaware.paths import ensure_synthetic

    preset = cfg["training"].get("synthetic_preset", "default")
    return ensure_synthetic(n_cases=cfg["heldout"]["cases"], seed=cfg["heldout"]["seed"], preset=preset,
                            disparity=cfg["disparity"], counterfactual=counterfactual)


def _fresh(evaluation: Path, run: Path, root: Path | None = None) -> bool:
    """An evaluation that is complete, newer than the run's selected checkpoint and (``root`` given) of that cohort.

    The held-out cohort's folder name carries the generator's version, so a changed generator re-evaluates
    every run on the new cohort instead of mixing cohorts in one report."""
    import json

    from divaware.evaluate import FILES
    from divaware.runfolder import RunFolder

    manifest, ckpt = evaluation / FILES["manifest"], RunFolder(run).best
    if not (manifest.is_file() and ckpt.is_file() and manifest.stat().st_mtime >= ckpt.stat().st_mtime):
        return False
    if root is None:
        return True
    try:
        done = json.loads(manifest.read_text()).get("data_root")
    except (ValueError, OSError):
        return False
    return done is not None and Path(done).resolve() == Path(root).resolve()


def run_experiment(config: Mapping[str, Any], out: str | Path, *, strategies: Sequence[str] | None = None,
                   seeds: Sequence[int] | None = None, challenge_test: bool = True, n_boot: int = 1000) -> Path:
    """Train and evaluate every (strategy or arm, seed) of ``config`` under ``out``; resumes (module docstring).

    ``strategies`` selects among the config's strategies and arms by name (default: all of them)."""
    from divaware import evaluate as ev
    from divaware.train import resolve_config, train

    cfg = check_experiment(config)
    names = [*cfg["strategies"], *cfg["arms"]]
    strategies = list(names if strategies is None else strategies)
    unknown = [s for s in strategies if s not in names]
    if unknown:
        raise ValueError(f"{unknown} are not strategies or arms of this experiment ({names})")
    seeds = [int(s) for s in (cfg["seeds"] if seeds is None else seeds)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the config as run, for the report (the first writer wins; a part run with overrides records the full plan)
    plan = out / "experiment.yaml"
    if not plan.is_file():
        plan.write_text(yaml.safe_dump(cfg, sort_keys=False))
    held = heldout_root(cfg)
    held_cf = heldout_root(cfg, counterfactual=True) if "counterfactual" in strategies else None
    jobs = [(s, seed) for seed in seeds for s in strategies]
    for i, (strategy, seed) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        config_ = run_config(cfg, strategy, seed, out)
        run = Path(train(resolve_config(config_), resume=True))
        targets = [(held, HELDOUT_SPLIT, HELDOUT_TAG), (None, "test", None)]
        if strategy == "counterfactual":
            targets.insert(1, (held_cf, HELDOUT_SPLIT, HELDOUT_CF_TAG))
        for root, split, tag in targets:
            if tag is None and not challenge_test:
                continue
            if not _fresh(ev.evaluation_dir(run, split, tag=tag), run, root):
                ev.evaluate(run, root, split=split, tag=tag, n_boot=n_boot, verbose=False)
        print(f"[divaware experiment] {i}/{len(jobs)} {cfg['disparity']}/{run.name} done in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return out

"""The decisive experiment: strategies x seeds on one synthetic disparity mechanism, with a large held-out test set.

One YAML file per mechanism (``configs/experiment_<mechanism>.yaml``)::

    disparity: lookalike               # the synthetic mechanism (divaware.synthetic.DISPARITIES)
    strategies: [erm, ..., oracle]     # weighting strategies compared
    arms: [counterfactual, balanced]   # data arms (ERM on another training cohort, see ARMS); optional
    seeds: [0, 1, 2, 3, 4]             # training seeds (split, initialisation, loader order)
    heldout: {cases: 800, seed: 1000}  # the held-out test cohort: same generator, another seed
    training: {epochs: 20, ...}        # TrainConfig fields shared by every run
    per_strategy: {group_dro: {alpha: 0.0}}   # TrainConfig fields for one strategy only

:func:`run_experiment` hands every (strategy or arm, seed) as one task (:func:`run_one`) to an executor; each
trains into ``<out>/runs/<strategy>_seed<seed>`` and is evaluated at its validation-selected and its last
checkpoint on the **held-out cohort** (all of its cases; ``evaluation_all_heldout``), which is generated once
from the same generator and mechanism with another seed and is never seen by training, model selection or
the weights, and (unless ``challenge_test`` is off) on the training cohort's own challenge test split (``evaluation_test``, the split that
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
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from divaware import executors

from divaware.experiment_record import HELDOUT_CF_TAG, HELDOUT_SPLIT, HELDOUT_TAG  # noqa: F401 (re-exported)

# executor, slurm: where the tasks run (divaware.executors; the command line overrides them)
_KEYS = {"disparity", "strategies", "arms", "seeds", "heldout", "training", "per_strategy", "executor", "slurm"}
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


def _fresh(evaluation: Path, run: Path, root: Path | None = None, checkpoint: str = "best") -> bool:
    """An evaluation that is complete, newer than the run's ``checkpoint`` and (``root`` given) of that cohort.

    The held-out cohort's folder name carries the generator's version, so a changed generator re-evaluates
    every run on the new cohort instead of mixing cohorts in one report."""
    import json

    from divaware.evaluate import FILES
    from divaware.runfolder import RunFolder

    manifest = evaluation / FILES["manifest"]
    try:
        ckpt = RunFolder(run).checkpoint_to_use(checkpoint)
    except ValueError:
        return False
    if not (manifest.is_file() and manifest.stat().st_mtime >= ckpt.stat().st_mtime):
        return False
    if root is None:
        return True
    try:
        done = json.loads(manifest.read_text()).get("data_root")
    except (ValueError, OSError):
        return False
    return done is not None and Path(done).resolve() == Path(root).resolve()


def run_name(strategy: str, seed: int) -> str:
    """The run folder's (and its record's) name: ``<strategy or arm>_seed<seed>``."""
    return f"{strategy}_seed{int(seed)}"


def run_one(config: Mapping[str, Any], out: str, strategy: str, seed: int, *, record: str | None = None,
            challenge_test: bool = False, n_boot: int = 200) -> dict[str, Any]:
    """One task of the experiment: train (or resume) ``strategy`` (or an arm) with ``seed``, evaluate it on the
    held-out cohort at the validation-selected and at the last checkpoint, and, with ``record``, write its small
    result files there (:mod:`divaware.experiment_record`). JSON arguments, so it runs in another process or on
    a cluster node (``module:function`` = ``divaware.experiment:run_one``). A run already recorded under
    ``record`` with the same configuration is skipped without touching ``out``. Returns a short summary."""
    from divaware import evaluate as ev
    from divaware import experiment_record as rec
    from divaware.train import resolve_config, train

    cfg = check_experiment(config)
    t0 = time.perf_counter()
    config_ = run_config(cfg, strategy, seed, out)
    if record is not None and rec.is_recorded(record, run_name(strategy, seed), config_):
        return {"run": run_name(strategy, seed), "recorded": True, "skipped": True, "seconds": 0.0}
    resolved = resolve_config(config_)
    run = Path(train(resolved, resume=True))
    from divaware.executors import job_rank

    if job_rank() > 0:  # another DDP rank of a multi-GPU cluster job trained with rank 0, which evaluates and records
        return {"run": run.name, "recorded": False, "skipped": False, "seconds": round(time.perf_counter() - t0, 1)}
    held = heldout_root(cfg)
    targets = [(held, HELDOUT_TAG)]
    if strategy == "counterfactual":
        targets.append((heldout_root(cfg, counterfactual=True), HELDOUT_CF_TAG))
    for root, tag in targets:
        for checkpoint in rec.CHECKPOINTS:
            if not _fresh(ev.evaluation_dir(run, HELDOUT_SPLIT, checkpoint, tag=tag), run, root, checkpoint):
                ev.evaluate(run, root, split=HELDOUT_SPLIT, checkpoint=checkpoint, tag=tag, n_boot=n_boot,
                            verbose=False)
    if challenge_test and not _fresh(ev.evaluation_dir(run, "test"), run):
        ev.evaluate(run, None, split="test", n_boot=n_boot, verbose=False)
    if record is not None:
        rec.record_run(run, record, mechanism=cfg["disparity"], strategy=strategy, arm=strategy in cfg["arms"],
                       seed=int(seed), config=config_, heldout=held,
                       heldout_cf=targets[1][0] if len(targets) > 1 else None, seconds=time.perf_counter() - t0)
    return {"run": run.name, "recorded": record is not None, "skipped": False,
            "seconds": round(time.perf_counter() - t0, 1)}


def experiment_tasks(config: Mapping[str, Any], out: str | Path, *, strategies: Sequence[str] | None = None,
                     seeds: Sequence[int] | None = None, record: str | Path | None = None,
                     challenge_test: bool = False, n_boot: int = 200) -> list[Any]:
    """The experiment as tasks for :mod:`divaware.parallel` (one per (strategy or arm, seed), seeds outermost)."""
    from divaware.parallel import Task

    cfg = check_experiment(config)
    names = [*cfg["strategies"], *cfg["arms"]]
    strategies = list(names if strategies is None else strategies)
    unknown = [s for s in strategies if s not in names]
    if unknown:
        raise ValueError(f"{unknown} are not strategies or arms of this experiment ({names})")
    seeds = [int(s) for s in (cfg["seeds"] if seeds is None else seeds)]
    kwargs = {"config": _jsonable_config(cfg), "out": str(out), "record": None if record is None else str(record),
              "challenge_test": bool(challenge_test), "n_boot": int(n_boot)}
    return [Task(name=f"{cfg['disparity']}/{run_name(s, seed)}", function="divaware.experiment:run_one",
                 kwargs={**kwargs, "strategy": s, "seed": seed}) for seed in seeds for s in strategies]


def _jsonable_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(dict(cfg)))


def run_experiment(config: Mapping[str, Any], out: str | Path, *, strategies: Sequence[str] | None = None,
                   seeds: Sequence[int] | None = None, record: str | Path | None = None,
                   challenge_test: bool = True, n_boot: int = 1000, jobs: int = 1,
                   executor: executors.Executor | None = None) -> Path:
    """Train and evaluate every (strategy or arm, seed) of ``config`` under ``out``; resumes (module docstring).

    ``strategies`` selects among the config's strategies and arms by name (default: all of them); ``record``:
    the folder of the small per-run result files (runs recorded there are skipped); ``jobs`` > 1 runs that
    many tasks at a time, one process each (:func:`divaware.parallel.run_parallel`); ``executor`` (e.g.
    :class:`divaware.executors.SlurmExecutor`: one SLURM job per task) replaces that local choice, with each
    task's job id, state and log in ``<out>/jobs.json``."""
    cfg = check_experiment(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the config as run, for the report (the first writer wins; a part run with overrides records the full plan)
    plan = out / "experiment.yaml"
    if not plan.is_file():
        plan.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tasks = experiment_tasks(cfg, out, strategies=strategies, seeds=seeds, record=record,
                             challenge_test=challenge_test, n_boot=n_boot)
    if jobs > 1 or executor is not None:
        from divaware import executors as ex

        executor = executor or ex.LocalExecutor(jobs=jobs)
        # the tasks' paths stay as given (a run's recorded config holds them): sbatch starts each job in this
        # working directory, so relative ones mean the same folders on the cluster's shared file system
        outcomes = executor.run(tasks, ex.work_folder(out, executor), out / ex.BOOK)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError("; ".join(f"{o.name} failed ({o.error}); log {o.log}" for o in failed))
        return out
    for i, task in enumerate(tasks, 1):
        done = run_one(**task.kwargs)
        print(f"[divaware experiment] {i}/{len(tasks)} {task.name} "
              f"{'already recorded' if done['skipped'] else 'done'} in {done['seconds']:.0f} s", flush=True)
    return out


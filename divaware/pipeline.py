"""Batch execution of the notebook series with papermill.

``run_series`` executes ``notebooks/01..04`` in order into one run folder::

    <out>/
      series.yaml                      the resolved series configuration
      params/<notebook>.yaml           the parameters each execution received
      notebooks/<notebook>.ipynb       executed copies (03 once per method: 03_training_<method>.ipynb)
      01_data_exploration/ ...         what each notebook writes (figures, tables, results.json)
      runs/<method>/                   one training run folder per method (written by 03)

A failing notebook stops the series with a :class:`NotebookFailed` naming the cell and the executed copy.
``sweep`` runs the training notebook over methods x seeds x a parameter grid and aggregates the
evaluation of every run into one table.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from divaware import executors

# Arguments of every kernel the series starts (see execute_notebook).
KERNEL_ARGUMENTS = ("--IPKernelApp.log_level=ERROR",)
SERIES = ("01_data_exploration", "02_subgroup_divergence", "03_training", "04_fairness_evaluation")


class NotebookFailed(RuntimeError):
    """A notebook of the series raised; the message names the cell and the executed copy."""


class SweepFailed(RuntimeError):
    """Some runs of a sweep failed (the others finished and are in sweep.csv); the message names them."""


def notebooks_dir() -> Path:
    """The folder holding the numbered notebooks: ``$DIVAWARE_NOTEBOOKS``, the checkout's ``notebooks/``,
    or ``./notebooks``."""
    env = os.environ.get("DIVAWARE_NOTEBOOKS")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[1] / "notebooks", Path.cwd() / "notebooks"]
    for folder in candidates:
        if (folder / f"{SERIES[0]}.ipynb").is_file():
            return folder
    raise FileNotFoundError(
        "cannot find the divaware notebooks (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); run from a checkout of the repository or set DIVAWARE_NOTEBOOKS"
    )


def notebook_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares in its ``parameters`` cell: name -> {default, help}."""
    import papermill

    return {
        name: {"default": spec["default"], "help": spec.get("help", "")}
        for name, spec in papermill.inspect_notebook(str(path)).items()
    }


def execute_notebook(
    source: Path, output: Path, parameters: Mapping[str, Any], *, cwd: Path | None = None,
    log_output: bool = False,
) -> float:
    """Execute ``source`` into ``output`` with ``parameters``; return the wall time in seconds.

    Unknown parameter names are refused up front (papermill would silently inject them), and a failing
    cell raises :class:`NotebookFailed` naming the cell and where the executed copy is.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    declared = notebook_parameters(source)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(
            f"{source.name} has no parameter(s) {unknown}; it declares {sorted(declared)} "
            f"(see `papermill --help-notebook {source}`)"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source), str(output), parameters=dict(parameters), kernel_name="python3",
            cwd=str(cwd) if cwd else None, progress_bar=False, log_output=log_output,
            # The kernel talks to papermill over local TCP and logs a warning about it at every start; the
            # warning says nothing about the notebook, so the kernel's own log is kept to errors.
            extra_arguments=list(KERNEL_ARGUMENTS),
        )
    except PapermillExecutionError as err:
        raise NotebookFailed(
            f"{source.name} failed in cell {err.cell_index} ({err.ename}: {err.evalue}); "
            f"the executed copy with the traceback is {output}"
        ) from err
    return time.perf_counter() - start


def load_series_config(path: str | Path | None) -> dict[str, Any]:
    """Read a series YAML (``configs/default.yaml`` layout); ``None`` gives the built-in default."""
    if path is None:
        path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"series configuration {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"series configuration {path} is not valid YAML ({where}"
                         f"{getattr(err, 'problem', None) or err}); fix the syntax") from None
    if not isinstance(config, dict):
        raise ValueError(f"series configuration {path} must hold a mapping (data_root, methods, ...)")
    known = {"data_root", "methods", "baseline", "common", "notebooks", "training", "sweep", "executor", "slurm"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; expected some of {sorted(known)}")
    methods = config.get("methods", ["erm", "divaware"])
    if not methods or not all(isinstance(m, str) for m in methods):
        raise ValueError(f"{path}: 'methods' must be a non-empty list of strategy names")
    config["methods"] = list(methods)
    from divaware.weighting import STRATEGIES

    # checked here, before any notebook runs (an unknown method once failed after ~70 s of notebooks)
    named = [*methods, *((config.get("sweep") or {}).get("methods") or [])]
    unknown_methods = [m for m in named if m not in STRATEGIES]
    if unknown_methods:
        raise ValueError(f"{path}: unknown method(s) {unknown_methods}; choose from {sorted(STRATEGIES)}")
    if config.get("baseline", "train") not in ("train", "reference"):
        raise ValueError(f"{path}: 'baseline' must be 'train' (02 trains its own) or 'reference' (02 analyses the "
                         f"first method's run), got {config['baseline']!r}")
    return config


def _params_for(name: str, config: Mapping[str, Any], declared: Mapping[str, Any]) -> dict[str, Any]:
    """Common parameters the notebook declares, then its own section of the config."""
    params = {k: v for k, v in (config.get("common") or {}).items() if k in declared}
    if config.get("data_root") and "data_root" in declared:
        params["data_root"] = str(config["data_root"])
    params.update((config.get("notebooks") or {}).get(name) or {})
    return params


def series_jobs(config: Mapping[str, Any], out: Path, src: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """The executions of a series in order: (label, notebook, parameters).

    With ``baseline: reference`` in the config, the reference method (the first of ``methods``) is trained
    before ``02`` and ``02`` analyses that run instead of training a baseline of its own — the same ERM model,
    trained once.
    """
    methods = list(config["methods"])
    reuse = config.get("baseline") == "reference"
    jobs: dict[str, list[tuple[str, Path, dict[str, Any]]]] = {}
    for name in SERIES:
        source = src / f"{name}.ipynb"
        declared = notebook_parameters(source)
        base = _params_for(name, config, declared)
        if name == "03_training":
            jobs[name] = [(f"{name}_{m}", source, {**base, **(config.get("training") or {}), "method": m,
                                                   "out_dir": str(out / "runs" / m)}) for m in methods]
            continue
        params = {**base, "out_dir": str(out / name)}
        if "runs_dir" in declared:
            params["runs_dir"] = str(out / "runs")
        if "reference_method" in declared and "reference_method" not in params:
            params["reference_method"] = methods[0]
        if name == "02_subgroup_divergence" and reuse:
            params["baseline_run"] = str(out / "runs" / methods[0])
        elif "baseline_dir" in declared and "baseline_dir" not in params:
            # 02 trains its own baseline: inside the series folder, beside 02's other outputs
            params["baseline_dir"] = str(out / name / "baseline")
        jobs[name] = [(name, source, params)]
    ordered = jobs["01_data_exploration"]
    if reuse:
        ordered += jobs["03_training"][:1] + jobs["02_subgroup_divergence"] + jobs["03_training"][1:]
    else:
        ordered += jobs["02_subgroup_divergence"] + jobs["03_training"]
    return ordered + jobs["04_fairness_evaluation"]


def run_series(
    config: Mapping[str, Any], out_dir: str | Path, *, only: list[str] | None = None,
    log_output: bool = False, executor: executors.Executor | None = None,
) -> dict[str, float]:
    """Execute the notebook series into ``out_dir``; return wall seconds per executed notebook.

    ``only`` restricts to some notebooks (names or number prefixes such as ``"03"``). ``executor`` (e.g. a
    :class:`divaware.executors.SlurmExecutor`) runs the trainings (``03`` once per method) as one batch of
    tasks, at the place of the first one, and the other notebooks here; ``None``: everything here, in order.
    """
    from divaware import runtime

    out = Path(out_dir).resolve()
    src = notebooks_dir()
    runtime.apply_thread_env()  # before any kernel starts: OpenMP reads it once, at load
    from divaware.widgets import install_lab_settings

    install_lab_settings()  # so JupyterLab saves widget state: an editable install skips the package's data files
    if only:
        labels = [label for label, _, _ in series_jobs(config, out, src)]
        unmatched = [o for o in only if not any(label.startswith(o) for label in labels)]
        if unmatched:
            raise ValueError(f"--only {' '.join(unmatched)} matches no notebook of the series; choose from "
                             f"{', '.join(labels)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "series.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
    record = start_timings(only)
    timings: dict[str, float] = {}
    jobs = series_jobs(config, out, src)
    selected = [job for job in jobs if not only or any(job[0].startswith(o) for o in only)]
    # 03 does not read what 02 writes, so the trainings may all run where the first one stands in the order
    trainings = [job for job in selected if job[0].startswith("03_training")] if executor is not None else []
    for label, source, params in selected:
        params_file = out / "params" / f"{label}.yaml"
        params_file.parent.mkdir(parents=True, exist_ok=True)
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        if trainings and label.startswith("03_training"):
            if label == trainings[0][0]:
                _run_trainings(trainings, executor, out, record, timings, log_output)
            continue
        print(f"[divaware run] {label} ...", flush=True)
        with runtime.PeakMemory() as memory:
            seconds = execute_notebook(source, out / "notebooks" / f"{label}.ipynb", params,
                                       cwd=out, log_output=log_output)
        timings[label] = round(seconds, 1)
        record["notebooks"][label] = {"seconds": round(seconds, 1), "peak_memory_gb": round(memory.peak / 1024**3, 2)}
        print(f"[divaware run] {label} done in {seconds:.1f} s", flush=True)
    write_timings(out, record, [label for label, _, _ in jobs])
    return timings


def series_notebook(source: str, output: str, params: dict[str, Any], cwd: str, log_output: bool = False
                    ) -> dict[str, Any]:
    """One notebook of the series as a task (JSON arguments, for :mod:`divaware.executors`): its wall seconds."""
    return {"seconds": execute_notebook(Path(source), Path(output), params, cwd=Path(cwd), log_output=log_output)}


def _run_trainings(trainings: list[tuple[str, Path, dict[str, Any]]], executor: executors.Executor, out: Path,
                   record: dict[str, Any], timings: dict[str, float], log_output: bool) -> None:
    """The series' trainings as one batch of tasks on ``executor``; a failed one stops the series."""
    from divaware import executors as ex
    from divaware.parallel import Task

    tasks = [Task(label, "divaware.pipeline:series_notebook", {
        "source": str(source), "output": str(out / "notebooks" / f"{label}.ipynb"), "params": params,
        "cwd": str(out), "log_output": log_output}) for label, source, params in trainings]
    print(f"[divaware run] {', '.join(t.name for t in tasks)} on the {executor.name} executor ...", flush=True)
    outcomes = executor.run(tasks, ex.work_folder(out, executor), out / ex.BOOK)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise NotebookFailed("; ".join(f"{o.name} failed ({o.error[-500:]}); log {o.log}" for o in failed))
    for o in outcomes:
        timings[o.name] = round(float(o.result["seconds"]), 1)
        # peak memory is the job's, on another machine: not measured here
        record["notebooks"][o.name] = {"seconds": timings[o.name], "peak_memory_gb": None, "executor": executor.name}


TIMINGS_FORMAT = 2


def start_timings(only: list[str] | None = None) -> dict[str, Any]:
    """The beginning of a ``timings.json`` record: start time, load, command and machine."""
    from divaware import runtime

    return {"format": TIMINGS_FORMAT, "started_utc": runtime.utc_now(), "_t0": time.perf_counter(),
            "command": runtime.command_line(), "only": list(only) if only else None,
            "load_average_start": runtime.load_average(), "machine": runtime.machine_info(), "notebooks": {}}


def write_timings(out: Path, record: dict[str, Any], labels: list[str]) -> Path:
    """Finish ``record`` (total wall time, peak memory, load, training breakdown) and write
    ``<out>/timings.json``; returns its path.

    ``notebooks`` maps each execution to its wall seconds (kernel start included) and the peak resident
    memory of the run process plus its kernel; ``training`` sums each training run's own epoch times from
    its ``metrics.csv`` (training steps vs validation). A partial run (``--only``) updates the notebooks
    it executed in an existing record and is marked ``complete: false`` unless every notebook of ``labels``
    (the series' executions in order) is there.
    """

    from divaware import runtime

    record = dict(record)
    total = time.perf_counter() - record.pop("_t0")
    path = out / "timings.json"
    previous: dict[str, Any] = {}
    if record.get("only") and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("format") != TIMINGS_FORMAT:
            previous = {}
    notebooks = {**(previous.get("notebooks") or {}), **record["notebooks"]}
    record["notebooks"] = {label: notebooks[label] for label in labels if label in notebooks}
    record["complete"] = all(label in notebooks for label in labels) and (not record.get("only") or bool(previous))
    record["total_seconds"] = round(total if not record.get("only") else
                                    sum(v["seconds"] for v in record["notebooks"].values()), 1)
    record["peak_memory_gb"] = max((v["peak_memory_gb"] for v in record["notebooks"].values()
                                    if v.get("peak_memory_gb") is not None), default=0.0)
    record["finished_utc"] = runtime.utc_now()
    record["load_average_end"] = runtime.load_average()
    training = {}
    from divaware.runfolder import RunFolder

    for run in sorted((RunFolder(p) for p in (out / "runs").glob("*")), key=lambda r: r.path):
        if not run.metrics.is_file():
            continue
        log = run.read_metrics()
        training[run.path.name] = {
            "epochs": int(len(log)), "seconds": round(float(log["time_s"].sum()), 1),
            "train_seconds": round(float(log["train_time_s"].sum()), 1),
            "validation_seconds": round(float(log["val_time_s"].sum()), 1),
            "validations": int(log["val_dice"].notna().sum()),
        }
    record["training"] = training
    path.write_text(json.dumps(record, indent=2))
    return path


def sweep_grid(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Expand the ``sweep`` section (methods x seeds x grid values) into one parameter dict per run."""
    section = dict(config.get("sweep") or {})
    methods = section.pop("methods", config.get("methods"))
    seeds = section.pop("seeds", [0])
    grid = section.pop("grid", {}) or {}
    if section:
        raise ValueError(f"unknown key(s) in 'sweep': {sorted(section)}; expected methods, seeds, grid")
    keys = sorted(grid)
    runs = []
    for method, seed, *values in itertools.product(methods, seeds, *(grid[k] for k in keys)):
        runs.append({"method": method, "seed": seed, **dict(zip(keys, values, strict=True))})
    return runs


def _run_name(params: Mapping[str, Any]) -> str:
    extra = "".join(f"_{k}{v}" for k, v in params.items() if k not in ("method", "seed"))
    return f"{params['method']}_seed{params['seed']}{extra}".replace("/", "-").replace(" ", "")


def sweep_run(source: str, notebook_out: str, params: dict[str, Any], grid_params: dict[str, Any],
              name: str, out: str, split: str = "test", n_boot: int = 1000, log_output: bool = False
              ) -> dict[str, Any]:
    """Train one sweep run (``03_training``) and evaluate it on ``split``; returns its sweep.csv row."""
    from divaware import evaluate as ev
    from divaware.executors import job_rank

    rank = job_rank()
    if rank > 0:  # another DDP rank of a multi-GPU job: its notebook's train() joins rank 0's group
        notebook_out = str(Path(notebook_out).with_suffix(f".rank{rank}.ipynb"))
    seconds = execute_notebook(Path(source), Path(notebook_out), params, cwd=Path(out), log_output=log_output)
    if rank > 0:  # rank 0 evaluates the run and reports its row
        return {"run": name, "rank": rank}
    result = ev.evaluate(Path(out) / "runs" / name, params.get("data_root") or None, split=split, n_boot=n_boot,
                         verbose=False)
    c = result.challenge
    return {"run": name, **grid_params, "notebook_minutes": round(seconds / 60, 2),
            "mean_dice": float(result.per_case["dice"].mean()), **{k: c.get(k) for k in ("P", "F", "ranking")}}


def sweep(config: Mapping[str, Any], out_dir: str | Path, *, split: str = "test", n_boot: int = 1000,
          log_output: bool = False, jobs: int = 1, devices: list[str] | None = None,
          executor: executors.Executor | None = None) -> Path:
    """Train every (method, seed, grid value) with ``03_training`` and evaluate it on ``split``.

    Runs go to ``<out>/runs/<method>_seed<seed>[_<param><value>...]``; a run whose result is recorded in
    ``<out>/results/<run>.json`` with the same parameters is skipped, and an unfinished run folder is resumed
    (the notebook resumes training and evaluation reuses its predictions), so an interrupted sweep continues
    where it stopped. ``jobs`` > 1 (or ``devices``) runs that many at once, one process each (see
    :mod:`divaware.parallel`: GPUs from ``devices`` round robin, else a share of the CPU threads each);
    ``executor`` (a :class:`divaware.executors.Executor`, e.g. a SLURM one) replaces that local choice. Each
    run's job id, state and log are kept in ``<out>/jobs.json`` (``divaware sweep --status``). A failing run
    is reported (``<out>/sweep_failed.csv``, :class:`SweepFailed` at the end) and the others go on.
    Writes ``<out>/sweep.csv`` (one row per finished run) and ``<out>/sweep_summary.csv`` (mean, std and n
    over seeds per method and grid value), and returns ``<out>``.
    """
    import pandas as pd

    from divaware import evaluate as ev
    from divaware import executors, parallel, runtime

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runtime.apply_thread_env()  # before any kernel starts: OpenMP reads it once, at load
    (out / "series.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
    source = notebooks_dir() / "03_training.ipynb"
    declared = notebook_parameters(source)
    base = {**_params_for("03_training", config, declared), **(config.get("training") or {})}
    runs = sweep_grid(config)
    unknown = sorted({k for r in runs for k in r} - set(declared))
    if unknown:
        raise ValueError(f"sweep parameter(s) {unknown} are not parameters of 03_training; it has {sorted(declared)}")
    results, tasks = out / "results", []
    results.mkdir(exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for grid_params in runs:
        name = _run_name(grid_params)
        params = {**base, **grid_params, "out_dir": str(out / "runs" / name)}
        (out / "params").mkdir(exist_ok=True)
        (out / "params" / f"{name}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        done = results / f"{name}.json"
        if done.is_file() and json.loads(done.read_text()).get("params") == json.loads(json.dumps(params)):
            rows[name] = json.loads(done.read_text())["row"]
            print(f"[divaware sweep] {name}: finished before, skipped", flush=True)
            continue
        tasks.append(parallel.Task(name, "divaware.pipeline:sweep_run", {
            "source": str(source), "notebook_out": str(out / "notebooks" / f"03_training_{name}.ipynb"),
            "params": params, "grid_params": grid_params, "name": name, "out": str(out), "split": split,
            "n_boot": n_boot, "log_output": log_output}))
    by_name = {t.name: t for t in tasks}

    def record(o: parallel.Outcome) -> None:
        # each finished run's result file is written the moment it finishes (atomically), so an interrupted
        # sweep resumes from every run finished so far instead of executing them again
        if o.ok:
            rows[o.name] = o.result
            target = results / f"{o.name}.json"
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"params": by_name[o.name].kwargs["params"], "row": o.result}))
            os.replace(tmp, target)

    if executor is None:
        executor = executors.LocalExecutor(jobs=jobs, devices=devices)
    book = executors.JobBook(out / executors.BOOK)
    for name in rows:  # finished before: in the book too, so --status lists the whole sweep
        book.jobs.setdefault(name, {"executor": executor.name, "job_id": None, "log": ""})
        book.jobs[name].update(state="DONE", error="")
    book.save()
    outcomes = executor.run(tasks, executors.work_folder(out, executor), book.path, on_done=record)
    failed = [o for o in outcomes if not o.ok]
    names = [_run_name(r) for r in runs if _run_name(r) in rows]
    if names:
        table = ev.collect(out / "runs", split=split)
        table = table[table["run"].isin(names)]
        grid_keys = [k for k in runs[0] if k not in ("method", "seed")]
        per_run = pd.DataFrame([rows[n] for n in names]).merge(
            table.drop(columns=["method", "seed", "mean_dice", "P", "F", "ranking"], errors="ignore"),
            on="run", how="left")
        per_run.to_csv(out / "sweep.csv", index=False)
        numeric = [c for c in ("mean_dice", "worst_group_dice", "gap", "es_dice", "P", "F", "ranking") if c in per_run]
        summary = per_run.groupby(["method", *grid_keys])[numeric].agg(["mean", "std", "count"])
        summary.columns = [f"{a}_{b}" for a, b in summary.columns]
        summary.reset_index().to_csv(out / "sweep_summary.csv", index=False)
        print(summary.round(4).to_string())
    failed_csv = out / "sweep_failed.csv"
    failed_csv.unlink(missing_ok=True)
    if failed:
        pd.DataFrame([{"run": o.name, "error": o.error, "log": o.log} for o in failed]).to_csv(failed_csv, index=False)
        raise SweepFailed(f"{len(failed)} of {len(runs)} sweep run(s) failed: "
                          + "; ".join(f"{o.name} ({o.error[:300]})" for o in failed)
                          + f". The {len(names)} finished run(s) are in {out / 'sweep.csv'}; see {failed_csv}; "
                          "rerun the same command to retry only the failed ones")
    return out


# Figures of the default series shown in the README gallery: (folder under the run, file name) pairs.
GALLERY = (
    ("01_data_exploration", "missingness.png"),
    ("01_data_exploration", "enhancement_by_density.png"),
    ("02_subgroup_divergence", "divergent_itemsets.png"),
    ("runs/divaware", "weights.png"),
    ("runs/divaware", "training_curves.png"),
    ("04_fairness_evaluation", "compare_erm_vs_divaware.png"),
    ("04_fairness_evaluation", "heatmap_erm.png"),
    ("04_fairness_evaluation", "hardest_cases.png"),
)


def publish_figures(run_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy the gallery figures of a finished series into ``dest`` (flattened names); returns the copies."""
    import shutil

    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder, name in GALLERY:
        src = run_dir / folder / name
        if src.is_file():
            target = dest / f"{folder.replace('/', '_')}_{name}"
            shutil.copyfile(src, target)
            copied.append(target)
    return copied

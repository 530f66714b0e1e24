"""One configuration schema: every field defaulted once, constraints declared beside it, checked once."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from divaware import config as C
from divaware import train as T
from divaware.weighting import DEFAULTS

PACKAGE = Path(C.__file__).resolve().parent

# Parameters that carry a config setting under another name.
ALIASES = {"precision": "store_precision", "n_random": "val_patches", "max_memory_bytes": "cache_max_gb",
           "norm": "weight_norm"}

# (module, parameter) pairs whose name matches a field but which mean something else, with the reason. A
# function that takes a *training-run* setting must take it without a default (from the config object).
OTHER_MEANING = {
    **{(m, "seed"): "the seed of an analysis (bootstrap, permutations) or of the synthetic generator, not the "
                    "training seed" for m in ("audit", "calibration", "evaluate", "exploration", "metrics",
                                              "subgroups", "synthetic", "paths")},
    ("metrics", "spacing"): "the voxel spacing of an image being scored, not the resampling of a run",
    ("evaluate", "min_group_size"): "the smallest group a fairness report lists (every group: 1), not the "
                                    "worst-group threshold of model selection",
    ("calibration", "strategy"): "the strategy whose weight step is calibrated (divaware's)",
    ("nnunet", "phases"): "the phases exported to an nnU-Net dataset (nnU-Net's own plans)",
    ("nnunet", "device"): "nnU-Net's trainer signature",
    **{("predict", name): "an option of `divaware predict`, which runs a finished run's model on any machine"
       for name in ("device", "num_workers", "progress", "cpu_threads", "out_dir")},
    ("evaluate", "progress"): "an option of `divaware evaluate`",
}


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(C.TrainConfig)}


def _literal_defaults(package: Path = PACKAGE) -> list[tuple[str, str, str, str]]:
    """(module, function, parameter, default) for every parameter of a function in divaware/ that is named
    after a config field and has a literal default other than None."""
    names = _fields() | set(ALIASES)
    found = []
    for path in sorted(package.rglob("*.py")):
        module = path.stem
        if module == "config":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = fn.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults, strict=True))
            pairs += [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                # a literal (2 * 1024**3 included); a name, attribute or call refers to a definition elsewhere
                literal = not any(isinstance(n, ast.Name | ast.Attribute | ast.Call) for n in ast.walk(default))
                if arg.arg in names and literal and not (isinstance(default, ast.Constant) and default.value is None):
                    found.append((module, fn.name, arg.arg, ast.unparse(default)))
    return found


def test_no_function_in_the_package_re_defaults_a_config_field() -> None:
    """Every setting has its one default in divaware.config: a function taking a field (or its alias) takes it
    from the caller's config, without a literal default of its own that could disagree."""
    assert {"store_precision", "val_patches", "cache", "seed", "channels"} <= _fields()
    offenders = [f"{m}.{fn}({p}={d})" for m, fn, p, d in _literal_defaults() if (m, p) not in OTHER_MEANING]
    assert not offenders, f"re-defaulted config fields: {offenders}"


def test_the_scan_finds_a_re_default(tmp_path: Path) -> None:
    """The scan above is not vacuous: the former signatures are caught, a default of None or from the config is not."""
    (tmp_path / "preprocess.py").write_text(
        'def fill(records, spec, root=None, workers=0, progress=False, precision: str = "float16"): ...\n'
        'def patch_scores(model, *, n_random=2, score="dice", seed=None, epochs=DEFAULTS.epochs): ...\n')
    assert _literal_defaults(tmp_path) == [("preprocess", "fill", "progress", "False"),
                                           ("preprocess", "fill", "precision", "'float16'"),
                                           ("preprocess", "patch_scores", "n_random", "2"),
                                           ("preprocess", "patch_scores", "score", "'dice'")]


def test_every_field_has_one_section_a_doc_and_a_default() -> None:
    sections = C.TrainConfig.sections()
    assert list(sections) == list(C.SECTIONS)
    listed = [n for names in sections.values() for n in names]
    assert sorted(listed) == sorted(_fields()) and len(listed) == len(set(listed))
    assert set(sections["store"]) == {"cache", "cache_dir", "cache_max_gb", "store_precision", "val_patches"}
    assert {"strategy", "strategy_params", "warmup_epochs", "update_every"} <= set(sections["weighting"])
    for name in _fields():
        assert C.default(name) == getattr(C.TrainConfig(), name)


@pytest.mark.parametrize(("values", "field", "why"), [
    ({"store_precision": "uint8"}, "store_precision", "acts only on the preprocessed store"),
    ({"store_precision": "uint8", "cache": "memory", "patch_size": [16, 16, 16]}, "store_precision",
     "cache: memory"),
    ({"val_patches": 2}, "val_patches", "acts only on the preprocessed store"),
    ({"val_patches": 2, "cache": "disk", "patch_size": [16, 16, 16]}, "val_patches", "cache: disk"),
    ({"val_patches": -1, "cache": "preprocessed", "patch_size": [16, 16, 16]}, "val_patches", "must be >= 0"),
    ({"cache": "preprocessed"}, "cache", "serves patch training: set patch_size"),
])
def test_a_setting_that_cannot_act_is_refused_naming_the_field(values: dict, field: str, why: str,
                                                               tmp_path: Path) -> None:
    """Refused when the config is made, before any data is read (the data_root does not even exist)."""
    with pytest.raises(ValueError, match=f"config field '{field}'") as err:
        T.TrainConfig.from_dict({**values, "data_root": str(tmp_path / "no_such_data")})
    assert why in str(err.value) and "\n" not in str(err.value)


def test_settings_for_the_store_are_accepted_where_the_store_acts() -> None:
    cfg = T.TrainConfig.from_dict({"cache": "preprocessed", "patch_size": [16, 16, 16], "store_precision": "uint8",
                                   "val_patches": 2})
    assert cfg.store_in_use() and cfg.store_precision == "uint8"
    auto = T.TrainConfig.from_dict({"patch_size": [16, 16, 16], "val_patches": 1})  # auto may pick the store
    assert auto.store_in_use()


def test_sections_nest_in_yaml_and_load_like_the_flat_keys(tmp_path: Path) -> None:
    flat = {"cache": "preprocessed", "patch_size": [16, 16, 16], "store_precision": "uint8", "model": "unet",
            "strategy": "divaware", "strategy_params": {"tau": 0.1}}
    nested = {"store": {"cache": "preprocessed", "store_precision": "uint8"}, "data": {"patch_size": [16, 16, 16]},
              "model": "unet", "weighting": {"strategy": "divaware", "strategy_params": {"tau": 0.1}}}
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(nested))
    assert T.TrainConfig.from_yaml(tmp_path / "n.yaml") == T.TrainConfig.from_dict(flat)
    with pytest.raises(ValueError, match="given twice"):
        T.TrainConfig.from_dict({"cache": "memory", "store": {"cache": "disk"}})
    text = T.TrainConfig().to_yaml()
    assert text.index("# == store ==") < text.index("\nstore_precision:")


def test_config_is_frozen_and_changes_are_validated() -> None:
    cfg = T.TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]
    assert cfg.with_values(epochs=3).epochs == 3
    with pytest.raises(ValueError, match="'val_patches'"):
        cfg.with_values(val_patches=3)
    with pytest.raises(ValueError, match="'alpha'"):
        dataclasses.replace(cfg, alpha=2.0)


def test_shipped_run_configs_still_load() -> None:
    """The flat YAML users have (configs/train_default.yaml; every run folder's config.yaml) loads unchanged."""
    shipped = PACKAGE.parent / "configs" / "train_default.yaml"
    assert T.TrainConfig.from_yaml(shipped) == T.TrainConfig()


def test_method_config_takes_any_field_and_the_strategy_defaults() -> None:
    cfg = T.method_config("divaware", data_root="/data", out_dir="/runs/x", channels=[8, 16, 32],
                          strategy_params={"tau": None, "w_max": 3.0, "min_support": None, "eta": None},
                          patch_size=[16, 16, 16], cache="preprocessed", store_precision="uint8", warmup_epochs=None)
    assert cfg.strides == [2, 2] and cfg.store_precision == "uint8" and cfg.warmup_epochs == C.default("warmup_epochs")
    own = DEFAULTS["divaware"]
    assert cfg.strategy_params == {"tau": own["tau"], "w_max": 3.0, "min_support": own["min_support"]}  # no eta
    assert cfg.channels == [8, 16, 32] and T.method_config("erm", data_root="/d", out_dir="/o").alpha == 1.0
    assert T.method_config("erm", data_root="/d", out_dir="/o").channels == C.default("channels")
    with pytest.raises(ValueError, match="'store_precision'"):
        T.method_config("erm", data_root="/d", out_dir="/o", store_precision="uint8")

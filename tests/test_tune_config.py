"""Search YAML parsing and validation, and the objective: no Ray, no training."""
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from daae.cli import main as daae_main
from daae.config import ConfigError
from tune import Objective, SearchError, Target, load_search, parse_search
from tune.cli import main as tune_main
from tune.results import arm_rows, arms_markdown, collect, config_rows, configs_markdown

ROOT = Path(__file__).resolve().parents[1]
SEARCHES = sorted((ROOT / "configs" / "tune").glob("*.yaml"))
SMOKE = ROOT / "configs" / "tune" / "smoke.yaml"


def smoke_values(**changes):
    values = yaml.safe_load(SMOKE.read_text())
    values["base"] = str(ROOT / "configs" / "smoke.yaml")
    values.update(changes)
    return values


def parse(values, cli=()):
    return parse_search(values, cli=list(cli))


# ---------------------------------------------------------------------- shipped YAMLs

def test_shipped_searches_are_there():
    assert {p.stem for p in SEARCHES} >= {"smoke", "weights", "ablation"}


@pytest.mark.parametrize("path", SEARCHES, ids=lambda p: p.stem)
def test_every_shipped_search_validates(path, tmp_path):
    spec = load_search(path, [f"storage_path={tmp_path}"])
    assert spec.space or spec.arms
    # A trial's config never reads the test split.
    assert spec.trainer_config({k: d.candidates()[0] for k, d in spec.space.items()}
                               ).eval.final_test is False
    # The resolved YAML saved for --resume parses back to the same search.
    again = parse_search(yaml.safe_load(spec.to_yaml()))
    assert again.space == spec.space and again.arms == spec.arms and again.base == spec.base


def test_shipped_searches_cover_the_issue():
    weights = load_search(ROOT / "configs/tune/weights.yaml")
    assert set(weights.space) == {"loss.adversarial_z", "loss.adversarial_y", "loss.decorrelation",
                                  "loss.supervised", "loss.reconstruction", "train.lr"}
    assert weights.file.scheduler.kind == "asha"
    ablation = load_search(ROOT / "configs/tune/ablation.yaml")
    assert ablation.file.scheduler.kind == "none"
    arms = {name: ablation.trainer_config({"arm": name}).loss for name in ablation.arms}
    assert arms["off"].decorrelation == 0
    assert arms["maximize_ce"].decorrelation_objective == "maximize_ce" and arms["maximize_ce"].decorrelation > 0
    assert arms["uniform"].decorrelation_objective == "uniform" and arms["uniform"].decorrelation > 0
    assert ablation.space["seed"].kind == "grid" and len(ablation.space["seed"].args) >= 2


def test_the_p100_ablation_search_is_the_shipped_config_with_both_terms_off_and_on():
    from daae.config import load_config

    shipped = load_config(ROOT / "configs/mnist_p100.yaml")
    ablation = load_search(ROOT / "configs/tune/ablation_p100.yaml")
    assert ablation.file.scheduler.kind == "none" and list(ablation.space["seed"].args) == [0, 1, 2]
    on = ablation.trainer_config({"arm": "on", "seed": 0})
    off = ablation.trainer_config({"arm": "off", "seed": 0})
    assert on.loss == shipped.loss and on.model == shipped.model and on.train == shipped.train
    assert off.loss.decorrelation == 0 and off.loss.independence == 0
    assert {k: v for k, v in vars(off.loss).items() if k not in ("decorrelation", "independence")} == \
        {k: v for k, v in vars(shipped.loss).items() if k not in ("decorrelation", "independence")}


def test_check_via_both_entry_points(tmp_path, capsys):
    assert daae_main(["tune", "--check", "--config", str(SMOKE), f"storage_path={tmp_path}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["storage_path"] == str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tune", "--check", "--config", str(SMOKE),
                           "num_samples=7"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["num_samples"] == 7


def test_check_of_a_seeds_search_needs_no_ray(capsys, monkeypatch):
    seeds = ROOT / "configs" / "tune" / "decorrelation_seeds.yaml"
    assert daae_main(["tune", "--check", "--config", str(seeds)]) == 0
    assert "# c0: {" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "ray.tune.search.variant_generator", None)  # Ray not installed
    assert daae_main(["tune", "--check", "--config", str(seeds)]) == 0
    out = capsys.readouterr().out
    assert "install it (pip install 'daae[tune]')" in out and "# c0:" not in out
    assert yaml.safe_load(out)["seeds"] == [0, 1, 2]


# ------------------------------------------------------------------------ overrides

def test_command_line_overrides_reach_search_and_trainer_keys(tmp_path):
    spec = load_search(SMOKE, ["num_samples=2", f"storage_path={tmp_path}", "name=other",
                               "scheduler.kind=none", "overrides.train.max_steps=7",
                               "space.train.lr={choice: [0.001]}", "target.tolerance=0.2"])
    assert spec.file.num_samples == 2 and spec.experiment_path == f"{tmp_path}/other"
    assert spec.trainer_config({}).train.max_steps == 7
    assert spec.space["train.lr"].args == (0.001,)
    assert spec.objective.target.tolerance == 0.2


def test_trainer_key_on_the_command_line_points_to_overrides():
    with pytest.raises(SearchError, match="overrides.train.max_steps=7"):
        load_search(SMOKE, ["train.max_steps=7"])


def test_a_reserved_key_is_refused_also_as_a_section_on_the_command_line():
    with pytest.raises(SearchError, match="overrides 'eval.final_test': each trial sets it"):
        load_search(SMOKE, ["overrides.eval={final_test: true}"])
    spec = load_search(SMOKE, ["overrides.eval={probe_epochs: 2, batch_size: 64}"])
    assert spec.trainer_config({}).eval.probe_epochs == 2 and spec.trainer_config({}).eval.batch_size == 64


def test_seed_on_the_command_line_is_the_search_samplers():
    spec = load_search(SMOKE, ["seed=3"])
    assert spec.file.seed == 3
    assert spec.trainer_config({}).seed == load_search(SMOKE).trainer_config({}).seed


def test_nothing_in_a_config_string_is_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    with pytest.raises(ConfigError, match="python/object"):
        load_search(SMOKE, [f"name=!!python/object/apply:os.system ['touch {marker}']"])
    values = smoke_values(name=f"!!python/object/apply:os.system ['touch {marker}']")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values).replace("'!!python", "!!python").replace("]'", "]"))
    with pytest.raises(ConfigError, match="python/object"):
        load_search(bad)
    assert not marker.exists()


# ------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("changes, message", [
    ({"num_sample": 3}, "unknown key 'num_sample'"),
    ({"scheduler": {"kind": "asha", "grace": 3}}, "unknown key 'scheduler.grace'"),
    ({"num_samples": "four"}, "num_samples: expected int"),
    ({"space": {"loss.decorrelatoin": {"choice": [0.1]}}}, "loss.decorrelatoin"),
    ({"space": {"loss": {"choice": [0.1]}}}, "space 'loss'"),
    ({"space": {"train.max_steps": {"choice": [1.5]}}}, "train.max_steps: expected int"),
    ({"space": {"loss.decorrelation": {"choise": [0.1]}}}, "unknown distribution 'choise'"),
    ({"space": {"loss.decorrelation": {"uniform": [1.0, 0.5]}}}, "low < high"),
    ({"space": {"loss.decorrelation": {"loguniform": [0.0, 0.5]}}}, "loguniform needs low > 0"),
    ({"space": {"loss.decorrelation": {"uniform": [0.1]}}}, "two numbers"),
    ({"space": {"seed": {"randint": [0.5, 3]}}}, "integer bounds"),
    ({"space": {"loss.decorrelation": [0.1, 0.5]}}, "expected one distribution"),
    ({"space": {"loss.decorrelation": {"choice": [-1.0]}}}, "loss.decorrelation: must be 0 or more"),
    ({"space": {"eval.final_test": {"choice": [True]}}}, "cannot be searched"),
    ({"arms": {"bad": {"loss.nope": 1}}}, "arms 'bad'"),
    ({"metric": "test_accuracy"}, "nothing reports 'test_accuracy'"),
    ({"metric": "probe_accuracy"}, "probes_during_training"),
    ({"target": {"metrics": ["accuracy"]}}, "target.metrics"),
    ({"space": {"eval.class_whitened_probes": {"choice": [True, False]}}},
     "'eval.class_whitened_probes' cannot be searched: .* set it under overrides"),
    ({"target": {"metrics": ["class_whitened_probe_accuracy"]}},
     "target.metrics: 'class_whitened_probe_accuracy' .* overrides.eval.class_whitened_probes=true"),
    ({"target": {"metrics": ["class_gaussianized_probe_accuracy"]},
      "overrides": {"eval.class_whitened_probes": True}},
     "target.metrics: 'class_gaussianized_probe_accuracy' .* overrides.eval.class_gaussianized_probes=true"),
    ({"space": {"eval.class_gaussianized_probes": {"choice": [True, False]}}},
     "'eval.class_gaussianized_probes' cannot be searched"),
    ({"metric": "class_whitened_linear_probe_accuracy",
      "overrides": {"eval.probes_during_training": True}}, "metric: .*class_whitened_probes=true"),
    ({"mode": "maximum"}, "mode"),
    ({"resources": {"cpu": 0}}, "resources.cpu"),
    ({"resources": {"gpu": 1.5}}, "whole"),
    ({"resources": {"gpu": 2, "workers": 3}}, "one whole GPU per worker"),
    ({"resources": {"gpu": 1, "workers": 2}}, "2 workers for 1 GPUs.*resources.gpu=2"),
    ({"resources": {"gpu": 0.5, "workers": 2}}, "one whole GPU per worker"),
    ({"scheduler": {"kind": "hyperband"}}, "scheduler.kind"),
    ({"scheduler": {"kind": "asha", "grace_period": 1000}}, "grace_period"),
    ({"scheduler": {"kind": "asha", "grace_period": 5}}, "before the first evaluation"),
    ({"arms": {"long": {"train.max_steps": 120}, "short": {}}},
     "scheduler.max_t: set it .*arms 'long' set train.max_steps"),
    ({"overrides": {"run.checkpoint_every": 30}}, "multiple of run.eval_every"),
    ({"overrides": {"run.dir": "/elsewhere"}}, "overrides 'run.dir': each trial sets it"),
    ({"overrides": {"eval.final_test": True}}, "overrides 'eval.final_test': each trial sets it"),
    ({"overrides": {"train.mixed_precision": "fp16"}}, "needs a GPU"),
    ({"base": None}, "needs a trainer config"),
    ({"seeds": [0, 1], "scheduler": {"kind": "asha", "grace_period": 20}},
     "seeds: .*ASHA would stop them one by one; set scheduler.kind: none"),
    ({"seeds": [0, 0], "scheduler": {"kind": "none"}}, "seeds: expected a list of distinct"),
    ({"seeds": [], "scheduler": {"kind": "none"}}, "seeds: expected a list of distinct"),
    ({"seeds": [0, -1], "scheduler": {"kind": "none"}}, "seeds: -1: seed: must be in"),
    ({"seeds": [0, 1], "scheduler": {"kind": "none"}, "space": {"seed": {"grid": [0, 1]}}},
     "seeds: space also sets 'seed'"),
    ({"seeds": [0, 1], "scheduler": {"kind": "none"}, "overrides": {"seed": 3}},
     "seeds: overrides also sets 'seed'"),
    ({"seeds": [0, 1], "scheduler": {"kind": "none"}, "arms": {"a": {"seed": 3}, "b": {"seed": 4}}},
     "seeds: arms 'a' and arms 'b' also set 'seed'"),
    ({"name": "a/b"}, "plain folder name"),
    # ASHA would stop every trial at max_t, before its final evaluation.
    ({"scheduler": {"kind": "asha", "grace_period": 20, "max_t": 40}},
     r"scheduler.max_t \(40\) is below train.max_steps \(60, from the base config.*raise "
     r"scheduler.max_t to 60"),
    ({"scheduler": {"kind": "asha", "grace_period": 20, "max_t": 60},
      "arms": {"long": {"train.max_steps": 120}, "short": {}}},
     r"scheduler.max_t \(60\) is below train.max_steps \(120, from arms 'long'\)"),
    ({"scheduler": {"kind": "asha", "grace_period": 20, "max_t": 60},
      "space": {"train.max_steps": {"choice": [40, 90, 80]}}},
     r"scheduler.max_t \(60\) is below train.max_steps \(90, from space 'train.max_steps'\)"),
    # Null for a section would put all of it back to the trainer's defaults.
    ({"overrides": {"train": None}}, "overrides: 'train' is null, .*reset.*give its keys"),
    ({"arms": {"lower_lr": {"train": None}, "base": {}}},
     "arms 'lower_lr': 'train' is null, .*reset.*give its keys"),
    ({"arms": {True: {}, False: {"loss.decorrelation": 0.0}}}, "arm name True is not text.*quote"),
    ({"arms": {"a/b": {}, "c": {}}}, "arms: 'a/b' must be a non-empty name without '/'"),
    ({"arms": {"": {}, "c": {}}}, "arms: '' must be a non-empty name"),
])
def test_bad_search_fails_naming_the_problem(changes, message):
    with pytest.raises(SearchError, match=message):
        parse(smoke_values(**changes))


def test_check_refuses_a_max_t_that_stops_trials_before_their_end(caplog):
    assert tune_main(["--check", "--config", str(SMOKE), "overrides.train.max_steps=40",
                      "scheduler.max_t=20"]) == 2
    assert "scheduler.max_t (20) is below train.max_steps (40" in caplog.text
    # Shorter trials than max_t finish before ASHA's last rung.
    assert load_search(SMOKE, ["scheduler.max_t=60", "arms.short.train.max_steps=40",
                               "arms.full.run.log_every=20"]).asha_max_t() == 60


def test_a_section_left_with_its_keys_commented_out_is_refused(tmp_path):
    search = tmp_path / "search.yaml"
    search.write_text(f"base: {ROOT / 'configs' / 'smoke.yaml'}\n"
                      f"scheduler: {{kind: none}}\n"
                      f"overrides:\n  train:\n    # lr: 0.001\n")
    with pytest.raises(SearchError, match="overrides: 'train' is null, which would reset"):
        load_search(search)
    with pytest.raises(SearchError, match="overrides: 'train' is null"):
        load_search(SMOKE, ["overrides.train=null"])
    with pytest.raises(SearchError, match="arms 'a': 'eval' is null"):
        load_search(SMOKE, ["arms.a.eval=null"])
    # A null leaf is a value: the run's length then follows from train.epochs.
    assert load_search(SMOKE, ["overrides.train.max_steps=null", "scheduler.kind=none"]
                       ).trainer_config({}).train.max_steps is None


@pytest.mark.parametrize("metric", ["y_marginal_entropy", "z_std", "z_mean"])
def test_a_search_ranks_only_on_metrics_in_0_1(metric):
    # Scored value - 1 - distance, a trial that misses the target stays below
    # every trial that meets it only for metrics in [0, 1]; log K, z's spread do not.
    with pytest.raises(SearchError, match=f"metric: '{metric}' is not bounded to \\[0, 1\\].*; "
                                          f"rank on one of accuracy, .*recon_mse"):
        parse(smoke_values(metric=metric))
    assert parse(smoke_values(metric="recon_mse", mode="min")).file.metric == "recon_mse"


def test_unquoted_on_and_off_arms_are_refused_naming_the_quote(tmp_path):
    search = tmp_path / "search.yaml"
    search.write_text(f"base: {ROOT / 'configs' / 'smoke.yaml'}\nscheduler: {{kind: none}}\n"
                      f"arms:\n  on: {{}}\n  off: {{loss.decorrelation: 0.0}}\n")
    with pytest.raises(SearchError, match=r"arms: the arm name True is not text.*quote the name"):
        load_search(search)
    search.write_text(search.read_text().replace("  on:", "  'on':").replace("  off:", "  'off':"))
    assert list(load_search(search, ["arms.off.loss.decorrelation=0.1"]).arms) == ["on", "off"]


@pytest.mark.parametrize("text, fix", [("arms=null", "arms.NAME.KEY=VALUE"), ("arms={}", "arms.NAME.KEY"),
                                       ("space=null", "space.KEY="),
                                       ("overrides=null", "overrides.KEY=VALUE"),
                                       ("overrides=[train.lr=0.1]", "overrides.KEY=VALUE")])
def test_a_whole_trainer_key_mapping_on_the_command_line_is_refused(text, fix):
    values = smoke_values(scheduler={"kind": "none"}, arms={"a": {}, "b": {"loss.decorrelation": 0.0}})
    with pytest.raises(SearchError, match=f"override '{re.escape(text)}': .* not the whole mapping; "
                                          f"write {re.escape(fix)}.*or edit the search YAML"):
        parse(values, [text])


def test_bad_search_is_a_user_error_on_the_command_line(tmp_path, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(smoke_values(space={"loss.nope": {"choice": [1.0]}})))
    assert tune_main(["--check", "--config", str(bad)]) == 2
    assert "loss.nope" in caplog.text


def test_resume_of_a_folder_that_is_no_search(tmp_path, caplog):
    assert tune_main(["--resume", str(tmp_path)]) == 2
    assert "not a daae search folder" in caplog.text


def test_a_search_folder_loads_for_a_resume_unless_its_search_yaml_changed(tmp_path):
    from tune.runner import STARTED_FILE, load_experiment

    started = parse(smoke_values(arms={"on": {}, "off": {"loss.decorrelation": 0.0}})).to_yaml()
    edited = yaml.safe_load(started)
    edited["resources"]["gpu"] = 0.5
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(edited))
    # A search started before daae kept the record resumes as before.
    assert load_experiment(str(tmp_path)).file.resources.gpu == 0.5
    (tmp_path / STARTED_FILE).write_text(started)
    with pytest.raises(SearchError, match=r"changed since the search started: resources\. .*"
                                          r"put those keys back as in .*\.search_started\.yaml"):
        load_experiment(str(tmp_path))
    # The folder moved, and search.yaml was told so: where it lies is taken from the path.
    moved = tmp_path / "moved"
    moved.mkdir()
    told = {**yaml.safe_load(started), "storage_path": str(tmp_path), "name": "moved"}
    (moved / "search.yaml").write_text(yaml.safe_dump(told))
    (moved / STARTED_FILE).write_text(started)
    assert load_experiment(str(moved)).experiment_path == str(moved)
    (moved / STARTED_FILE).write_text("torn")
    with pytest.raises(SearchError, match=r"\.search_started\.yaml should hold the search as it started"):
        load_experiment(str(moved))
    (moved / "search.yaml").write_text("name: [moved\n")  # an edit that broke it
    with pytest.raises(SearchError, match=r"(?s)search\.yaml is not valid YAML .*put it back as it was"):
        load_experiment(str(moved))


# ------------------------------------------------------------------------ objective

def test_score_ranks_feasible_trials_by_accuracy_and_infeasible_ones_last():
    objective = Objective("accuracy", "max", Target(tolerance=0.05))
    base = {"y_marginal_entropy_max": 2.302585092994046}  # log 10: chance is 0.1
    good = objective.assess({**base, "accuracy": 0.9, "adversary_accuracy": 0.12, "probe_accuracy": 0.08})
    better = objective.assess({**base, "accuracy": 0.95, "adversary_accuracy": 0.1, "probe_accuracy": 0.14})
    leaky = objective.assess({**base, "accuracy": 0.99, "adversary_accuracy": 0.1, "probe_accuracy": 0.6})
    leakier = objective.assess({**base, "accuracy": 0.99, "adversary_accuracy": 0.7, "probe_accuracy": 0.6})
    # Below chance leaks class information too.
    below = objective.assess({**base, "accuracy": 0.99, "adversary_accuracy": 0.01, "probe_accuracy": 0.1})
    assert good["meets_target"] and better["meets_target"]
    assert not leaky["meets_target"] and not below["meets_target"]
    assert better["score"] > good["score"] > below["score"] > leaky["score"] > leakier["score"]
    assert good["score"] == pytest.approx(0.9)
    assert leaky["target_distance"] == pytest.approx(0.45)


def test_objective_reads_the_number_of_classes_from_the_report():
    objective = Objective(target=Target(tolerance=0.02))
    four_classes = {"y_marginal_entropy_max": 1.3862943611198906, "accuracy": 0.5,
                    "adversary_accuracy": 0.25, "probe_accuracy": 0.26}
    assert objective.assess(four_classes)["meets_target"]
    assert not Objective(target=Target(tolerance=0.02, chance=0.1)).assess(four_classes)["meets_target"]


def test_trials_rank_finished_by_score_then_stopped_by_depth_then_failed():
    spec = SimpleNamespace(arms=None, space={"loss.decorrelation": None})

    def trial(name, status, step, score):
        metrics = {"step": step, "score": score, "final": status == "finished"}
        return SimpleNamespace(path=f"/exp/{name}", config={"loss.decorrelation": 1.0},
                               metrics=metrics if status != "error" else {},
                               error=RuntimeError("boom") if status == "error" else None)

    grid = [trial("early_lucky", "stopped", 500, 0.99), trial("failed", "error", None, None),
            trial("finished_low", "finished", 3000, 0.90), trial("deeper", "stopped", 1500, 0.80),
            trial("finished_high", "finished", 3000, 0.95)]
    rows = collect(spec, grid)
    assert [r["trial"] for r in rows] == ["finished_high", "finished_low", "deeper", "early_lucky", "failed"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]


def test_a_trial_of_an_arm_the_search_no_longer_has_is_refused():
    spec = parse(smoke_values(arms={"on": {}, "off": {"loss.decorrelation": 0.0}}))
    assert spec.trainer_config({"arm": "off"}).loss.decorrelation == 0.0
    with pytest.raises(SearchError, match="arm 'gone' is not in arms \\(on, off\\)"):
        spec.trainer_config({"arm": "gone"})


def test_the_trial_table_holds_every_metric_a_search_can_rank_on():
    from tune.objective import VALIDATION_METRICS

    reported = {name: 0.5 for name in VALIDATION_METRICS}
    row = collect(SimpleNamespace(arms=None, space={}), [SimpleNamespace(
        path="/exp/a", config={}, error=None,
        metrics={"step": 10, "score": 0.9, "final": True, **reported})])[0]
    assert {name: row.get(name) for name in VALIDATION_METRICS} == reported


def test_class_whitened_probes_can_be_targeted_and_show_in_the_trial_table_only_when_reported():
    values = smoke_values(target={"tolerance": 0.05, "metrics": ["adversary_accuracy",
                                                                  "class_whitened_probe_accuracy"]})
    values["overrides"] = {**values.get("overrides", {}), "eval.class_whitened_probes": True}
    spec = parse(values)
    ten_classes = {"y_marginal_entropy_max": 2.302585092994046, "accuracy": 0.9,
                   "adversary_accuracy": 0.1}
    assert spec.objective.assess({**ten_classes, "class_whitened_probe_accuracy": 0.12})["meets_target"]
    assert not spec.objective.assess({**ten_classes, "class_whitened_probe_accuracy": 0.3})["meets_target"]

    def trial(name, metrics):
        return SimpleNamespace(path=f"/exp/{name}", config={}, error=None,
                               metrics={"step": 10, "score": 0.9, "final": True, **metrics})

    table = SimpleNamespace(arms=None, space={})
    plain = collect(table, [trial("a", {"probe_accuracy": 0.2})])
    assert "probe_accuracy" in plain[0] and "class_whitened_probe_accuracy" not in plain[0]
    whitened = collect(table, [trial("a", {"class_whitened_probe_accuracy": 0.12}), trial("b", {})])
    assert [r["class_whitened_probe_accuracy"] for r in whitened] == [0.12, None]

    # Where the probes ran but the whitening could not be fitted, a whitened target is missed.
    unwhitened = spec.objective.assess({**ten_classes, "probe_accuracy": 0.1})
    assert not unwhitened["meets_target"] and unwhitened["target_distance"] == 1.0
    ranked = Objective(metric="class_whitened_probe_accuracy", mode="min")
    assert ranked.assess({**ten_classes, "probe_accuracy": 0.1})["score"] < ranked.assess(
        {**ten_classes, "probe_accuracy": 0.1, "class_whitened_probe_accuracy": 0.9})["score"]


def test_class_gaussianized_probes_can_be_targeted_and_are_missed_where_the_map_failed():
    values = smoke_values(target={"tolerance": 0.02, "metrics": ["class_gaussianized_probe_accuracy"]})
    values["overrides"] = {**values.get("overrides", {}), "eval.class_gaussianized_probes": True}
    objective = parse(values).objective
    ten_classes = {"y_marginal_entropy_max": 2.302585092994046, "accuracy": 0.9, "probe_accuracy": 0.15}
    assert objective.assess({**ten_classes, "class_gaussianized_probe_accuracy": 0.113})["meets_target"]
    missed = objective.assess(ten_classes)  # the probes ran, the Gaussianization could not be fitted
    assert not missed["meets_target"] and missed["target_distance"] == 1.0
    row = collect(SimpleNamespace(arms=None, space={}), [SimpleNamespace(
        path="/exp/a", config={}, error=None,
        metrics={"step": 10, "score": 0.9, "final": True, "class_gaussianized_probe_accuracy": 0.11})])[0]
    assert row["class_gaussianized_probe_accuracy"] == 0.11 and "class_whitened_probe_accuracy" not in row


def test_arm_tables_show_the_class_whitened_probes_only_when_trials_report_them():
    def finished(arm, metrics):
        return {"arm": arm, "status": "finished", "meets_target": True, "accuracy": 0.9,
                "adversary_accuracy": 0.1, "adversary_floor": 0.11, "probe_accuracy": 0.2,
                "linear_probe_accuracy": 0.15, "recon_mse": 0.02, **metrics}

    spec = SimpleNamespace(arms=["off", "on"])
    plain = arm_rows(spec, [finished("off", {}), finished("on", {})])
    assert "class_whitened_probe_accuracy_mean" not in plain[0]
    assert "class_whitened" not in arms_markdown(plain)
    whitened = arm_rows(spec, [finished("off", {"class_whitened_probe_accuracy": 0.12}),
                               finished("off", {"class_whitened_probe_accuracy": 0.14}),
                               finished("on", {})])
    assert whitened[0]["class_whitened_probe_accuracy_mean"] == pytest.approx(0.13)
    assert whitened[1]["class_whitened_probe_accuracy_mean"] is None
    assert "class_whitened_linear_probe_accuracy_mean" not in whitened[0]
    header = arms_markdown(whitened).splitlines()[0]
    assert "| class_whitened_probe_accuracy % |" in header and "linear_probe_accuracy % |" in header


def test_a_configuration_searched_over_seeds_must_meet_the_target_on_every_seed():
    def trial(config, seed, score, meets=True, status="finished"):
        return {"config": config, "seed": seed, "status": status, "score": score, "meets_target": meets,
                "loss.decorrelation": 0.1 * config, "accuracy": score and max(score, 0.0),
                "adversary_accuracy": 0.1, "adversary_floor": 0.11, "probe_accuracy": 0.12,
                "linear_probe_accuracy": 0.1, "recon_mse": 0.02,
                "_params": {"loss.decorrelation": 0.1 * config, "seed": seed}}

    spec = SimpleNamespace(arms=None, space={"loss.decorrelation": None},
                           file=SimpleNamespace(seeds=[0, 1, 2]))
    rows = [trial(0, s, 0.5) for s in range(3)]
    # A higher mean score than configuration 0, but one seed misses the target.
    rows += [trial(1, 0, 0.99), trial(1, 1, 0.99), trial(1, 2, -0.02, meets=False)]
    # Every finished seed meets it, but one seed failed.
    rows += [trial(2, 0, 0.99), trial(2, 1, 0.99), trial(2, 2, None, status="error")]
    rows += [trial(3, s, 0.6) for s in range(3)]
    table = config_rows(spec, rows)
    assert [r["config"] for r in table] == [3, 0, 1, 2]
    assert [r["meets_target_on_every_seed"] for r in table] == [True, True, False, False]
    assert [r["meets_target"] for r in table] == ["3/3", "3/3", "2/3", "2/3"]
    assert table[0]["score_mean"] == pytest.approx(0.6) and table[0]["n"] == 3
    assert table[0]["_params"] == {"loss.decorrelation": pytest.approx(0.3)}  # no seed: train each
    markdown = configs_markdown(spec, table).splitlines()
    assert len(markdown) == 2 + 4 and markdown[2].startswith("| 1 | 3 | 0.3 | 3 | 0.6000 |")


def test_a_crash_while_writing_search_yaml_leaves_the_old_one(tmp_path, monkeypatch):
    from tune.storage import write_text
    write_text(str(tmp_path / "search.yaml"), "old: 1\n")

    def crash(*args):
        raise KeyboardInterrupt  # killed after writing, before the new file takes the name

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_text(str(tmp_path / "search.yaml"), "new: 2\n")
    assert (tmp_path / "search.yaml").read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["search.yaml"]

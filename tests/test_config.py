from pathlib import Path

import pytest

from daae.config import ConfigError, EvalConfig, load_config, save_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.train.batch_size >= 2


def test_overrides_are_typed_from_the_dataclass(tmp_path):
    config = load_config(CONFIGS[0], ["train.lr=1e-3", "loss.decorrelation=0",
                                      "train.lr_milestones=[5, 10]", "train.max_steps=7",
                                      "data.labels_per_class=null"])
    assert config.train.lr == 1e-3 and isinstance(config.loss.decorrelation, float)
    assert config.train.lr_milestones == [5, 10]
    assert config.train.max_steps == 7
    assert config.data.labels_per_class is None


def test_saved_config_round_trips(tmp_path):
    config = load_config(CONFIGS[0], ["seed=3", "model.kind=mlp"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_a_crash_while_saving_the_config_leaves_the_old_one(tmp_path, monkeypatch):
    old = load_config(CONFIGS[0], ["seed=3"])
    save_config(old, tmp_path / "c.yaml")

    def crash(*args):
        raise KeyboardInterrupt  # killed after writing, before the new file takes the name

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_config(load_config(CONFIGS[0], ["seed=4"]), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == old
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


@pytest.mark.parametrize("override, names", [
    ("loss.adversarial_zz=1", "loss.adversarial_zz"),
    ("trian.lr=1", "trian"),
    ("train.lr=fast", "train.lr"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.max_steps=true", "train.max_steps"),
    ("loss.decorrelation=-0.5", "loss.decorrelation"),
    ("data.labels_per_class=6000", "data.labels_per_class"),
    ("model.kind=transformer", "model.kind"),
    ("loss.decorrelation_objective=entropy", "loss.decorrelation_objective"),
    ("train.lr_milestones=[50, 20]", "train.lr_milestones"),
    ("train.lr_milestones=[20, 20]", "train.lr_milestones: must be increasing"),  # a double drop
    ("data.validation_size=1", "data.validation_size: must be at least 2"),
    ("train.critic_lr_milestones=[0]", "train.critic_lr_milestones"),
    ("train.correlation_lr_scale=0", "train.correlation_lr_scale"),
    ("model.correlation_classifiers=0", "model.correlation_classifiers"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.max_shift=-2", "data.max_shift"),
    ("loss.correlation_input=noisy", "loss.correlation_input"),
    ("loss.correlation_batch_norm=running", "loss.correlation_batch_norm"),
    ("loss.correlation_batch_norm_start_epoch=-1", "loss.correlation_batch_norm_start_epoch"),
    ("loss.consistency=-1", "loss.consistency"),
    ("loss.vat=-1", "loss.vat"),
    ("loss.vat_epsilon=0", "loss.vat_epsilon"),
    ("loss.vat_start_epoch=-1", "loss.vat_start_epoch"),
    ("eval.probe_holdout=1", "eval.probe_holdout"),
    ("eval.probe_patience=-1", "eval.probe_patience"),
    ("eval.probe_train_size=1", "eval.probe_train_size: must be at least 2"),
    ("train.lr=.inf", "train.lr: expected a finite number"),
    ("loss.decorrelation=.nan", "loss.decorrelation: expected a finite number"),
    ("eval.probe_lr=1e400", "eval.probe_lr: expected a finite number"),
    ("seed=100000000000000000000", "seed: must be in"),
    ("data.split_seed=18446744073709551616", "data.split_seed: must be in"),
    ("data.labels_per_class=6000", "before data.validation_size takes its share"),
    ("run.name=../../elsewhere", "run.name: must be a plain folder name"),
    ("run.dir=''", "run.dir: is empty"),
    ("train..lr=1", "expected a dotted key"),
    ("train=3", "train: expected a mapping of its keys, got '3'"),
])
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(CONFIGS[0], [override])


def test_consistency_without_shifts_or_noise_is_an_error_that_says_what_to_set():
    with pytest.raises(ConfigError, match=r"loss\.consistency.*data\.max_shift or model\.input_noise"):
        load_config(CONFIGS[0], ["loss.consistency=1", "data.max_shift=0", "model.input_noise=0"])
    load_config(CONFIGS[0], ["loss.consistency=1", "data.max_shift=0", "model.input_noise=0.1"])


def test_both_sets_of_codes_without_shifts_or_noise_is_an_error_that_says_what_to_set():
    with pytest.raises(ConfigError,
                       match=r"loss\.correlation_input.*data\.max_shift or model\.input_noise"):
        load_config(CONFIGS[0], ["loss.correlation_input=both", "data.max_shift=0",
                                 "model.input_noise=0"])
    load_config(CONFIGS[0], ["loss.correlation_input=both", "data.max_shift=1", "model.input_noise=0"])


def test_probe_patience_without_a_held_out_share_says_what_to_set():
    with pytest.raises(ConfigError, match=r"eval\.probe_patience.*eval\.probe_holdout"):
        load_config(CONFIGS[0], ["eval.probe_holdout=0"])
    load_config(CONFIGS[0], ["eval.probe_holdout=0", "eval.probe_patience=0"])


def test_bad_override_form_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(CONFIGS[0], ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder: pass a YAML file in it"):
        load_config(tmp_path)


def test_yaml_tags_are_not_evaluated(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_a_section_given_whole_on_the_command_line_is_merged_into_it():
    base = load_config(CONFIGS[0])
    config = load_config(CONFIGS[0], ["train={lr: 0.1}"])
    assert config.train.lr == 0.1
    assert (config.train.batch_size, config.train.epochs) == (base.train.batch_size, base.train.epochs)


def test_an_override_reaches_a_yaml_section_whose_keys_are_all_commented_out(tmp_path):
    path = tmp_path / "empty_eval.yaml"
    path.write_text("seed: 1\neval:\n  # probe_epochs: 5\n")
    assert load_config(path).eval == EvalConfig()
    assert load_config(path, ["eval.probe_epochs=2"]).eval.probe_epochs == 2


def test_a_key_written_twice_in_a_yaml_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 0.1\nmodel:\n  z_dim: 3\ntrain:\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml.*the key 'train' appears twice"):
        load_config(path)


def test_quotes_around_a_text_value_are_yamls():
    config = load_config(CONFIGS[0], ['model.kind="conv"', "run.name='quoted run'"])
    assert (config.model.kind, config.run.name) == ("conv", "quoted run")
    assert load_config(CONFIGS[0], ["run.name=off"]).run.name == "off"  # the text, not YAML's False



def test_yaml_merge_keys_are_read_and_a_list_as_a_key_is_refused(tmp_path):
    from daae.schema import read_yaml

    shared = tmp_path / "shared.yaml"
    shared.write_text("arms:\n  a: &base {train.lr: 0.001, train.epochs: 3}\n"
                      "  b: {<<: *base, train.epochs: 4}\n")
    assert read_yaml(shared)["arms"]["b"] == {"train.lr": 0.001, "train.epochs": 4}
    shared.write_text("arms:\n  a: &base {train.lr: 0.001}\n  b: {<<: *base, x: 1, x: 2}\n")
    with pytest.raises(ConfigError, match="the key 'x' appears twice"):
        read_yaml(shared)
    listed = tmp_path / "listed.yaml"
    listed.write_text("train:\n  [1, 2]: 3\n")
    with pytest.raises(ConfigError, match=r"listed\.yaml' is not valid YAML: a key must be a name"):
        load_config(listed)


@pytest.mark.parametrize("written,names", [
    ("seed=010", "seed: YAML 1.1 reads 010 as 8"),
    ("seed=0x10", "seed: YAML 1.1 reads 0x10 as 16"),
    ("train.lr=0b1", "train.lr: YAML 1.1 reads 0b1 as 1"),
    ("train.max_steps=1:30", "train.max_steps: YAML 1.1 reads 1:30 as 90"),
    ("train.max_steps=None", "write null"),
    ("train.max_steps=1e4", "write it as a whole number: 10000"),
])
def test_numbers_yaml_reads_otherwise_than_written_are_refused_with_the_fix(tmp_path, written, names):
    with pytest.raises(ConfigError, match=names):
        load_config(CONFIGS[0], [written])
    key, value = written.split("=")
    section, _, leaf = key.rpartition(".")
    path = tmp_path / "file.yaml"
    path.write_text(f"{section}:\n  {leaf}: {value}\n" if section else f"{leaf}: {value}\n")
    with pytest.raises(ConfigError, match=names):
        load_config(path)
    assert load_config(CONFIGS[0], ["run.name=010", "seed=10", "seed=0"]).run.name == "010"


def test_an_unquoted_no_for_a_text_key_in_a_file_says_to_quote_it(tmp_path):
    path = tmp_path / "bool.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    with pytest.raises(ConfigError,
                       match=r"mixed_precision: expected str, got False \(bool\); YAML reads an unquoted"):
        load_config(path)
    path.write_text("train:\n  mixed_precision: 'no'\n")
    assert load_config(path).train.mixed_precision == "no"


def test_an_error_names_the_override_or_the_file_it_was_written_in(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*\(in the override 'trian\.lr=1e-4'\)$"):
        load_config(CONFIGS[0], ["seed=1", "trian.lr=1e-4"])
    path = tmp_path / "typo.yaml"
    path.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"unknown key 'trian'.*\(in {path}\)$"):
        load_config(path, ["seed=1"])
    # A check across keys names both places.
    with pytest.raises(ConfigError, match=rf"eval\.probe_patience.*\(in {CONFIGS[0]} with the overrides\)$"):
        load_config(CONFIGS[0], ["eval.probe_holdout=0"])

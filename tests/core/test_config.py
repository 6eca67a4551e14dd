from pathlib import Path

import pytest
import yaml

from raysemi.core.config import (
    Config,
    ConfigError,
    config_from_yaml,
    config_to_yaml,
    from_dict,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_papers_and_the_hardware_choice():
    cfg = load_config(None)
    assert cfg == Config()  # nothing in the defaults file-less load differs from the tree's own defaults
    assert cfg.model.head == "projector" and cfg.pretrain.tau_base == 0.99 and cfg.pretrain.lr == 0.2
    assert (cfg.model.proj_hidden_dim, cfg.model.proj_dim, cfg.model.pred_hidden_dim) == (4096, 256, 4096)
    for stage in (cfg.pretrain, cfg.finetune):  # precision by the hardware, NHWC, no compile
        assert (stage.precision, stage.channels_last, stage.compile) == ("auto", True, False)
    assert cfg.data.decode_cache_mb == 2048


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"pretrain": {"epochs": 12, "warmup_epochs": 2}, "data": {"image_size": 32}}))
    cfg = load_config(p, ["pretrain.lr=0.05", "augment.crop_scale=[0.2, 1.0]", "data.label_fraction=0.1"])
    assert cfg.pretrain.epochs == 12 and cfg.pretrain.lr == 0.05
    assert cfg.augment.crop_scale == (0.2, 1.0)
    assert cfg.data.image_size == 32 and cfg.data.label_fraction == 0.1


def test_frozen():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.pretrain.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.epoch=3", "unknown config key pretrain.epoch"),
        ("pretrainn.epochs=3", "unknown config key pretrainn"),
        ("pretrain.epochs=three", "pretrain.epochs: expected an integer"),
        ("pretrain.epochs=2.5", "pretrain.epochs: expected an integer"),
        ("model.head=both", "model.head: 'both' is not one of"),
        ("finetune.freeze_backbone=yes please", "finetune.freeze_backbone: expected true/false"),
        ("augment.blur_p=[1.0]", "augment.blur_p: expected a list of 2 values"),
        ("pretrain.batch_size=1", "pretrain.batch_size: 1 is smaller than ray.num_workers (2)"),
        ("data.label_fraction=1.5", "data.label_fraction: must be in (0, 1] (got 1.5)"),
        ("pretrain", "is not of the form key=value"),
        ("pseudolabel.budget=1.5", "pseudolabel.budget: 1.5 is neither a fraction in (0, 1] nor a whole number"),
        ("pseudolabel.budget=0", "pseudolabel.budget: 0.0 is neither a fraction"),
        ("pseudolabel.selection=random", "pseudolabel.selection: 'random' is not one of"),
        ("pseudolabel.temperature=0", "pseudolabel.temperature: must be > 0"),
        ("pseudolabel.labeled_share=1.0", "pseudolabel.labeled_share: must be in [0, 1)"),
        ("pseudolabel.retrain_lr_scale=0", "pseudolabel.retrain_lr_scale: must be > 0"),
        ("finetune.steps=0", "finetune.steps: must be >= 1 (or null to count in epochs)"),
        ("finetune.ema_decay=1.0", "finetune.ema_decay: must be in [0, 1) (got 1.0)"),
        ("finetune.drop_path_rate=1", "finetune.drop_path_rate: must be in [0, 1)"),
        ("augment.finetune_policy=autoaugment", "augment.finetune_policy: 'autoaugment' is not one of"),
        ("augment.finetune_crop_scale=[0.5, 0.2]", "augment.finetune_crop_scale: (0.5, 0.2) is not in (0, 1]"),
        ("run.select_metric=loss", "run.select_metric: 'loss' is not one of"),
        ("pretrain.precision=fp8", "pretrain.precision: 'fp8' is not one of"),
        ("finetune.compile=maybe", "finetune.compile: expected true/false"),
        ("data.decode_cache_mb=-1", "data.decode_cache_mb: must be >= 0 (0 = off) (got -1)"),
        ("pretrain.epochs=0", "pretrain.epochs: must be >= 1 (got 0)"),
        ("pretrain.epochs=true", "pretrain.epochs: expected an integer, got True"),
        ("pretrain.lr=false", "pretrain.lr: expected a number, got False"),
        ("data.path=3", "data.path: expected a string, got 3"),
        ("augment.blur_p=[1.5, 0.1]", "augment.blur_p[0]: must be in [0, 1] (got 1.5)"),
        ("augment.std=[0.2, 0, 0.2]", "augment.std[1]: must be > 0 (got 0)"),
        ("augment.mean=grey", "augment.mean: expected a list of 3 values, got 'grey'"),
        ("pseudolabel.budget=.inf", "pseudolabel.budget: inf is neither a fraction"),
        ("model.sync_batchnorm=true", "model.sync_batchnorm: needs ray.use_gpu=true"),
        ("pretrain.warmup_epochs=101", "pretrain.warmup_epochs: 101 is outside [0, pretrain.epochs=100]"),
        ("pseudolabel.cpus_per_actor=0", "pseudolabel: an actor needs CPUs or GPUs"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, [override])


def test_budget_fraction_or_count_and_steps_null():
    cfg = load_config(None, ["pseudolabel.budget=500", "finetune.steps=null"])
    assert cfg.pseudolabel.budget == 500.0 and cfg.finetune.steps is None
    assert load_config(None, ["pseudolabel.budget=0.2"]).pseudolabel.budget == 0.2


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbone: resnet18\n  heads: 2\n")
    with pytest.raises(ConfigError, match="unknown config key model.heads"):
        load_config(p)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["pretrain.epochs=7", "pretrain.warmup_epochs=1", "run.mode=supervised"])
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg


def test_parse_override_types():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=s3://x/y") == ("a.b", "s3://x/y")


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_local_paths_become_absolute_uris_stay(tmp_path, monkeypatch):
    from raysemi.core.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.path=data/covid19", "run.output_dir=s3://bucket/runs", "pretrain.cache=~/cache"])
    out = absolute_paths(cfg)
    assert out.data.path == str(tmp_path / "data" / "covid19")
    assert out.run.output_dir == "s3://bucket/runs"
    assert out.pretrain.cache == str(Path.home() / "cache")
    assert out.ray.storage_path is None
    assert absolute_paths(out) == out


def test_the_demo_config_is_packaged_and_equals_the_repository_copy():
    """``raysemi demo`` from a wheel reads the config inside the package (never the defaults)."""
    import tomllib

    from raysemi.commands import demo

    root = Path(__file__).resolve().parents[2]
    assert demo.DEMO_CONFIG.parent.parent == root / "raysemi" and demo.DEMO_CONFIG.is_file()
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "configs/*.yaml" in package_data["raysemi"]
    assert yaml.safe_load(demo.DEMO_CONFIG.read_text()) == yaml.safe_load((root / "configs" / "demo.yaml").read_text())
    assert load_config(demo.DEMO_CONFIG).model.backbone == "test_resnet"  # not the default resnet18


def test_demo_refuses_to_run_without_its_config(tmp_path, monkeypatch):
    from raysemi.commands import demo
    from raysemi.core.errors import RaysemiError

    monkeypatch.setattr(demo, "DEMO_CONFIG", tmp_path / "missing.yaml")
    with pytest.raises(RaysemiError, match="demo config .* is missing"):
        demo.run_demo(str(tmp_path / "out"))


def test_placement_strategy_reaches_train_and_the_actors():
    from raysemi.distributed import ray_utils

    default = load_config(None, [])
    assert default.ray.placement_strategy == "PACK"
    assert ray_utils.scaling_config(default.ray).placement_strategy == "PACK"
    assert ray_utils.actor_scheduling(default.ray) == ray_utils.OUTSIDE_PLACEMENT_GROUP
    for strategy in ("SPREAD", "STRICT_SPREAD"):
        rc = load_config(None, [f"ray.placement_strategy={strategy}"]).ray
        assert ray_utils.scaling_config(rc).placement_strategy == strategy
        assert ray_utils.actor_scheduling(rc) == {"scheduling_strategy": "SPREAD"}
    with pytest.raises(ConfigError, match="ray.placement_strategy"):
        load_config(None, ["ray.placement_strategy=spread"])


def test_min_workers_makes_train_elastic_between_it_and_num_workers():
    from raysemi.distributed import ray_utils

    fixed = ray_utils.scaling_config(load_config(None, ["ray.num_workers=3"]).ray)
    assert not fixed.elasticity_enabled and (fixed.min_workers, fixed.max_workers) == (3, 3)
    same = ray_utils.scaling_config(load_config(None, ["ray.num_workers=3", "ray.min_workers=3"]).ray)
    assert not same.elasticity_enabled
    elastic = ray_utils.scaling_config(
        load_config(None, ["ray.num_workers=3", "ray.min_workers=1", "ray.resize_interval_s=5"]).ray)
    assert elastic.elasticity_enabled and (elastic.min_workers, elastic.max_workers) == (1, 3)
    assert elastic.elastic_resize_monitor_interval_s == 5
    for bad, message in (("ray.min_workers=0", r"ray.min_workers: must be >= 1 \(got 0\)"),
                         ("ray.min_workers=4", r"ray.min_workers: 4 is not between 1 and ray.num_workers \(3\)")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["ray.num_workers=3", bad])
    with pytest.raises(ConfigError, match="ray.resize_interval_s"):
        load_config(None, ["ray.resize_interval_s=-1"])


def test_collective_timeout_reaches_the_process_group_and_is_checked(monkeypatch):
    import ray.train.torch

    from raysemi.distributed import ray_session, ray_utils
    from raysemi.distributed.ray_rendezvous import LoopbackTorchConfig

    built = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            built.update(kwargs)

        def fit(self):
            return None

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Recorder)
    monkeypatch.setattr(ray_session, "init_ray", lambda address=None: None)
    cfg = load_config(None, ["ray.collective_timeout_s=7200"])
    assert load_config(None).ray.collective_timeout_s == 3600
    ray_utils.fit(lambda c: None, {}, cfg, "x")
    assert isinstance(built["torch_config"], LoopbackTorchConfig) and built["torch_config"].timeout_s == 7200
    with pytest.raises(ConfigError, match="ray.collective_timeout_s: must be >= 1"):
        load_config(None, ["ray.collective_timeout_s=0"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"data": {"imag_size": 32}}, "unknown config key data.imag_size (known: decode_cache_mb, image_size,"),
        ({"dataa": {}}, "unknown config key dataa (known: augment, data, finetune,"),
        ({"data": {1: 2}}, "unknown config key data.1"),
        ({"data": "here"}, "data: expected a mapping, got 'here'"),
        ([1, 2], "config: expected a mapping, got [1, 2]"),
        ({"pretrain": {"epochs": "3"}}, "pretrain.epochs: expected an integer, got '3'"),
        ({"pretrain": {"epochs": True}}, "pretrain.epochs: expected an integer, got True"),
        ({"pretrain": {"epochs": 3.0}}, "pretrain.epochs: expected an integer, got 3.0"),
        ({"pretrain": {"lr": "0.1"}}, "pretrain.lr: expected a number, got '0.1'"),
        ({"model": {"small_image": 1}}, "model.small_image: expected true/false, got 1"),
        ({"augment": {"crop_scale": [0.2, "1"]}}, "augment.crop_scale[1]: expected a number, got '1'"),
        ({"data": {"label_fraction": 0.1, "labels_per_class": 5}},
         "data.label_fraction and data.labels_per_class: set at most one"),
        ({"finetune": {"batch_size": 4}, "ray": {"num_workers": 8}},
         "finetune.batch_size: 4 is smaller than ray.num_workers (8)"),
    ],
)
def test_from_dict_refuses_in_one_line_naming_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_yaml_gives_ints_for_floats_and_lists_for_tuples():
    cfg = from_dict({"pretrain": {"lr": 1}, "augment": {"crop_scale": [1, 1], "std": [1, 1, 1]}})
    assert cfg.pretrain.lr == 1.0 and type(cfg.pretrain.lr) is float
    assert cfg.augment.crop_scale == (1.0, 1.0) and type(cfg.augment.crop_scale) is tuple
    assert all(type(v) is float for v in cfg.augment.std)


def test_replace_validates_and_leaves_the_original():
    cfg = Config()
    assert cfg.replace(**{"pretrain.epochs": 5, "pretrain.warmup_epochs": 1}).pretrain.epochs == 5
    with pytest.raises(ConfigError, match=r"^pretrain.epochs: must be >= 1 \(got 0\)$"):
        cfg.replace(**{"pretrain.epochs": 0})
    with pytest.raises(ConfigError, match="^pretrain.warmup_epochs: 10 is outside"):  # the cross-field check too
        cfg.replace(**{"pretrain.epochs": 5})
    with pytest.raises(ConfigError, match="^unknown config key pretrain.epoch$"):
        cfg.replace(**{"pretrain.epoch": 5})
    assert cfg == Config()


def test_yaml_round_trip_equality_hash_and_pickle():
    import dataclasses
    import pickle

    cfg = load_config(REPO / "configs" / "demo.yaml", ["augment.crop_scale=[0.25, 1]", "data.label_fraction=0.2"])
    assert config_from_yaml(config_to_yaml(cfg)) == cfg
    assert yaml.safe_load(config_to_yaml(cfg))["augment"]["crop_scale"] == [0.25, 1.0]  # plain lists, not tuples
    assert pickle.loads(pickle.dumps(cfg)) == cfg and hash(pickle.loads(pickle.dumps(cfg))) == hash(cfg)
    # The sections stay dataclasses: the data-loading tests vary them with dataclasses.replace.
    assert dataclasses.replace(cfg.augment, hue=0.1).hue == 0.1

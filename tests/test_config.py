"""Profiles: choosing one, overriding keys, inheriting recipes, clear errors."""
import pytest
import torch

from dpo_lib.core.config import PROFILES, load_config, resolve_profile

def merged(base: dict, update: dict) -> dict:
    """A plain recursive merge, written here again: the test's own account of inheritance."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def stated(name: str) -> dict:
    """What a profile's YAML files state, following ``base:`` by hand."""
    import yaml

    from dpo_lib.core.config import CONFIG_DIR

    data = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
    base = data.pop("base", None)
    return merged(stated(base), data) if base else data


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_resolves_to_its_files_over_the_schema_defaults(name):
    """Each key: the value its YAML (or its base's) states, else the schema's default."""
    from dpo_lib.core.schema import default_settings

    cfg = load_config(name)
    assert cfg.to_dict() == merged(default_settings(), stated(name))
    assert cfg.profile == name and 0 < cfg.data.max_prompt_length < cfg.data.max_length


#: Every key whose values come from a fixed set, with that set, written out here.
CHOICES = {
    "model.quantization": ("none", "nf4", "fp4", "int8", "bf16", "fp16", "fp32"),
    "model.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.order": ("file", "shuffled"),
    "data.eval_split": ("test", "dev"),
    "data.pair_filter": ("ches", "random", "file"),
    "train.stage": ("sft", "preference"),
    "train.loss_type": ("dpo", "cdpo", "ipo", "rpo", "simpo"),
    "train.lr_scheduler": ("cosine", "linear", "constant"),
    "train.optimizer": ("adamw", "adamw_8bit", "paged_adamw_8bit"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.group_length": ("row", "longer_side"),
    "train.wandb": ("disabled", "offline", "online"),
}


def test_the_schema_declares_exactly_these_choice_keys():
    from dpo_lib.core.schema import choices, describe_keys

    declared = {key: choices(key) for key, *_ in describe_keys() if choices(key)}
    assert declared == CHOICES


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_value_outside_a_keys_set_is_refused_when_the_config_loads(key):
    from dpo_lib.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides={key: CHOICES[key][0] + "x"})
    message = str(info.value)
    assert key in message and all(value in message for value in CHOICES[key]), message
    for value in CHOICES[key]:                  # every allowed value loads (with what it needs)
        needs = {"data.pair_filter_file": "drops.json"} if (key, value) == ("data.pair_filter",
                                                                     "file") else {}
        assert load_config("tiny", overrides={key: value, **needs}).get_path(key) == value


def test_the_choices_are_the_ones_the_code_implements():
    """The declared sets against the code that uses them: the loss functions, the data orders,
    the quantizations, transformers' schedulers."""
    from transformers import SchedulerType

    from dpo_lib.core import data, losses, models

    assert set(CHOICES["train.loss_type"]) == set(losses.LOSS_TYPES)
    assert set(CHOICES["data.order"]) == set(data.ORDERS)
    assert set(CHOICES["model.quantization"]) == set(models.QUANTIZATIONS)
    assert set(CHOICES["train.lr_scheduler"]) <= {s.value for s in SchedulerType}


@pytest.mark.parametrize("overrides, message", [
    ({"train.beta": 0.0}, "beta must be positive"),
    ({"train.label_smoothing": 0.1}, "only used by loss_type=cdpo"),
    ({"train.loss_type": "cdpo", "train.label_smoothing": 0.5}, r"\[0, 0.5\)"),
    ({"train.rpo_alpha": -1.0}, "rpo_alpha must be >= 0"),
    ({"data.pair_filter_share": 1.0}, "pair_filter_share"),
    ({"data.pair_filter": "file"}, "set both or neither"),
    ({"data.pair_filter_file": "drops.json"}, "set both or neither"),
    ({"data.pair_filter": "ches", "data.pair_filter_file": "drops.json"}, "set both or neither"),
    ({"data.pair_filter": "file", "data.pair_filter_file": "drops.json",
      "data.pair_filter_share": 0.2}, "leave data.pair_filter_share at 0"),
    ({"data.test_fraction": 0.0}, "test_fraction must be in"),
    ({"data.dev_fraction": 0.2}, "dev_fraction=0.2 needs a test_fraction"),
    ({"data.test_fraction": 0.6, "data.dev_fraction": 0.5}, "below 1"),
    ({"data.max_prompt_length": 200}, "max_prompt_length"),
    ({"train.batch_size": 0}, "batch_size"),
    ({"train.resume": True, "train.overwrite": True}, "cannot both be true"),
])
def test_values_a_run_cannot_use_are_refused_when_the_config_loads(overrides, message):
    from dpo_lib.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=overrides)


def test_environment_variable_picks_profile(monkeypatch):
    monkeypatch.setenv("DPO_PROFILE", "tiny")
    assert load_config().profile == "tiny"
    assert load_config("cpu").profile == "cpu"  # an explicit name wins


def test_auto_picks_by_cuda(monkeypatch):
    monkeypatch.setenv("DPO_PROFILE", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_profile() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_profile() == "gpu"


def test_unknown_profile_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("DPO_PROFILE", "huge")
    with pytest.raises(ValueError) as info:
        load_config()
    for name in PROFILES + ("auto", "'huge'", "$DPO_PROFILE"):
        assert name in str(info.value)


def test_overrides_dotted_and_cli_style():
    cfg = load_config("tiny", overrides={"data.max_length": 64, "data.max_prompt_length": 48})
    assert cfg.data.max_length == 64
    cfg = load_config("tiny", overrides=["train.beta=0.5", "model.quantization=nf4",
                                         "data.data_dir=harmless-base"])
    assert cfg.train.beta == 0.5 and cfg.model.quantization == "nf4"
    assert cfg.data.data_dir == "harmless-base"
    assert load_config("tiny").data.max_length == 128  # overrides never leak


def test_unknown_override_key_suggests_the_right_one():
    from dpo_lib.core.errors import UnknownKeyError

    with pytest.raises(UnknownKeyError, match="data.max_length"):
        load_config("tiny", overrides={"data.max_lenght": 64})
    with pytest.raises(ValueError, match="key=value"):
        load_config("tiny", overrides=["data.max_length"])


def test_recipe_file_inherits_a_profile(tmp_path):
    recipe = tmp_path / "short.yaml"
    recipe.write_text("base: tiny\ntrain:\n  sft_steps: 3\n")
    cfg = load_config(str(recipe))
    assert cfg.train.sft_steps == 3 and cfg.train.batch_size == 8 and cfg.profile == "tiny"
    saved = cfg.save(tmp_path / "saved.yaml")
    assert load_config(str(saved)).to_dict() == cfg.to_dict()


def test_config_is_read_only():
    cfg = load_config("tiny")
    with pytest.raises(AttributeError):
        cfg.seed = 3
    with pytest.raises(AttributeError, match="has no key"):
        cfg.model.nme


def test_unique_leaf_names_need_no_section():
    cfg = load_config("tiny", overrides=["output_dir=runs/x", "loss_type=ipo"])
    assert cfg.train.output_dir == "runs/x" and cfg.train.loss_type == "ipo"


def test_every_recipe_file_loads():
    from dpo_lib.core.config import CONFIG_DIR, available_profiles

    recipes = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.stem not in available_profiles())
    assert len(recipes) >= 6
    for recipe in recipes:
        cfg = load_config(str(recipe))
        assert cfg.profile in available_profiles() and cfg.train.stage in ("sft", "preference")
        if cfg.train.stage == "preference":
            # internlm2-chat-1_8b-sft is already a chat SFT model: IPO starts from it directly
            if cfg.model.name != "internlm/internlm2-chat-1_8b-sft":
                assert cfg.train.init_adapter == f"runs/{cfg.profile}-sft"
            assert recipe.stem.endswith(cfg.train.loss_type)
        assert cfg.model.trust_remote_code == (recipe.stem == "gpu-internlm2-ipo")


def test_the_real_data_profile_holds_out_a_slice_of_its_one_file():
    cfg = load_config("cpu-hh")
    assert cfg.data.source.startswith("hh-rlhf:") and cfg.data.order == "shuffled"
    assert 0 < cfg.data.test_fraction < 0.5
    for stage in ("sft", "dpo", "ipo"):
        recipe = load_config(f"configs/cpu-hh-{stage}.yaml")
        assert recipe.profile == "cpu-hh" and recipe.data.to_dict() == cfg.data.to_dict()


def test_figures_never_go_to_the_committed_folder_under_pytest():
    """The root conftest.py points DPO_FIGURES_DIR away from figures/ and notebooks/."""
    from dpo_lib.core.config import FIGURES_DIR, REPO_ROOT

    for committed in (REPO_ROOT / "figures", REPO_ROOT / "notebooks"):
        assert FIGURES_DIR != committed and committed not in FIGURES_DIR.parents, FIGURES_DIR


def test_importing_the_config_creates_no_folder(tmp_path):
    import os
    import subprocess
    import sys

    target = tmp_path / "not" / "yet"
    env = {**os.environ, "DPO_FIGURES_DIR": str(target)}
    code = "import dpo_lib.core.config as c; print(c.FIGURES_DIR)"
    printed = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
    assert printed == str(target.resolve()) and not target.exists()

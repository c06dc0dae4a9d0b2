"""Profiles: choosing one, overriding keys, inheriting recipes, clear errors."""
import pytest
import torch

from dpo_lib.core.config import PROFILES, load_config, resolve_profile

REQUIRED = ["model.name", "model.quantization", "data.source", "data.max_length",
            "data.max_prompt_length", "train.batch_size", "train.sft_steps",
            "train.preference_steps"]


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_fixes_the_required_keys(name):
    cfg = load_config(name)
    assert cfg.profile == name
    for key in REQUIRED:
        assert cfg.get_path(key) is not None, key
    assert 0 < cfg.data.max_prompt_length < cfg.data.max_length


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
    cfg = load_config("tiny", overrides={"data.max_length": 64})
    assert cfg.data.max_length == 64
    cfg = load_config("tiny", overrides=["train.beta=0.5", "model.quantization=nf4",
                                         "data.data_dir=harmless-base"])
    assert cfg.train.beta == 0.5 and cfg.model.quantization == "nf4"
    assert cfg.data.data_dir == "harmless-base"
    assert load_config("tiny").data.max_length == 128  # overrides never leak


def test_unknown_override_key_suggests_the_right_one():
    with pytest.raises(KeyError, match="data.max_length"):
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

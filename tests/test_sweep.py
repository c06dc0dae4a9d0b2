"""The sweep runner: run configs, skipping complete runs, collecting logs."""
import pytest

from dpo_lib.lessons import analysis

from dpo_lib.training import sweep
from dpo_lib.training import train as train_lib
from dpo_lib.core.config import load_config


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sweep, "RUNS_DIR", tmp_path / "runs")


def test_sweep_runs_once_and_collects_logs(tmp_path, monkeypatch):
    cfg = load_config("tiny", overrides={"train_limit": 16, "test_limit": 8, "eval_every": 0,
                                         "save_every": 0, "preference_steps": 2,
                                         "sft_steps": 2})
    train_lib.train(cfg.with_overrides({"output_dir": str(tmp_path / "runs" / "tiny-sft")}),
                    progress=False)
    file = tmp_path / "sweep.yaml"
    file.write_text("common: {beta: 0.2}\nruns:\n  a: {loss_type: dpo, init_adapter: sft}\n"
                    "  b: {loss_type: ipo, seed: 1, beta: 0.5}\n")
    folders = sweep.run_sweep(file, cfg, out_dir=tmp_path / "out", progress=False)
    assert set(folders) == {"a", "b"}
    a = load_config(str(folders["a"] / "config.yaml"))
    assert a.train.init_adapter == str(tmp_path / "runs" / "tiny-sft") and a.train.beta == 0.2
    b = load_config(str(folders["b"] / "config.yaml"))
    assert (b.seed, b.train.beta, b.train.loss_type, b.train.stage) == (1, 0.5, "ipo",
                                                                           "preference")
    runs = analysis.load_sweep_runs(tmp_path / "out")
    assert set(runs) == {"a", "b"} and len(runs["a"][0]) == 2

    calls = []
    monkeypatch.setattr(train_lib, "train", lambda *args, **kw: calls.append(args))
    sweep.run_sweep(file, cfg, progress=False)          # both complete: nothing runs again
    assert calls == []


def test_bad_sweep_file(tmp_path):
    file = tmp_path / "sweep.yaml"
    file.write_text("runs: []\n")
    with pytest.raises(ValueError, match="runs"):
        sweep.load_sweep(file)
    file.write_text("common: [1]\nruns: {a: {}}\n")
    with pytest.raises(ValueError, match="common"):
        sweep.load_sweep(file)
    with pytest.raises(FileNotFoundError):
        analysis.load_sweep_runs(tmp_path)


def test_a_sweep_files_relative_drop_file_is_read_from_its_folder(tmp_path):
    folder = tmp_path / "sweeps"
    (folder / "drops").mkdir(parents=True)
    file = folder / "sweep.yaml"
    file.write_text("runs:\n  a: {pair_filter: file, pair_filter_file: drops/a.json}\n"
                    f"  b: {{pair_filter: file, pair_filter_file: {tmp_path / 'b.json'}}}\n"
                    "  c: {data.pair_filter_file: drops/c.json, pair_filter: file}\n")
    runs = sweep.load_sweep(file)
    assert runs["a"]["pair_filter_file"] == str(folder / "drops" / "a.json")
    assert runs["b"]["pair_filter_file"] == str(tmp_path / "b.json")        # absolute: as given
    assert runs["c"]["data.pair_filter_file"] == str(folder / "drops" / "c.json")
    cfg = sweep.config_of_run(load_config("tiny"), "a", runs["a"])
    assert cfg.data.pair_filter_file == str(folder / "drops" / "a.json")


def test_only_trains_the_named_runs(tmp_path, monkeypatch):
    file = tmp_path / "sweep.yaml"
    file.write_text("runs:\n  a: {seed: 0}\n  b: {seed: 1}\n  c: {seed: 2}\n")
    runs = sweep.load_sweep(file)
    assert list(sweep.select_runs(runs, ["c", "a"])) == ["a", "c"]      # the file's order
    assert sweep.select_runs(runs, None) == runs
    with pytest.raises(ValueError, match="no run d in the sweep"):
        sweep.select_runs(runs, ["a", "d"])
    trained = []
    monkeypatch.setattr(train_lib, "train", lambda cfg, **kw: trained.append(cfg.seed))
    status = sweep.main([str(file), "--profile", "tiny", "--only", "b", "--no-progress"])
    assert status == 0 and trained == [1]
    from dpo_lib.lessons import compare
    assert list(compare.sweep_runs(load_config("tiny"), file, ["c"])) == ["SFT", "C"]


def test_store_half_precision_copies_logs_and_halves_the_adapter(tmp_path):
    """The committed copy of a run: its logs as they are, its adapter in float16 (half the bytes),
    each value within float16's rounding of the original (relative 2**-11 of its tensor's largest)."""
    import pytest
    import torch
    from safetensors.torch import load_file, save_file

    from dpo_lib.training.sweep import store_half_precision

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (run / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    generator = torch.Generator().manual_seed(0)
    weights = {"a.lora_A.weight": torch.randn(8, 64, generator=generator) * 0.02,
               "a.lora_B.weight": torch.randn(64, 8, generator=generator) * 1e-3}
    save_file(weights, run / "adapter" / "adapter_model.safetensors")
    worst = store_half_precision(run, tmp_path / "copy")
    copied = load_file(tmp_path / "copy" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float16 for t in copied.values())
    for name, tensor in weights.items():
        change = (copied[name].float() - tensor).abs().max() / tensor.abs().max()
        assert 0 < change <= 2 ** -11 and change <= worst + 1e-12
    assert (tmp_path / "copy" / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    assert (tmp_path / "copy" / "adapter" / "adapter_config.json").is_file()
    size = (tmp_path / "copy" / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 0.6 * (run / "adapter" / "adapter_model.safetensors").stat().st_size
    save_file({"w": torch.tensor([1e6])}, run / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="float16"):
        store_half_precision(run, tmp_path / "overflow")
    assert not (tmp_path / "overflow").exists()            # nothing half-written

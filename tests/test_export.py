"""GGUF export: merge, llama.cpp conversion and quantization, verification, chat.

Runs use a LoRA adapter with random non-zero weights (what training would leave; the merge does
not care how they were found), saved with the run's config like a finished training run.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="GGUF export needs llama-cpp-python (the deploy extra)")

from dpo_lib.deploy import export, gguf_check, llama_runtime  # noqa: E402
from dpo_lib.core.runs import load_run_config  # noqa: E402
from dpo_lib.deploy.chat import reply, stream_reply  # noqa: E402
from dpo_lib.core.config import load_config  # noqa: E402
from dpo_lib.core.lora import add_lora  # noqa: E402
from dpo_lib.core.models import load_model, load_tokenizer, smollm2_gguf_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_run(folder: Path, profile: str, overrides=None, seed: int = 0):
    """A finished-looking run: config.yaml and adapter/ (random LoRA B), and the PEFT model."""
    cfg = load_config(profile, overrides=overrides or {})
    cfg = cfg.with_overrides({"train.output_dir": str(folder)})
    model = add_lora(load_model(cfg), cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(folder / "adapter")
    cfg.save(folder / "config.yaml")
    return model.eval()


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny-run")
    model = make_run(run, "tiny")
    files = export.export_run(run, ("q8_0", "q4_k_m"), progress=False)
    return run, model, files


@pytest.fixture(scope="module")
def merged_model(tiny_export):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_export[2]["merged"], dtype=torch.float32).eval()


def test_converter_matches_runtime():
    import llama_cpp

    folder = llama_runtime.converter_dir()
    assert (folder / "VERSION").read_text().strip() == llama_cpp.__version__
    assert (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py").is_dir()


def test_converter_of_another_version_is_refused(tmp_path, monkeypatch):
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    (tmp_path / "VERSION").write_text("0.0.1\n")
    monkeypatch.setenv(llama_runtime.CONVERTER_ENV, str(tmp_path))
    with pytest.raises(llama_runtime.ConverterVersionError, match="0.0.1.*--fetch-converter"):
        llama_runtime.converter_dir()


def test_checkpoint_of_another_transformers_major_is_refused(tiny_export, tmp_path):
    copy = tmp_path / "merged"
    shutil.copytree(tiny_export[2]["merged"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "4.46.3"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(llama_runtime.ConverterVersionError, match="rotary_pct"):
        export.convert_to_gguf(copy, tmp_path / "x.gguf")


def test_missing_adapter_and_missing_run_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        export.export_run(tmp_path)
    load_config("tiny").save(tmp_path / "config.yaml")
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter.*unfinished run"):
        export.export_run(tmp_path)


def test_unknown_quantization_type(tiny_export, tmp_path):
    with pytest.raises(ValueError, match="unknown GGUF type 'q9_9'"):
        export.quantize_gguf(tiny_export[2]["f16"], tmp_path / "x.gguf", "q9_9")
    with pytest.raises(ValueError, match="unknown GGUF type"):
        export.export_run(tiny_export[0], "q8_0,q9_9", out_dir=tmp_path)


def test_unsupported_architecture(tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                       num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    load_tokenizer("tiny-gpt-neox").save_pretrained(tmp_path)
    with pytest.raises(llama_runtime.UnsupportedArchitectureError, match="does not support OPTForCausalLM"):
        export.convert_to_gguf(tmp_path, tmp_path / "x.gguf")


def test_gpt_neox_header_has_the_partial_rotary_dimension(tiny_export):
    meta = llama_runtime.gguf_metadata(tiny_export[2]["f16"])
    # tiny-gpt-neox: head dim 64 / 4 = 16, partial_rotary_factor 0.25 -> 4 rotary dimensions
    assert meta["general.architecture"] == "gptneox"
    assert meta["gptneox.rope.dimension_count"] == 4
    config = json.loads((Path(tiny_export[2]["merged"]) / "config.json").read_text())
    config["rope_parameters"]["partial_rotary_factor"] = 0.5
    with pytest.raises(llama_runtime.ExportError, match="rope.dimension_count"):
        export.check_gguf_hparams(tiny_export[2]["f16"], config)


def test_f16_gguf_matches_transformers_and_quantized_files_differ_a_little(tiny_export, merged_model):
    examples, sequences = gguf_check.held_out(tiny_export[0], n_pairs=8)
    results = {}
    for name in ("f16", "q8_0", "q4_k_m"):
        llm = gguf_check.open_gguf(tiny_export[2][name], n_ctx=256)
        try:
            results[name] = gguf_check.compare_logits(llm, merged_model, sequences)
        finally:
            llm.close()
    print({k: round(v["kl"], 8) for k, v in results.items()})
    assert results["f16"]["kl"] < 1e-4 and results["f16"]["top1"] > 0.99
    assert results["f16"]["kl"] < results["q8_0"]["kl"] < results["q4_k_m"]["kl"]
    assert abs(results["f16"]["ppl_gguf"] / results["f16"]["ppl_hf"] - 1) < 1e-3


def test_compare_logits_of_two_transformers_models(merged_model, tiny_export):
    """The merged checkpoint against the PEFT model it came from (tiny is unquantized, so the
    merge is exact), and against the base model without the adapter (it is not)."""
    _, sequences = gguf_check.held_out(tiny_export[0], n_pairs=2)
    peft_model = tiny_export[1]
    same = gguf_check.compare_logits(merged_model, peft_model, sequences)
    assert same["kl"] < 1e-6 and same["top1"] == 1
    assert abs(same["ppl_gguf"] / same["ppl_hf"] - 1) < 1e-5
    with peft_model.disable_adapter():
        other = gguf_check.compare_logits(merged_model, peft_model, sequences)
    assert other["kl"] > 1e-4


def test_fallback_tensors_are_counted(tiny_export):
    record = json.loads((Path(tiny_export[2]["f16"]).parent / "export.json").read_text())
    # tiny-gpt-neox's 64-wide rows cannot take K-quant blocks of 256; Q8_0 has blocks of 32
    assert record["fallback_tensors"]["q4_k_m"] > 0 and record["fallback_tensors"]["q8_0"] == 0
    assert export.fallback_tensors(["x: WARNING: 7 of 28 tensor(s) required fallback "
                                    "quantization"]) == 7


def test_quantized_files_load_and_generate(tiny_export):
    for name in ("q8_0", "q4_k_m"):
        llm = gguf_check.open_gguf(tiny_export[2][name], n_ctx=128, logits_all=False)
        try:
            tokens = llm.tokenize(b"\n\nHuman: hello\n\nAssistant:")
            made = [t for _, t in zip(range(8), llm.generate(tokens, temp=0.0))]
        finally:
            llm.close()
        assert len(made) == 8 and all(0 <= t < 1024 for t in made)


def test_pair_logps_of_gguf_equal_transformers(tiny_export, merged_model):
    """The prompt-cache reuse in pair_logps_gguf gives the same sums as full sequences."""
    examples, _ = gguf_check.held_out(tiny_export[0], n_pairs=8)
    llm = gguf_check.open_gguf(tiny_export[2]["f16"], n_ctx=256)
    try:
        ours = gguf_check.pair_logps_gguf(llm, examples)
    finally:
        llm.close()
    theirs = gguf_check.pair_logps_hf(merged_model, examples)
    np.testing.assert_allclose(ours[0], theirs[0], atol=2e-2)
    np.testing.assert_allclose(ours[1], theirs[1], atol=2e-2)
    assert not np.allclose(ours[0], ours[1])


def test_check_gguf_is_compare_logits_and_pair_logps_in_one_pass(tiny_export, merged_model):
    """verify_exports' single pass per file gives what the two separate passes give: the same KL,
    top-1 and perplexities as compare_logits on the chosen sequences, the same pair log-probs as
    pair_logps_gguf (the same llama.cpp evaluations, so equal to rounding of the sums), with the
    transformers log-probs computed inside or handed in."""
    examples, sequences = gguf_check.held_out(tiny_export[0], n_pairs=8)
    llm = gguf_check.open_gguf(tiny_export[2]["q8_0"], n_ctx=256)
    try:
        separate = gguf_check.compare_logits(llm, merged_model, sequences)
        pairs = gguf_check.pair_logps_gguf(llm, examples)
        cached = [gguf_check.hf_log_probs(merged_model, ids) for ids in sequences]
        for reference in (None, cached):
            logits, one_pass = gguf_check.check_gguf(llm, merged_model, examples, reference)
            assert logits["tokens"] == separate["tokens"]
            for key in ("kl", "top1", "ppl_gguf", "ppl_hf"):
                assert logits[key] == pytest.approx(separate[key], rel=1e-9, abs=1e-12), key
            for ours, theirs in zip(one_pass, pairs):
                np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    finally:
        llm.close()
    assert separate["kl"] > 0 and not np.allclose(pairs[0], pairs[1])


def test_preference_accuracies():
    policy = (np.array([-1.0, -5.0, -2.0]), np.array([-3.0, -4.0, -2.0]))
    reference = (np.array([-2.0, -6.0, -1.0]), np.array([-2.0, -6.0, -3.0]))
    out = gguf_check.preference_accuracies(policy, reference)
    assert out["ranking_accuracy"] == pytest.approx(1 / 3)
    # margins: (1 - -1) = 2 > 0, (1 - 2) = -1, (-1 - 1) = -2
    assert out["reward_accuracy"] == pytest.approx(1 / 3)
    right = gguf_check.preference_right(policy, reference)
    assert right["ranking"].tolist() == [True, False, False]       # -1 > -3; -5 < -4; a tie
    assert right["reward"].tolist() == [True, False, False]


def test_verify_exports_table(tiny_export):
    table = gguf_check.verify_exports(tiny_export[0], tiny_export[2], n_pairs=8, runtime=True,
                                      progress=False)
    assert list(table.index) == ["transformers fp32", "f16", "q8_0", "q4_k_m"]
    assert table.loc["f16", "kl"] < 1e-4
    assert (table["file_mb"].iloc[1:].diff().dropna() < 0).all()        # f16 > q8_0 > q4_k_m
    assert (table.loc[["f16", "q8_0", "q4_k_m"], "tokens_per_second"] > 0).all()
    assert "reward_accuracy" not in table                                # no reference given
    right = table.attrs["right"]
    assert list(right) == list(table.index) and all(list(r) == ["ranking"] for r in right.values())
    for name, row in table.iterrows():                                   # pair by pair -> mean
        assert len(right[name]["ranking"]) == table.attrs["pairs"]
        assert np.mean(right[name]["ranking"]) == row["ranking_accuracy"]


def test_merge_target_is_the_dequantized_nf4_base(tmp_path):
    """QLoRA: the adapter learned against the NF4 weights; merged into them, the model is the one
    trained; merged into the original full-precision weights, it is not."""
    run = tmp_path / "run"
    trained = make_run(run, "tiny", {"model.quantization": "nf4"})
    ids = torch.tensor([list(range(5, 69))])
    with torch.no_grad():
        expected = torch.log_softmax(trained(ids).logits.float(), -1)
    errors = {}
    for target in ("quantized", "original"):
        from transformers import AutoModelForCausalLM

        folder = export.merge_adapter(run, tmp_path / target, target=target)
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            got = torch.log_softmax(merged(ids).logits.float(), -1)
        errors[target] = (got - expected).abs().max().item()
    print(errors)
    assert errors["quantized"] < 1e-4
    assert errors["original"] > 20 * errors["quantized"]


def test_repacked_4bit_weights_are_refused(tmp_path):
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on an inference forward;
    dequantizing them afterwards would not give the trained-against weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from dpo_lib.core.models import architecture_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(architecture_config("tiny-gpt-neox")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    repacked = any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
                   for m in model.modules() if hasattr(m, "weight"))
    if not repacked:
        pytest.skip("bitsandbytes does not repack 4-bit weights on this CPU")
    with pytest.raises(llama_runtime.ExportError, match="repacked"):
        export._assert_standard_4bit_layout(model)


def test_exported_tokenizer_speaks_the_training_format(tiny_export):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_export[2]["merged"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Bye"}], tokenize=False, add_generation_prompt=True)
    assert text == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:"
    meta = llama_runtime.gguf_metadata(tiny_export[2]["q4_k_m"])
    assert meta["tokenizer.chat_template"] == export.HH_CHAT_TEMPLATE


def test_chat_streams_and_the_cli_answers(tiny_export):
    llm = gguf_check.open_gguf(tiny_export[2]["q8_0"], n_ctx=256, logits_all=False)
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        pieces = list(stream_reply(llm, messages, max_tokens=12))
        assert "\n\nHuman:" not in "".join(pieces)      # the stop string ends the answer
    finally:
        llm.close()
    assert len(pieces) >= 1
    out = subprocess.run([sys.executable, "-m", "dpo_lib.deploy.chat", str(tiny_export[2]["q8_0"]),
                          "--prompt", "What is the capital of France?", "--max-tokens", "12"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "".join(pieces).strip()


def test_export_cli_with_space_folder(tiny_export, tmp_path):
    out = subprocess.run([sys.executable, "-m", "dpo_lib.deploy.export", str(tiny_export[0]),
                          "--quant", "q8_0", "--out", str(tmp_path), "--space"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "model-q8_0.gguf").is_file()
    assert not (tmp_path / "model-q4_k_m.gguf").exists()
    space = tmp_path / "space"
    assert sorted(p.name for p in space.iterdir()) == ["README.md", "app.py", "model-q8_0.gguf",
                                                       "requirements.txt"]
    assert "sdk: gradio" in (space / "README.md").read_text()
    assert "llama-cpp-python==" in (space / "requirements.txt").read_text()
    record = json.loads((tmp_path / "export.json").read_text())
    assert set(record["files"]) == {"merged", "f16", "q8_0"}


@pytest.mark.slow
def test_smollm2_export_round_trip(tmp_path):
    """SmolLM2 (Llama) in the cpu profile's NF4: f16 near-exact, Q8_0 and Q4_K_M further off,
    and the merge into the dequantized NF4 base reproducing the PEFT model."""
    try:
        smollm2_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(str(error))
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    trained = make_run(run, "cpu")
    files = export.export_run(run, ("q8_0", "q4_k_m"), progress=False)
    merged = AutoModelForCausalLM.from_pretrained(files["merged"], dtype=torch.float32).eval()
    examples, sequences = gguf_check.held_out(run, n_pairs=6)
    kl_merge = gguf_check.compare_logits(merged, trained, sequences[:1])["kl"]
    kl = {}
    for name in ("f16", "q8_0", "q4_k_m"):
        llm = gguf_check.open_gguf(files[name], n_ctx=512)
        try:
            kl[name] = gguf_check.compare_logits(llm, merged, sequences)["kl"]
        finally:
            llm.close()
    print({"merge": kl_merge, **kl})
    assert kl_merge < 5e-3
    assert kl["f16"] < 1e-4 < kl["q8_0"] < kl["q4_k_m"]
    llm = gguf_check.open_gguf(files["q4_k_m"], n_ctx=512, logits_all=False)
    try:
        answer = reply(llm, [{"role": "user", "content": "What is the capital of France?"}],
                       max_tokens=24)
    finally:
        llm.close()
    assert answer


# --------------------------------------------------------------------------------------------
# The chat app
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_url(tiny_export):
    """The app started with its one command (:func:`dpo_lib.deploy.browser.serve_app`), on the tiny GGUF
    or ``$DPO_APP_MODEL``."""
    import os

    from dpo_lib.deploy.browser import serve_app

    pytest.importorskip("gradio")
    model = os.environ.get("DPO_APP_MODEL") or str(tiny_export[2]["q4_k_m"])
    with serve_app(model) as url:
        yield url


def test_app_answers_over_http(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    answer = client.predict("What is the capital of France?", api_name="/respond")
    assert isinstance(answer, str) and answer.strip()


def test_app_in_a_headless_browser(app_url, tmp_path):
    """Debian's chromium types a question into the app and waits for the streamed answer; the
    screenshot goes to a temporary folder (a test never writes into ``figures/``: the committed
    ``figures/08_chat_app.png`` is made by notebook 08 with the same function)."""
    pytest.importorskip("selenium.webdriver")
    from dpo_lib.deploy.browser import ask_in_browser, chromium

    if chromium() is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt install chromium "
                    "chromium-driver)")
    shot = tmp_path / "08_chat_app.png"
    answer = ask_in_browser(app_url, "What is the capital of France?", shot)
    assert answer and shot.stat().st_size > 10_000


def test_a_gpu_run_exports_on_a_cpu_only_machine(tmp_path, monkeypatch):
    """A run whose saved config says requires_cuda (trained on a GPU) still merges on a machine
    without CUDA: the flag guards training, not export. (Whether CUDA and CPU dequantize NF4 to
    the same values is a GPU question: tests/test_gpu.py checks it where a GPU is.)"""
    import yaml
    from safetensors.torch import load_file

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    make_run(run, "tiny", {"model.quantization": "nf4", "model.double_quant": True})
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "requires_cuda": True},
                                                    sort_keys=False))
    assert load_run_config(run).requires_cuda
    merged = export.merge_adapter(run, tmp_path / "gpu-run")
    weights = load_file(merged / "model.safetensors")
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all()
                           for v in weights.values())

def test_shown_path_names_no_folder_of_the_machine(tmp_path, monkeypatch):
    from dpo_lib.core.config import REPO_ROOT

    assert export.shown_path(REPO_ROOT / "runs" / "cpu-dpo" / "export") == "runs/cpu-dpo/export"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert export.shown_path(tmp_path / ".cache" / "dpo_lib" / "x") == "~/.cache/dpo_lib/x"

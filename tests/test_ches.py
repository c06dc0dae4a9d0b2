"""dpo_lib.training.ches: CHES by hand, the hidden-state sums against a plain forward, the pair filter."""
import pytest
import torch

from dpo_lib.training import ches
from dpo_lib.core.config import load_config
from dpo_lib.core.batches import tokenize_pairs
from dpo_lib.core.data import load_split
from dpo_lib.core.layouts import PackedLayout, PlainLayout
from dpo_lib.core.models import load_model, load_tokenizer
from dpo_lib.core.lora import add_lora


def test_ches_matches_hand_values():
    # s_w = (1, 2), s_l = (3, -1): <s_w, s_l> = 1, ||s_w||^2 = 5; |y_w| = 2, |y_l| = 4
    scores = ches.ches_scores(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]),
                              torch.tensor([2.0]), torch.tensor([4.0]))
    assert scores["ches"].item() == pytest.approx(1 - 5)
    assert scores["ches_normalised"].item() == pytest.approx(1 / 8 - 5 / 4)
    # identical answers: CHES = 0, the largest value a pair with s_w = s_l can have
    same = ches.ches_scores(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]),
                            torch.tensor([2.0]), torch.tensor([2.0]))
    assert same["ches"].item() == 0 and same["ches_normalised"].item() == 0


@pytest.mark.parametrize("layout", [PlainLayout(), PackedLayout()], ids=["plain", "packed"])
def test_hidden_sums_equal_a_plain_forward_by_hand(layout):
    cfg = load_config("tiny")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = add_lora(load_model(cfg), cfg)
    pairs, _ = load_split(cfg, "train", 5)
    examples, _ = tokenize_pairs(pairs, tokenizer, 96, 64)
    sums = ches.answer_hidden_sums(model, examples, layout, batch_size=2)
    model.eval()
    for i, example in enumerate(examples):
        for side in ("chosen", "rejected"):
            ids = torch.tensor([example[f"{side}_input_ids"]])
            labels = example[f"{side}_labels"]
            with torch.no_grad():
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            # position t predicts token t + 1: the positions before each answer token
            positions = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
            expected = hidden[positions].float().sum(0)
            assert torch.allclose(sums[f"{side}_sums"][i], expected, rtol=1e-4, atol=1e-4)
            assert sums[f"{side}_counts"][i].item() == len(positions)


def test_filter_pairs_drops_the_top_scores_or_a_seeded_draw():
    scores = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0])
    assert ches.filter_pairs(5, 0.4, "ches", scores) == [0, 2, 4]     # the two 3.0 go
    assert ches.filter_pairs(5, 0.0, "ches", scores) == [0, 1, 2, 3, 4]
    drawn = ches.filter_pairs(100, 0.2, "random", seed=3)
    assert len(drawn) == 80 and drawn == ches.filter_pairs(100, 0.2, "random", seed=3)
    assert drawn != ches.filter_pairs(100, 0.2, "random", seed=4)
    with pytest.raises(ValueError, match="pair_filter_share"):
        ches.filter_pairs(5, 1.0, "ches", scores)
    with pytest.raises(ValueError, match="null, ches, random or file"):
        ches.filter_pairs(5, 0.2, "chess", scores)


def test_filter_pairs_drops_the_indices_a_file_names():
    assert ches.filter_pairs(6, 0.0, "file", dropped=[4, 1]) == [0, 2, 3, 5]
    assert ches.filter_pairs(6, 0.0, "file", dropped=[]) == list(range(6))
    for bad, message in (([6], "not indices"), ([-1], "not indices"), ([1.0], "not indices"),
                         ([True], "not indices"), ([2, 2], "twice"),
                         (list(range(6)), "all 6 pairs")):
        with pytest.raises(ValueError, match=message):
            ches.filter_pairs(6, 0.0, "file", dropped=bad)


def test_read_drop_file_takes_a_list_or_a_record_and_checks_its_pool(tmp_path):
    import json

    from dpo_lib.core.errors import DataError, MissingFileError

    plain, record = tmp_path / "plain.json", tmp_path / "record.json"
    plain.write_text("[3, 0]")
    record.write_text(json.dumps({"dropped": [1, 2], "pool": 10, "source": "bundled"}))
    assert ches.read_drop_file(plain, 10) == [3, 0]
    assert ches.read_drop_file(record, 10, "bundled") == [1, 2]
    with pytest.raises(DataError, match="pool of 10 pairs; this run's pool has 12"):
        ches.read_drop_file(record, 12)
    with pytest.raises(DataError, match="made for data 'bundled'"):
        ches.read_drop_file(record, 10, "hh-rlhf:harmless-base/test.jsonl.gz")
    with pytest.raises(MissingFileError, match="no file"):
        ches.read_drop_file(tmp_path / "none.json", 10)
    (tmp_path / "bad.json").write_text('{"kept": [1]}')
    with pytest.raises(DataError, match="expected a list"):
        ches.read_drop_file(tmp_path / "bad.json", 10)


def test_spearman_by_hand():
    # ranks (1, 2, 3) and (1, 3, 2): 1 - 6 * (0 + 1 + 1) / (3 * 8) = 0.5
    rho, p = ches.spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0]))
    assert rho == pytest.approx(0.5) and 0 < p <= 1
    rho, p = ches.spearman(torch.arange(50.0), torch.arange(50.0) ** 3)
    assert rho == pytest.approx(1.0) and p < 1e-10

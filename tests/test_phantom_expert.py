"""The phantom expert's trainer, judge and controls (nanovalor.phantom_expert), on a tiny phantom world.

    python -m pytest -q tests/test_phantom_expert.py
"""
import numpy as np
import pytest
import torch

from nanovalor import phantom_expert as pe
from nanovalor import phantoms
from nanovalor.data import read_dataset
from nanovalor.expert import load
from nanovalor.phantom_reports import write_report
from nanovalor.chexpert import CHEXPERT_LABELS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    phantoms.generate(folder, n_train=16, n_val=2, n_test=24, seed=0, vocab_size=300, progress=False)
    return folder


class Constant:
    def similarity(self, images, reports):
        return torch.zeros(len(reports), len(reports[0]))


def test_agreement_on_hand_made_groups():
    correct = torch.tensor([[1.0, 0.5, 0.5, 0.25], [1.0, 1 / 3, 0.5, 0.5]])
    perfect = pe.agreement(correct * 3 - 1, correct)  # any increasing function of correctness
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["true_first"] == 1.0
    reverse = pe.agreement(-correct, correct)
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["true_first"] == 0.0
    constant = pe.agreement(torch.zeros(2, 4), correct)
    assert constant["spearman"] == 0.0 and constant["true_first"] == 0.25  # chance: the true report ties with all
    tie = pe.agreement(torch.tensor([[2.0, 2.0, 0.0, 1.0]]), correct[:1])  # first place shared by two
    assert tie["true_first"] == 0.5
    same = pe.agreement(torch.tensor([[0.3, 0.1]]), torch.tensor([[1.0, 1.0]]))  # nothing to rank: no groups
    assert same["groups"] == 0 and same["spearman"] == 0.0


def test_near_misses_change_one_finding_and_correctness_follows():
    rng = np.random.default_rng(0)
    for index in range(40):
        findings = phantoms.make_report(0, "train", index)["findings"]
        miss = pe.near_miss(findings, rng)
        removed, added = set(findings) - set(miss), set(miss) - set(findings)
        assert len(removed) <= 1 and len(added) <= 1 and (removed or added)
        assert all(miss[k] == findings[k] for k in set(findings) & set(miss))
    truth = write_report({"cardiomegaly": {"grade": "mild", "amount": 0.56}}, np.random.default_rng(1))[1]
    normal = write_report({}, np.random.default_rng(2))[1]
    assert pe.correctness(truth, truth) == 1.0 and pe.correctness(normal, normal) == 1.0
    assert pe.correctness(truth, normal) == 0.5  # (0 + 1) / (1 + 1)
    # the strict judge (false_weight 2): an added finding costs more than a missed one, the rest is unchanged
    rng = np.random.default_rng(3)
    both = write_report({"cardiomegaly": {"grade": "mild", "amount": 0.56},
                         "effusion": phantoms.sample_finding("effusion", rng)}, rng)[1]
    assert pe.correctness(truth, normal, false_weight=2) == 0.5  # missed: (0 + 1) / (1 + 0 + 1)
    assert pe.correctness(normal, truth, false_weight=2) == pytest.approx(1 / 3)  # added: (0 + 1) / (1 + 1 + 1)
    assert pe.correctness(truth, both) == pytest.approx(2 / 3)  # (1 + 1) / (2 + 1)
    assert pe.correctness(truth, both, false_weight=2) == 0.5  # (1 + 1) / (2 + 1 + 1)
    assert pe.correctness(truth, truth, false_weight=2) == 1.0


def test_observations_read_each_finding_once_whatever_the_phrasing():
    kind = {"cardiomegaly": "Cardiomegaly", "mediastinum": "Enlarged Cardiomediastinum", "edema": "Edema",
            "consolidation": "Consolidation", "atelectasis": "Atelectasis", "nodule": "Lung Lesion",
            "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax", "fracture": "Fracture",
            "devices": "Support Devices"}
    unclear = 0
    for index in range(1500):
        study = phantoms.make_report(0, "train", index)
        truth = {CHEXPERT_LABELS.index(kind[name]) for name in study["findings"]}
        if pe.observations(study["labels"]) != truth:  # only a consolidation written as an opacity beside
            assert {"consolidation"} < set(study["findings"]), study  # edema or atelectasis is unclear
            assert {"edema", "atelectasis"} & set(study["findings"]), study
            unclear += 1
    assert unclear < 1500 * 0.02
    consolidation = [write_report({"consolidation": phantoms.sample_finding("consolidation", np.random.default_rng(
        seed))}, np.random.default_rng(seed))[1] for seed in range(40)]
    assert len({tuple(v) for v in consolidation}) >= 3  # phrased with different labels ...
    assert all(pe.correctness(consolidation[0], v) == 1.0 for v in consolidation)  # ... read as one finding
    assert min(pe.correctness(consolidation[0], v, synonyms=False) for v in consolidation) < 1.0


def test_judge_gives_chance_to_a_constant_scorer_and_near_one_to_the_oracle(world):
    studies = pe.load_studies(world / "annotation.json", "test")
    constant = pe.judge(Constant(), studies, seed=0)
    assert constant["spearman"] == 0.0 and constant["true_first"] == pytest.approx(1 / 8)
    assert constant["top1_24"] == pytest.approx(1 / 24) and constant["groups"] == 24
    oracle = pe.judge(pe.Oracle(read_dataset(world / "annotation.json", "test")), studies, seed=0)
    assert oracle["spearman"] > 0.95 and oracle["true_first"] > 0.9
    assert oracle["top1_24"] <= oracle["ceiling"]["top1_24"] + 1e-9  # reports of the same findings tie
    assert pe.judge(Constant(), studies, seed=0) == constant  # deterministic given the seed
    assert pe.judge(Constant(), studies, seed=1)["groups"] == 24


def test_oracle_prefers_the_true_findings_and_knows_only_its_world(world):
    test = read_dataset(world / "annotation.json", "test")
    oracle = pe.Oracle(test)
    assert "PHANTOM-ONLY" in pe.Oracle.__doc__ and "PHANTOM-ONLY" in pe.Null.__doc__
    studies = pe.load_studies(world / "annotation.json", "test")
    rng = np.random.default_rng(3)
    for s in studies[:8]:
        rewritten = write_report(s["findings"], rng)[0]  # the true findings in other words
        misses = [write_report(pe.near_miss(s["findings"], rng), rng)[0] for _ in range(5)]
        scores = oracle.similarity([test[studies.index(s)].images[0]], [misses + [rewritten]])  # (1, 6), a path
        assert scores.shape == (1, 6) and scores[0, -1] == 1.0 and (scores[0, :-1] < 1.0).all(), scores
    strict = pe.Oracle(test, false_weight=2)  # the strict oracle: 1/3 where the oracle says 1/2 for an added finding
    normal, one = write_report({}, rng)[0], write_report({"cardiomegaly": {"grade": "mild", "amount": 0.56}}, rng)[0]
    image = test[[s["findings"] for s in studies].index({})].images[0]  # a normal study's X-ray
    assert oracle.similarity([image], [[normal, one]]).tolist() == [[1.0, 0.5]]
    assert strict.similarity([image], [[normal, one]]) == pytest.approx(torch.tensor([[1.0, 1 / 3]]))
    other = phantoms.make_study(0, "train", 0)["image"]  # a study the oracle was not built from
    with pytest.raises(KeyError, match="phantom world"):
        oracle.similarity([other], [["No pneumothorax."]])


def test_null_ignores_the_groups_own_xray(world):
    torch.manual_seed(0)
    expert = phantoms.tiny_expert(world).eval()
    studies = pe.load_studies(world / "annotation.json", "test")
    null = pe.Null(expert, read_dataset(world / "annotation.json", "train"), seed=0)
    groups = [[s["report"] for s in studies[:4]]] * 2
    a = null.similarity([studies[0]["image"], studies[1]["image"]], groups)  # (2, 4): same reports, other X-rays
    b = null.similarity([studies[2]["image"], studies[3]["image"]], groups)
    assert torch.equal(a, b) and torch.equal(a[0], a[1])
    own = expert.similarity([pe._image(studies[0]["image"])], groups[:1])
    assert not torch.allclose(own, a[:1])  # a real expert's scores do depend on the X-ray
    assert not torch.equal(pe.Null(expert, read_dataset(world / "annotation.json", "train"), seed=1)
                           .similarity([studies[0]["image"]], groups[:1]), a[:1])  # another seed, another X-ray


def test_training_a_few_steps_saves_a_loadable_expert(world, tmp_path):
    trained = pe.train(world, tmp_path / "expert", steps=3, batch_size=4, negatives=2, warmup=1, log_every=1)
    loaded = load(tmp_path / "expert")
    studies = pe.load_studies(world / "annotation.json", "test")[:2]
    images, groups = [pe._image(s["image"]) for s in studies], [[s["report"] for s in studies]] * 2
    torch.testing.assert_close(loaded.similarity(images, groups), trained.similarity(images, groups))
    fresh = phantoms.tiny_expert(world)
    assert not torch.equal(fresh.visual_projection.weight, loaded.visual_projection.weight)  # it trained


def test_an_expert_with_a_conv_stem_trains_saves_and_loads_but_cannot_seed_the_policy(world, tmp_path):
    from nanovalor.policy import config_to_hf
    trained = pe.train(world, tmp_path / "expert", steps=2, batch_size=4, negatives=1, warmup=1, conv_stem=(8, 16))
    loaded = load(tmp_path / "expert")
    assert loaded.cfg.vision.conv_stem == (8, 16) and not loaded.training
    stats = dict(loaded.visual.named_buffers())
    assert stats["embeddings.stem.1.num_batches_tracked"].dtype == torch.int64  # not cast to float on loading
    assert int(stats["embeddings.stem.1.num_batches_tracked"]) == 2  # two training steps moved the statistics
    torch.testing.assert_close(stats["embeddings.stem.4.running_var"],
                               dict(trained.visual.named_buffers())["embeddings.stem.4.running_var"], rtol=0, atol=0)
    studies = pe.load_studies(world / "annotation.json", "test")[:2]
    images, groups = [pe._image(s["image"]) for s in studies], [[s["report"] for s in studies]] * 2
    torch.testing.assert_close(loaded.similarity(images, groups), trained.similarity(images, groups))
    with pytest.raises(ValueError, match="conv stem"):  # llava-hf has no place for it
        phantoms.tiny_policy(world, loaded.visual)
    policy = phantoms.tiny_policy(world)
    policy.cfg.vision.conv_stem = (8, 16)
    with pytest.raises(ValueError, match="conv stem"):
        config_to_hf(policy.cfg)


def test_fast_pixels_equal_preprocess(world):
    from nanovalor.data import load_image, preprocess
    expert = phantoms.tiny_expert(world)
    train = read_dataset(world / "annotation.json", "train")[:3]
    images = torch.from_numpy(np.stack([pe.load_studies(world / "annotation.json", "train", n=3)[i]["image"]
                                        for i in range(3)]))
    reference = preprocess([load_image(s.images[0]) for s in train], expert.processing)
    assert torch.equal(pe.to_pixels(images, pe.pixel_table(expert.processing)), reference)

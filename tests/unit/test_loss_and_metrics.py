import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliptuner.train.evaluate import _hits, format_report, retrieval_metrics, trivial_cutoffs
from cliptuner.train.loss import MAX_LOGIT_SCALE, ClipLoss, clamp_logit_scale


def _unit(x):
    return F.normalize(x, dim=-1)


def test_loss_is_low_for_matched_pairs_and_high_for_shuffled():
    torch.manual_seed(0)
    feats = _unit(torch.randn(16, 32))
    scale = torch.tensor(100.0)
    loss = ClipLoss()
    matched = loss(feats, feats, scale)
    shuffled = loss(feats, feats[torch.randperm(16)], scale)
    assert matched.item() < 0.05
    assert shuffled.item() > 5 * matched.item() + 1.0


def test_loss_matches_manual_symmetric_cross_entropy():
    torch.manual_seed(1)
    img, txt = _unit(torch.randn(8, 16)), _unit(torch.randn(8, 16))
    scale = torch.tensor(7.5)
    logits = scale * img @ txt.T
    expected = 0.0
    for i in range(8):
        expected += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    expected = expected / 16
    assert ClipLoss()(img, txt, scale).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_is_symmetric_in_towers_and_trains_the_temperature():
    torch.manual_seed(2)
    img, txt = _unit(torch.randn(8, 16)), _unit(torch.randn(8, 16))
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    loss = ClipLoss()(img, txt, log_scale.exp())
    assert loss.item() == pytest.approx(ClipLoss()(txt, img, log_scale.exp()).item(), rel=1e-6)
    loss.backward()
    assert log_scale.grad is not None and log_scale.grad.abs().item() > 0


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        ClipLoss()(torch.zeros(4, 8), torch.zeros(5, 8), torch.tensor(1.0))


def test_logit_scale_is_clamped_like_openclip():
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(10.0))
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    model.logit_scale.data.fill_(-1.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == 0.0


def _onehot(n, dim):
    out = np.zeros((n, dim), dtype=np.float32)
    out[np.arange(n), np.arange(n)] = 1
    return out


def test_perfect_embeddings_give_full_recall_both_ways():
    images = _onehot(10, 16)
    texts = np.repeat(images, 2, axis=0)  # two captions per image
    m = retrieval_metrics(images, texts, np.repeat(np.arange(10), 2))
    assert all(m[k] == 1.0 for k in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"))


def test_recall_counts_rank_of_own_image():
    # text i is closest to image (i+1) % n and second closest to its own image
    n = 12
    images = _onehot(n, n)
    texts = 0.9 * np.roll(images, -1, axis=0) + 0.5 * images
    m = retrieval_metrics(images, texts / np.linalg.norm(texts, axis=1, keepdims=True), np.arange(n), ks=(1, 2, 5))
    assert m["t2i_r1"] == 0.0
    assert m["t2i_r2"] == 1.0
    assert m["i2t_r1"] == 0.0 and m["i2t_r2"] == 1.0


def test_image_to_text_hits_when_any_caption_is_in_top_k():
    images = _onehot(3, 3)
    # image 0 has two captions: one useless, one perfect
    texts = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    m = retrieval_metrics(images, texts, [0, 0, 1, 2], ks=(1,))
    assert m["i2t_r1"] == pytest.approx(2 / 3)  # image 2 ties with caption 0 of image 0: a tie counts against
    assert m["t2i_r1"] == pytest.approx(3 / 4)  # only the useless caption misses


def test_collapsed_model_scores_zero_not_perfect():
    images = np.ones((20, 8), dtype=np.float32) / np.sqrt(8)
    texts = np.ones((20, 8), dtype=np.float32) / np.sqrt(8)
    m = retrieval_metrics(images, texts, np.arange(20), ks=(1, 5, 10))
    assert m["t2i_r10"] == 0.0 and m["i2t_r10"] == 0.0


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(50, 8)).astype(np.float32)
    texts = rng.normal(size=(120, 8)).astype(np.float32)
    index = rng.integers(0, 50, size=120)
    index[:50] = np.arange(50)
    assert retrieval_metrics(images, texts, index, chunk=7) == retrieval_metrics(images, texts, index, chunk=1000)


def test_metrics_reject_bad_index():
    with pytest.raises(ValueError, match="image_index"):
        retrieval_metrics(_onehot(3, 3), _onehot(3, 3), [0, 1, 3])


def test_format_report_shows_change():
    before = {"t2i_r1": 0.1, "t2i_r5": 0.2, "t2i_r10": 0.3, "i2t_r1": 0.1, "i2t_r5": 0.2, "i2t_r10": 0.3}
    after = {k: v + 0.25 for k, v in before.items()}
    text = format_report(before, after)
    assert "t2i_r5" in text and "+25.0" in text


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_non_finite_embeddings_are_refused_not_scored(bad, tower):
    images, texts = _onehot(12, 16), _onehot(12, 16)
    (images if tower == "image" else texts)[[3, 7]] = bad
    with pytest.raises(ValueError, match=rf"2 of 12 {tower} embeddings are not finite.*\[3, 7\].*broken"):
        retrieval_metrics(images, texts, np.arange(12))


def test_nan_scores_count_as_misses():
    scores = np.array(
        [
            [np.nan, np.nan, np.nan],  # everything NaN: the positive cannot be ranked
            [np.nan, 0.5, 0.1],  # a NaN negative counts as ranking above the positive
            [0.9, 0.1, 0.2],
        ]
    )  # one negative above the positive
    positive = np.eye(3, dtype=bool)
    hits = _hits(scores, positive, ks=(1, 2, 3))
    assert hits[1].tolist() == [False, False, False]
    assert hits[2].tolist() == hits[3].tolist() == [False, True, True]
    assert not any(h.any() for h in _hits(np.full((4, 4), np.nan), np.eye(4, dtype=bool), (1, 10)).values())


def test_cutoffs_at_least_the_candidate_count_are_flagged():
    assert trivial_cutoffs(num_images=8, num_texts=16, ks=(1, 5, 10)) == ["t2i_r10"]
    assert trivial_cutoffs(num_images=5, num_texts=5, ks=(1, 5, 10)) == ["t2i_r5", "t2i_r10", "i2t_r5", "i2t_r10"]
    assert trivial_cutoffs(num_images=100, num_texts=200, ks=(1, 5, 10)) == []
    m = retrieval_metrics(_onehot(8, 8)[::-1].copy(), _onehot(8, 8), np.arange(8))  # every caption ranks last
    assert m["t2i_r1"] == 0.0 and m["t2i_r10"] == 1.0  # trivially 1.0: that is why the report flags it
    text = format_report(m, trivial=["t2i_r10"], label="recall")
    flagged = [line for line in text.splitlines() if line.endswith("*")]
    assert [line.split()[0] for line in flagged] == ["t2i_r10", "mean_recall"]
    assert "trivial: t2i_r10" in text and text.splitlines()[0].split() == ["metric", "recall"]
    assert "*" not in format_report(m)


def test_a_broken_onnx_model_is_refused_by_eval_instead_of_scoring_perfect_recall(tiny_model_dir, tmp_path):
    import shutil

    import onnx
    from onnx import numpy_helper

    from cliptuner.model.runtime import OnnxClip
    from cliptuner.train import synthetic
    from cliptuner.train.evaluate import evaluate_onnx

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    graph = onnx.load(str(broken / "visual.onnx"))
    weight = next(t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2)
    weight.CopyFrom(
        numpy_helper.from_array(np.full(numpy_helper.to_array(weight).shape, np.nan, np.float32), weight.name)
    )
    onnx.save(graph, str(broken / "visual.onnx"))
    pairs = synthetic.generate(20, domain="generic", seed=1)
    assert evaluate_onnx(OnnxClip(tiny_model_dir), pairs)["t2i_r5"] < 1.0  # the intact model is scored
    with pytest.raises(ValueError, match="20 of 20 image embeddings are not finite"):
        evaluate_onnx(OnnxClip(broken), pairs)

"""SigLIP's sigmoid loss: its definition, OpenCLIP's numbers, the loss choice, accumulation, DDP and a short run."""

import copy
import dataclasses
import math
import types

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

from cliptuner.config import TrainConfig
from cliptuner.train import synthetic
from cliptuner.train.data import make_loader
from cliptuner.train.loop import finetune, train_step
from cliptuner.train.loss import ClipLoss, SigLipLoss, build_loss

GLOBAL_BATCH = 8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _siglip_model(seed=0):
    """``cliptuner-tiny`` with a learnable logit bias, initialised as OpenCLIP's SigLIP configs do."""
    import open_clip

    import cliptuner.train.models  # noqa: F401  (registers the bundled configs)

    torch.manual_seed(seed)
    return open_clip.create_model("cliptuner-tiny", init_logit_scale=math.log(10), init_logit_bias=-10.0)


@pytest.fixture(scope="module")
def siglip_model():
    return _siglip_model()


@pytest.fixture(scope="module")
def batch(tiny_bundle):
    """One batch of ``GLOBAL_BATCH`` synthetic pairs: ``(images [8, 3, 64, 64], texts [8, 32])``."""
    pairs = synthetic.generate(GLOBAL_BATCH, domain="generic", seed=4)
    loader = make_loader(pairs, tiny_bundle.preprocess_val, tiny_bundle.tokenizer, GLOBAL_BATCH, seed=0)
    images, texts, _ = next(iter(loader))
    return images, texts


def _features(batch=6, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(batch, dim, generator=generator), dim=-1)
    return image, text


def _by_definition(image, text, scale, bias):
    """-1/B * sum over every pair (i, j) of log sigmoid(label_ij * (scale * <x_i, y_j> + bias)), in float64."""
    batch = image.shape[0]
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            z = scale * float(image[i].double() @ text[j].double()) + bias
            label = 1.0 if i == j else -1.0
            total += math.log(1.0 / (1.0 + math.exp(-label * z)))
    return -total / batch


def test_siglip_loss_equals_its_definition_and_open_clips_loss_with_gradients_for_scale_and_bias():
    image, text = _features()
    ours = {
        "image": image.clone().requires_grad_(),
        "text": text.clone().requires_grad_(),
        "scale": torch.tensor(7.5, requires_grad=True),
        "bias": torch.tensor(-3.0, requires_grad=True),
    }
    theirs = {name: value.detach().clone().requires_grad_() for name, value in ours.items()}

    loss = SigLipLoss()(ours["image"], ours["text"], ours["scale"], ours["bias"])
    reference = OpenClipSigLipLoss()(theirs["image"], theirs["text"], theirs["scale"], theirs["bias"])
    assert loss.item() == pytest.approx(_by_definition(image, text, 7.5, -3.0), rel=1e-5)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)

    loss.backward()
    reference.backward()
    for name in ours:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, msg=name)
    assert ours["bias"].grad.abs() > 1e-3 and ours["scale"].grad.abs() > 1e-3  # both are trained
    # gradient descent moves the bias towards the balance of matches and no-matches, from either side
    for start, direction in ((15.0, -1), (-15.0, 1)):
        far = torch.tensor(start, requires_grad=True)
        SigLipLoss()(image, text, torch.tensor(7.5), far).backward()
        assert -far.grad * direction > 0


def test_siglip_loss_prefers_matched_pairs_and_accepts_openclips_one_element_scale_and_bias():
    image, text = _features(seed=1)
    loss = SigLipLoss()
    scale, bias = torch.tensor([10.0]), torch.tensor([-5.0])  # nonscalar_logit_scale models hold shape [1]
    matched = loss(image, text, scale, bias)
    shuffled = loss(image, text.roll(1, dims=0), scale, bias)
    assert matched.shape == () and matched < shuffled
    assert matched.item() == pytest.approx(_by_definition(image, text, 10.0, -5.0), rel=1e-5)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(4, 8), torch.zeros(3, 8), torch.tensor(1.0), torch.tensor(0.0)), "same shape|one shape"),
        ((torch.zeros(8), torch.zeros(8), torch.tensor(1.0), torch.tensor(0.0)), r"\[batch, embed_dim\]"),
        ((torch.zeros(0, 8), torch.zeros(0, 8), torch.tensor(1.0), torch.tensor(0.0)), "empty"),
        ((torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor(1.0), None), "logit_bias"),
        ((torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor(1.0), torch.zeros(2)), "logit_bias must be"),
        ((torch.zeros(4, 8), torch.zeros(4, 8), torch.ones(4), torch.tensor(0.0)), "logit_scale must be"),
    ],
)
def test_siglip_loss_names_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        SigLipLoss()(*args)


@pytest.mark.parametrize("world_size, rank", [(0, 0), (2, 2), (2, -1), (1.5, 0), (True, 0)])
def test_siglip_loss_refuses_bad_ranks(world_size, rank):
    with pytest.raises(ValueError, match="world_size|rank"):
        SigLipLoss(world_size=world_size, rank=rank)


class _Wrapper(torch.nn.Module):
    """Holds the model as ``.module``, as DistributedDataParallel does."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_build_loss_auto_follows_the_logit_bias_and_siglip_needs_one(tiny_bundle, siglip_model):
    auto = TrainConfig(loss="auto")
    assert isinstance(build_loss(auto, siglip_model), SigLipLoss)
    assert isinstance(build_loss(auto, _Wrapper(siglip_model)), SigLipLoss)
    assert isinstance(build_loss(auto, tiny_bundle.model), ClipLoss)
    assert isinstance(build_loss(auto, _Wrapper(tiny_bundle.model)), ClipLoss)
    assert isinstance(build_loss(TrainConfig(loss="clip"), siglip_model), ClipLoss)
    distributed = build_loss(TrainConfig(loss="siglip"), siglip_model, world_size=4, rank=3)
    assert isinstance(distributed, SigLipLoss) and (distributed.world_size, distributed.rank) == (4, 3)

    with pytest.raises(ValueError, match="loss='siglip'.*logit_bias.*has none"):
        build_loss(TrainConfig(loss="siglip"), tiny_bundle.model)
    with pytest.raises(ValueError, match="loss must be one of .*'sigmoid'"):
        build_loss(types.SimpleNamespace(loss="sigmoid"), tiny_bundle.model)


def _step_grads(model, images, texts, loss_fn, accum_steps):
    model = copy.deepcopy(model).train()
    cfg = TrainConfig(batch_size=images.shape[0] // accum_steps, accum_steps=accum_steps, precision="fp32")
    loss = train_step(model, images, texts, loss_fn, cfg)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_train_step_hands_the_bias_to_siglip_and_accumulation_keeps_the_big_batch_gradient(siglip_model, batch):
    images, texts = batch
    with torch.no_grad():
        image_features, text_features, scale, bias = siglip_model(image=images, text=texts)
    direct = SigLipLoss()(image_features, text_features, scale, bias)

    big_loss, big = _step_grads(siglip_model, images, texts, SigLipLoss(), 1)
    acc_loss, acc = _step_grads(siglip_model, images, texts, SigLipLoss(), 2)
    assert big_loss.item() == pytest.approx(direct.item(), rel=1e-6)
    assert acc_loss.item() == pytest.approx(big_loss.item(), rel=1e-5)
    assert set(acc) == set(big) and {"logit_bias", "logit_scale"} <= set(big)
    assert big["logit_bias"].abs() > 1e-3 and big["logit_scale"].abs() > 1e-3
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-3, atol=1e-6, msg=name)


def test_clip_loss_on_a_model_with_a_bias_leaves_the_bias_a_zero_gradient(siglip_model, batch):
    images, texts = batch
    with torch.no_grad():
        image_features, text_features, scale, _ = siglip_model(image=images, text=texts)
    for accum_steps in (1, 2):
        loss, grads = _step_grads(siglip_model, images, texts, ClipLoss(), accum_steps)
        assert loss.item() == pytest.approx(ClipLoss()(image_features, text_features, scale).item(), rel=1e-5)
        assert torch.equal(grads["logit_bias"], torch.zeros_like(grads["logit_bias"]))
        assert grads["logit_scale"].abs() > 0


def _ddp_worker(rank, world_size, init_file, inputs_path, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        inputs = torch.load(inputs_path)
        out = {}
        # the loss alone: this rank's half of the features, as leaves of their own (as on separate machines)
        part = slice(rank * inputs["image"].shape[0] // world_size, (rank + 1) * inputs["image"].shape[0] // world_size)
        for name, loss_fn in (
            ("ours", SigLipLoss(world_size=world_size, rank=rank)),
            ("open_clip", OpenClipSigLipLoss(rank=rank, world_size=world_size, dist_impl="bidir")),
        ):
            leaves = [
                inputs["image"][part].clone().requires_grad_(),
                inputs["text"][part].clone().requires_grad_(),
                inputs["scale"].clone().requires_grad_(),
                inputs["bias"].clone().requires_grad_(),
            ]
            loss = loss_fn(*leaves)
            loss.backward()
            out[name] = {"loss": loss.item(), "grads": [leaf.grad for leaf in leaves]}

        # a model under DDP: train_step on this rank's half-batch, with and without feature accumulation
        model = _siglip_model()
        model.load_state_dict(inputs["state"])
        ddp = torch.nn.parallel.DistributedDataParallel(model.train())
        images, texts = inputs["images"][part], inputs["texts"][part]
        for accum_steps in (1, 2):
            cfg = TrainConfig(batch_size=images.shape[0] // accum_steps, accum_steps=accum_steps, precision="fp32")
            model.zero_grad(set_to_none=True)
            loss = train_step(ddp, images, texts, SigLipLoss(world_size=world_size, rank=rank), cfg)
            out[f"model_accum{accum_steps}"] = {
                "loss": loss.item(),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            }

        # the CLIP loss on the same model: the bias is in no loss, yet DDP must not stall on it
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        bias_before = model.logit_bias.detach().clone()
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            train_step(ddp, images, texts, ClipLoss(world_size=world_size, rank=rank), TrainConfig(precision="fp32"))
            optimizer.step()
        out["clip_bias_unchanged"] = torch.equal(model.logit_bias.detach(), bias_before)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_give_the_loss_and_averaged_gradient_of_one_process(siglip_model, batch, tmp_path):
    image, text = _features(batch=GLOBAL_BATCH, seed=3)
    scale, bias = torch.tensor(9.0), torch.tensor(-4.0)
    images, texts = batch
    torch.save(
        {
            "image": image,
            "text": text,
            "scale": scale,
            "bias": bias,
            "images": images,
            "texts": texts,
            "state": siglip_model.state_dict(),
        },
        tmp_path / "inputs.pt",
    )
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "inputs.pt"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # the loss alone, against one process over the whole batch
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
    single = SigLipLoss()(*leaves)
    single.backward()
    half = GLOBAL_BATCH // 2
    for r, out in enumerate(ranks):
        assert out["ours"]["loss"] == pytest.approx(single.item(), rel=1e-6)  # every rank reports the global loss
        ours, theirs = out["ours"]["grads"], out["open_clip"]["grads"]
        for mine, open_clips in zip(ours, theirs):
            torch.testing.assert_close(mine, open_clips)  # exactly OpenCLIP's neighbour-exchange gradients
        # DDP averages over the ranks: each rank's feature gradient is twice its rows' share of the global one
        torch.testing.assert_close(ours[0] / 2, leaves[0].grad[r * half : (r + 1) * half])
        torch.testing.assert_close(ours[1] / 2, leaves[1].grad[r * half : (r + 1) * half])
    # OpenCLIP's ranks each report their share; the global loss is the mean of the shares
    assert sum(out["open_clip"]["loss"] for out in ranks) / 2 == pytest.approx(single.item(), rel=1e-6)
    for index in (2, 3):  # scale and bias
        averaged = sum(out["ours"]["grads"][index] for out in ranks) / 2
        torch.testing.assert_close(averaged, leaves[index].grad)

    # the model under DDP: DDP's averaged gradients are the one-process gradients of the whole batch
    single_loss, single_grads = _step_grads(siglip_model, images, texts, SigLipLoss(), 1)
    assert {"logit_bias", "logit_scale"} <= set(single_grads)
    for accum_steps in (1, 2):
        for out in ranks:
            run = out[f"model_accum{accum_steps}"]
            assert run["loss"] == pytest.approx(single_loss.item(), rel=1e-5)
            assert set(run["grads"]) == set(single_grads)
            for name, grad in single_grads.items():
                torch.testing.assert_close(run["grads"][name], grad, rtol=1e-3, atol=1e-6, msg=name)
    assert all(out["clip_bias_unchanged"] for out in ranks)


def test_finetune_picks_siglip_for_a_biased_model_and_trains_the_bias(tiny_bundle, siglip_model):
    pairs = synthetic.generate(40, domain="generic", seed=6)
    train_pairs, held_out = pairs.split(0.2, seed=0)
    bundle = dataclasses.replace(tiny_bundle, model=copy.deepcopy(siglip_model))
    cfg = TrainConfig(epochs=3, batch_size=8, learning_rate=2e-3, warmup_steps=1, seed=1, log_every=1)
    steps = []
    report = finetune(
        bundle, train_pairs, held_out, cfg, on_event=lambda e: steps.append(e) if e["event"] == "step" else None
    )

    losses = report["epoch_losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    # the sigmoid loss starts high, about 10 * (1 - cos) per image (scale 10, bias -10: every positive pair reads
    # as a no-match); CLIP's softmax loss over 8 pairs would start near ln 8 ~ 2.1
    assert steps[0]["loss"] > 5
    assert bundle.model.logit_bias.item() != pytest.approx(-10.0, abs=1e-4)
    assert bundle.model.logit_bias.item() > -10.0  # too many pairs read as no-match: the bias rises

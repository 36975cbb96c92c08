"""Scaling the training: DDP over gloo, feature accumulation, partial unfreezing, layer-wise lr decay."""

import copy
import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp

from cliptuner.config import TrainConfig
from cliptuner.train import synthetic
from cliptuner.train.data import make_loader
from cliptuner.train.loop import apply_locks, build_optimizer, build_scheduler, fit, layer_scales, train_step
from cliptuner.train.loss import ClipLoss

GLOBAL_BATCH = 16
CFG = TrainConfig(
    epochs=2, batch_size=GLOBAL_BATCH, learning_rate=1e-3, warmup_steps=1, seed=3, log_every=1, precision="fp32"
)


def _train(bundle, pairs, cfg, world_size=1, rank=0):
    """Train with deterministic (eval) transforms so that only the process layout differs between runs."""
    loader = make_loader(
        pairs,
        bundle.preprocess_val,
        bundle.tokenizer,
        cfg.batch_size * cfg.accum_steps,
        seed=cfg.seed,
        num_replicas=world_size,
        rank=rank,
    )
    optimizer = build_optimizer(bundle.model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader) * cfg.epochs)
    model = bundle.model
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(bundle.model)
    losses = []
    fit(
        model,
        loader,
        ClipLoss(world_size=world_size, rank=rank),
        optimizer,
        scheduler,
        cfg,
        on_event=lambda e: losses.append(e["loss"]) if e["event"] == "step" else None,
    )
    return losses


def _ddp_worker(rank, world_size, init_file, state_path, out_path, accum_steps):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from cliptuner.config import ModelSpec
        from cliptuner.train.models import load_model

        bundle = load_model(ModelSpec("cliptuner-tiny"))
        bundle.model.load_state_dict(torch.load(state_path))
        pairs = synthetic.generate(32, domain="generic", seed=11)
        cfg = dataclasses.replace(CFG, batch_size=GLOBAL_BATCH // world_size // accum_steps, accum_steps=accum_steps)
        losses = _train(bundle, pairs, cfg, world_size, rank)
        if rank == 0:
            torch.save({"losses": losses, "state": bundle.model.state_dict()}, out_path)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tiny_bundle, tmp_path, accum_steps):
    """Two gloo ranks (with feature accumulation too) train exactly like one process on the same global batch."""
    state_path = tmp_path / "init.pt"
    torch.save(tiny_bundle.model.state_dict(), state_path)
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "rendezvous"), str(state_path), str(tmp_path / "ddp.pt"), accum_steps),
        nprocs=2,
        join=True,
    )
    ddp = torch.load(tmp_path / "ddp.pt")

    single = dataclasses.replace(tiny_bundle, model=copy.deepcopy(tiny_bundle.model))
    cfg = dataclasses.replace(CFG, batch_size=GLOBAL_BATCH // accum_steps, accum_steps=accum_steps)
    losses = _train(single, synthetic.generate(32, domain="generic", seed=11), cfg)

    assert len(losses) == len(ddp["losses"]) == 4  # 32 images / 16 per global batch, 2 epochs: 4 optimizer steps
    assert ddp["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    initial = tiny_bundle.model.state_dict()
    changed = 0
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.equal(value, initial[name])
    assert changed > 10  # the comparison is between trained weights, not two copies of the start
    assert not torch.equal(single.model.logit_scale, initial["logit_scale"])  # the temperature trained too


def test_feature_accumulation_gives_the_loss_and_gradient_of_one_big_batch(tiny_bundle):
    pairs = synthetic.generate(24, domain="generic", seed=5)
    loader = make_loader(pairs, tiny_bundle.preprocess_val, tiny_bundle.tokenizer, 24, seed=0)
    images, texts, _ = next(iter(loader))

    def grads(accum_steps):
        model = copy.deepcopy(tiny_bundle.model).train()
        cfg = TrainConfig(batch_size=24 // accum_steps, accum_steps=accum_steps, precision="fp32")
        loss = train_step(model, images, texts, ClipLoss(), cfg)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    big_loss, big = grads(1)
    acc_loss, acc = grads(3)  # three micro-batches of 8
    assert acc_loss.item() == pytest.approx(big_loss.item(), rel=1e-5)
    assert set(acc) == set(big)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-3, atol=1e-6, msg=name)

    # plain gradient accumulation (each micro-batch its own negatives) is a different, smaller-batch loss
    small_losses = [
        ClipLoss()(
            *[f for f in copy.deepcopy(tiny_bundle.model)(image=i, text=t)][:2], tiny_bundle.model.logit_scale.exp()
        ).item()
        for i, t in zip(images.tensor_split(3), texts.tensor_split(3))
    ]
    assert abs(sum(small_losses) / 3 - big_loss.item()) > 1e-3


def test_partial_unfreezing_trains_only_the_last_groups(tiny_bundle):
    model = copy.deepcopy(tiny_bundle.model)
    # OpenCLIP's text groups, from the top: projection, last block + final norm, earlier blocks, embeddings
    cfg = TrainConfig(
        lock_image=True,
        image_unlocked_groups=1,
        lock_text=True,
        text_unlocked_layers=2,
        batch_size=8,
        learning_rate=1e-3,
        warmup_steps=1,
        epochs=1,
    )
    apply_locks(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.") for n in trainable) and any(n.startswith("transformer.") for n in trainable)
    assert not any(n.startswith("visual.transformer.resblocks.0.") for n in trainable)
    assert not any(n.startswith("transformer.resblocks.0.") for n in trainable)
    assert "transformer.resblocks.3.mlp.c_fc.weight" in trainable  # the last of 4 text layers
    assert "text_projection" in trainable and "ln_final.weight" in trainable
    assert not any(n.startswith("transformer.resblocks.2.") for n in trainable)
    assert "token_embedding.weight" not in trainable

    before = copy.deepcopy(model.state_dict())
    bundle = dataclasses.replace(tiny_bundle, model=model)
    _train(bundle, synthetic.generate(16, domain="generic", seed=1), cfg)
    after = model.state_dict()
    for name, param in model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(before[name], after[name]), f"locked {name} changed"
    assert sum(not torch.equal(before[n], after[n]) for n in trainable) >= len(trainable) // 2


def test_layer_wise_lr_decay_scales_deeper_layers_down(tiny_bundle):
    scales = layer_scales(tiny_bundle.model, 0.5)
    # 4 visual blocks: embeddings are 5 layers below the head
    assert scales["visual.proj"] == 1.0
    assert scales["visual.transformer.resblocks.3.attn.in_proj_weight"] == 0.5
    assert scales["visual.transformer.resblocks.0.attn.in_proj_weight"] == 0.5**4
    assert scales["visual.conv1.weight"] == 0.5**5
    assert scales["token_embedding.weight"] == 0.5**5
    assert scales["text_projection"] == 1.0 and scales["logit_scale"] == 1.0
    optimizer = build_optimizer(tiny_bundle.model, TrainConfig(layer_decay=0.5, learning_rate=1e-3))
    lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert lrs[0] == pytest.approx(1e-3 * 0.5**5) and lrs[-1] == pytest.approx(1e-3)
    assert set(layer_scales(tiny_bundle.model, 1.0).values()) == {1.0}


def test_torchrun_runs_the_cli_with_two_cpu_processes_and_feature_accumulation(tmp_path):
    import subprocess
    import sys

    csv = synthetic.write_csv(tmp_path / "data", n_images=40, domain="generic", seed=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cliptuner.cli",
            "train",
            "--data",
            str(csv),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--accum-steps",
            "2",
            "--out",
            str(tmp_path / "m"),
            "--quiet",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["steps"] == 4  # 32 training images, 4 x 2 micro-batches per rank x 2 ranks per step, 2 epochs
    assert set(report["after"]) >= {"t2i_r5", "i2t_r5"}

"""The training loop: it learns, it is reproducible, it resumes, it stops early, it respects locks."""

import copy
import dataclasses

import pytest
import torch

from cliptuner.config import TrainConfig
from cliptuner.train import synthetic
from cliptuner.train.data import make_loader
from cliptuner.train.loop import TrainingStopped, build_optimizer, build_scheduler, finetune, fit
from cliptuner.train.loss import ClipLoss


def _fresh(bundle):
    """A private copy of the session's tiny model (same random init every time)."""
    return dataclasses.replace(bundle, model=copy.deepcopy(bundle.model))


def _loop(bundle, pairs, cfg, **kwargs):
    loader = make_loader(pairs, bundle.preprocess_train, bundle.tokenizer, cfg.batch_size, seed=cfg.seed)
    optimizer = build_optimizer(bundle.model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader) * cfg.epochs)
    return fit(bundle.model, loader, ClipLoss(), optimizer, scheduler, cfg, **kwargs)


@pytest.fixture(scope="module")
def small_pairs():
    return synthetic.generate(48, domain="generic", seed=3, captions_per_image=2)


def test_finetuning_from_random_init_beats_the_untrained_model_on_held_out_pairs(tiny_bundle):
    pairs = synthetic.generate(1000, domain="generic", seed=0, captions_per_image=2)
    train_pairs, held_out = pairs.split(0.2, seed=0)
    cfg = TrainConfig(epochs=6, batch_size=64, learning_rate=1e-3, warmup_steps=20, seed=0)
    report = finetune(_fresh(tiny_bundle), train_pairs, held_out, cfg)
    before, after = report["before"], report["after"]
    chance = 5 / held_out.num_images
    # an untrained model sits near chance; a broken loss, shuffled pairs or frozen weights would stay there
    assert before["t2i_r5"] < 4 * chance
    assert after["t2i_r5"] >= before["t2i_r5"] + 0.15
    assert after["t2i_r5"] >= 6 * chance
    assert after["i2t_r5"] >= before["i2t_r5"] + 0.1
    assert report["epoch_losses"][-1] < report["epoch_losses"][0] - 0.5
    assert report["split"]["eval_images"] == held_out.num_images == 200
    assert report["samples_per_s"] > 0


def test_same_seed_gives_the_same_loss_curve(tiny_bundle, small_pairs):
    cfg = TrainConfig(epochs=2, batch_size=16, learning_rate=5e-4, warmup_steps=2, seed=7, log_every=1)

    train_pairs, held_out = small_pairs.split(0.25, seed=0)

    def curve(seed):
        seen = []
        report = finetune(
            _fresh(tiny_bundle),
            train_pairs,
            held_out,
            dataclasses.replace(cfg, seed=seed),
            on_event=lambda e: seen.append(e["loss"]) if e["event"] == "step" else None,
        )
        assert report["epoch_losses"] and len(report["epoch_losses"]) == 2
        return seen

    first, second, other = curve(7), curve(7), curve(8)
    assert len(first) == 8  # 72 pairs of 36 images, 16 per batch (full batches only), 2 epochs
    assert first == second
    assert first != other


def test_resume_continues_exactly_where_training_stopped(tiny_bundle, small_pairs, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=16, learning_rate=5e-4, warmup_steps=2, seed=1)
    torch.manual_seed(0)
    straight = _fresh(tiny_bundle)
    _loop(straight, small_pairs, cfg)

    torch.manual_seed(0)
    interrupted = _fresh(tiny_bundle)
    steps = []

    def stop_in_second_epoch():
        steps.append(1)
        return len(steps) > 8  # one epoch is 6 batches

    with pytest.raises(TrainingStopped):
        _loop(interrupted, small_pairs, cfg, checkpoint_dir=tmp_path, should_stop=stop_in_second_epoch)
    assert (tmp_path / "last.pt").is_file()

    resumed = _fresh(tiny_bundle)
    result = _loop(resumed, small_pairs, cfg, resume_from=tmp_path / "last.pt")
    assert result.epochs_run == 2 and result.steps == 12
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_early_stopping_and_best_weights(tiny_bundle, small_pairs):
    bundle = _fresh(tiny_bundle)
    cfg = TrainConfig(
        epochs=6, batch_size=16, learning_rate=5e-4, warmup_steps=1, early_stop_patience=2, keep_best=True
    )
    snapshots, scores = [], iter([0.5, 0.3, 0.2, 0.9, 0.9, 0.9])

    def eval_fn():
        snapshots.append({k: v.clone() for k, v in bundle.model.state_dict().items()})
        value = next(scores)
        return {"t2i_r5": value, "mean_recall": value}

    result = _loop(bundle, small_pairs, cfg, eval_fn=eval_fn)
    assert result.stopped_early and result.epochs_run == 3
    assert result.best_epoch == 1 and result.best_metric == 0.5
    final = bundle.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in snapshots[0].items())
    assert not all(torch.equal(final[k], v) for k, v in snapshots[-1].items())


def test_locked_image_tower_does_not_change(tiny_bundle, small_pairs):
    bundle = _fresh(tiny_bundle)
    cfg = TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, warmup_steps=1, lock_image=True)
    before = copy.deepcopy(bundle.model.state_dict())
    from cliptuner.train.loop import apply_locks

    apply_locks(bundle.model, cfg)
    _loop(bundle, small_pairs, cfg)
    after = bundle.model.state_dict()
    visual = [k for k in before if k.startswith("visual.")]
    text = [k for k in before if k.startswith(("transformer.", "token_embedding", "ln_final", "text_projection"))]
    assert visual and text
    assert all(torch.equal(before[k], after[k]) for k in visual)
    assert any(not torch.equal(before[k], after[k]) for k in text)


def test_bad_training_options_are_named():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig(lock_image=True, lock_text=True)


def test_config_from_request_parameters_casts_and_rejects():
    from cliptuner.config import from_mapping

    cfg = from_mapping(TrainConfig, {"epochs": 3.0, "batch_size": 32.0, "learning_rate": 1})
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int) and isinstance(cfg.learning_rate, float)
    with pytest.raises(ValueError, match="epochz"):
        from_mapping(TrainConfig, {"epochz": 3})
    with pytest.raises(ValueError, match="whole number"):
        from_mapping(TrainConfig, {"epochs": 2.5})


def test_wiseft_in_the_report_and_the_kept_weights(tiny_bundle, small_pairs):
    from cliptuner.train.wiseft import interpolate_state, state_copy

    train_pairs, held_out = small_pairs.split(0.25, seed=0)
    general = synthetic.generate(12, domain="domain", seed=9)
    bundle = _fresh(tiny_bundle)
    base = state_copy(bundle.model)
    cfg = TrainConfig(
        epochs=2,
        batch_size=16,
        learning_rate=1e-3,
        warmup_steps=1,
        seed=0,
        keep_best=False,
        wiseft_alphas=(0.0, 1.0),
        wiseft_alpha=0.5,
    )
    report = finetune(bundle, train_pairs, held_out, cfg, general_pairs=general)
    sweep = {entry["alpha"]: entry for entry in report["wiseft"]["sweep"]}
    assert sorted(sweep) == [0.0, 0.5, 1.0]
    assert sweep[0.0]["held_out"] == report["before"]  # alpha 0 is the base model
    assert sweep[1.0]["held_out"] == report["wiseft"]["tuned_after"]  # alpha 1 is the tuned model
    assert report["after"] == sweep[0.5]["held_out"]
    assert set(sweep[0.5]["general"]) >= {"t2i_r5", "i2t_r5"}
    # the model keeps the alpha=0.5 interpolation, which differs from both ends
    retrain = _fresh(tiny_bundle)
    finetune(retrain, train_pairs, held_out, dataclasses.replace(cfg, wiseft_alphas=(), wiseft_alpha=None))
    expected = interpolate_state(base, state_copy(retrain.model), 0.5)
    for name, value in bundle.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    assert not torch.equal(bundle.model.state_dict()["visual.proj"], base["visual.proj"])


def test_choosing_the_epoch_never_looks_at_the_held_out_pairs(tiny_bundle, small_pairs, monkeypatch):
    """Validation and held-out pairs disagree on the best epoch: the validation part must decide."""
    import cliptuner.train.evaluate as evaluate_module

    train_pairs, held_out = small_pairs.split(0.25, seed=0)
    bundle = _fresh(tiny_bundle)
    real_evaluate = evaluate_module.evaluate
    # per-epoch recall each set would report: held-out peaks at epoch 1, validation at epoch 2
    scripted = {"held_out": iter([0.1, 0.9, 0.2, 0.3, 0.25]), "val": iter([0.3, 0.8, 0.4])}
    snapshots = []

    def scripted_evaluate(bundle_, pairs, ks=(1, 5, 10), batch_size=128):
        metrics = real_evaluate(bundle_, pairs, ks, batch_size)  # the real pass still runs on the real pairs
        role = "held_out" if pairs is held_out else "val"
        if role == "val":
            snapshots.append({k: v.clone() for k, v in bundle.model.state_dict().items()})
        value = next(scripted[role])
        return {**metrics, "t2i_r5": value, "mean_recall": value}

    monkeypatch.setattr(evaluate_module, "evaluate", scripted_evaluate)
    cfg = TrainConfig(epochs=3, batch_size=8, learning_rate=5e-4, warmup_steps=1, keep_best=True, val_fraction=0.25)
    report = finetune(bundle, train_pairs, held_out, cfg)

    assert report["best_epoch"] == 2  # choosing on held-out would have said 1
    assert [entry["t2i_r5"] for entry in report["eval_history"]] == [0.3, 0.8, 0.4]
    final = bundle.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in snapshots[1].items())  # epoch 2's weights were kept
    assert not all(torch.equal(final[k], v) for k, v in snapshots[2].items())
    split = report["split"]
    assert split["val_images"] == 9 and split["train_images"] + split["val_images"] == train_pairs.num_images
    assert split["eval_images"] == held_out.num_images
    assert report["before"]["t2i_r5"] == 0.1 and report["after"]["t2i_r5"] == 0.9  # held-out: before, then after


def test_without_a_choice_no_best_epoch_is_reported(tiny_bundle, small_pairs):
    train_pairs, held_out = small_pairs.split(0.25, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=5e-4, warmup_steps=1)
    report = finetune(_fresh(tiny_bundle), train_pairs, held_out, cfg)
    assert "best_epoch" not in report  # the per-epoch curve is on held-out pairs: it must not pick anything
    assert len(report["eval_history"]) == 2 and report["history_split"] == "eval"
    assert report["trivial"] == ["t2i_r10", "i2t_r10"] or held_out.num_images > 10


def test_resume_with_loader_workers_is_exact(tiny_bundle, small_pairs, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=16, learning_rate=5e-4, warmup_steps=2, seed=4, num_workers=2)

    def run(**kwargs):
        bundle = _fresh(tiny_bundle)
        loader = make_loader(
            small_pairs,
            bundle.preprocess_train,
            bundle.tokenizer,
            cfg.batch_size,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
        )
        optimizer = build_optimizer(bundle.model, cfg)
        scheduler = build_scheduler(optimizer, cfg, len(loader) * cfg.epochs)
        torch.manual_seed(0)
        return bundle, fit(bundle.model, loader, ClipLoss(), optimizer, scheduler, cfg, **kwargs)

    straight, _ = run()
    calls = []
    with pytest.raises(TrainingStopped):  # stop in the third epoch, after two epochs' checkpoints
        run(checkpoint_dir=tmp_path, should_stop=lambda: calls.append(1) or len(calls) > 14)
    resumed, result = run(resume_from=tmp_path / "last.pt")
    assert result.epochs_run == 3
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_other_options_and_an_early_stopped_run_stays_stopped(tiny_bundle, small_pairs, tmp_path):
    cfg = TrainConfig(epochs=6, batch_size=16, learning_rate=5e-4, warmup_steps=1, early_stop_patience=1)
    scores = iter([0.5, 0.4])
    bundle = _fresh(tiny_bundle)
    first = _loop(bundle, small_pairs, cfg, eval_fn=lambda: {"t2i_r5": next(scores)}, checkpoint_dir=tmp_path)
    assert first.stopped_early and first.epochs_run == 2

    with pytest.raises(
        ValueError, match=r"other training options \(learning_rate: 0.0005 in the checkpoint, 0.001 now"
    ):
        _loop(
            _fresh(tiny_bundle),
            small_pairs,
            dataclasses.replace(cfg, learning_rate=1e-3),
            resume_from=tmp_path / "last.pt",
        )

    resumed = _fresh(tiny_bundle)
    result = _loop(
        resumed,
        small_pairs,
        dataclasses.replace(cfg, log_every=3),  # log_every may differ
        eval_fn=lambda: pytest.fail("a stopped run must not train or evaluate again"),
        resume_from=tmp_path / "last.pt",
    )
    assert result.stopped_early and result.epochs_run == 2 and result.steps == first.steps
    for (name, a), b in zip(bundle.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


class _OverflowOnce(ClipLoss):
    """The contrastive loss, made infinite on the calls listed (an fp16 overflow, forced on CPU)."""

    def __init__(self, overflow_calls):
        super().__init__()
        self.calls, self.overflow_calls = 0, set(overflow_calls)

    def forward(self, *args, **kwargs):
        self.calls += 1
        loss = super().forward(*args, **kwargs)
        return loss * float("inf") if self.calls in self.overflow_calls else loss


def test_a_gradient_scaler_skips_an_overflowed_step_without_moving_weights_or_schedule(tiny_bundle, small_pairs):
    cfg = TrainConfig(epochs=1, batch_size=16, learning_rate=5e-4, warmup_steps=4, log_every=1)
    bundle = _fresh(tiny_bundle)
    loader = make_loader(small_pairs, bundle.preprocess_val, bundle.tokenizer, cfg.batch_size, seed=cfg.seed)
    optimizer = build_optimizer(bundle.model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader) * cfg.epochs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    states, lrs = [], []

    def record(event):
        if event["event"] == "step":
            states.append({k: v.clone() for k, v in bundle.model.state_dict().items()})
            lrs.append(event["lr"])

    result = fit(bundle.model, loader, _OverflowOnce({2}), optimizer, scheduler, cfg, on_event=record, scaler=scaler)
    assert result.steps == 6 and result.skipped_steps == 1  # training went on after the overflow
    assert all(torch.equal(states[1][k], v) for k, v in states[0].items())  # step 2 changed nothing
    assert not all(torch.equal(states[2][k], v) for k, v in states[1].items())  # step 3 trained again
    assert lrs[1] == lrs[0] and lrs[2] != lrs[1]  # the schedule did not advance on the skipped step
    assert scheduler.last_epoch == 5  # 6 steps, 5 taken
    assert scaler.get_scale() == 2.0**9
    assert all(torch.isfinite(p).all() for p in bundle.model.parameters())
    assert all(loss == loss and abs(loss) != float("inf") for loss in result.epoch_losses)


def test_without_a_scaler_a_non_finite_loss_stops_training_and_so_do_endless_overflows(tiny_bundle, small_pairs):
    cfg = TrainConfig(epochs=1, batch_size=16, learning_rate=5e-4, warmup_steps=1)
    with pytest.raises(FloatingPointError, match="loss is inf"):
        bundle = _fresh(tiny_bundle)
        loader = make_loader(small_pairs, bundle.preprocess_val, bundle.tokenizer, cfg.batch_size, seed=0)
        optimizer = build_optimizer(bundle.model, cfg)
        fit(bundle.model, loader, _OverflowOnce({1}), optimizer, build_scheduler(optimizer, cfg, 6), cfg)

    from cliptuner.train import loop as train_module

    bundle = _fresh(tiny_bundle)
    loader = make_loader(small_pairs, bundle.preprocess_val, bundle.tokenizer, cfg.batch_size, seed=0)
    optimizer = build_optimizer(bundle.model, cfg)
    with pytest.raises(FloatingPointError, match="3 steps in a row overflowed"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_module, "MAX_SKIPPED_IN_A_ROW", 3)
            fit(
                bundle.model,
                loader,
                _OverflowOnce({1, 2, 3, 4, 5, 6}),
                optimizer,
                build_scheduler(optimizer, cfg, 6),
                cfg,
                scaler=torch.amp.GradScaler("cpu"),
            )

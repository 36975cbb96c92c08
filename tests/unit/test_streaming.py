"""Streamed pairs: tar shards and parquet read with a bounded buffer, split over ranks and workers, resumed by shard."""

import copy
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from docarray import DocList
from PIL import Image
from stream_ranks import read_epochs
from support import QUICK, run

from cliptuner.cli import main
from cliptuner.config import TrainConfig
from cliptuner.train import synthetic
from cliptuner.train.data import DataError, load_split, train_and_held_out
from cliptuner.train.loop import TrainingStopped, build_optimizer, build_scheduler, finetune, fit
from cliptuner.train.loss import ClipLoss
from cliptuner.train.stream_loader import StreamLoader, planned_steps
from cliptuner.train.streaming import (
    STREAM_CANNOT_CHOOSE,
    STREAM_NEEDS_EVAL,
    Sample,
    ShardEnd,
    ShuffleBuffer,
    StreamError,
    StreamSource,
    count_tar,
    expand_braces,
    open_stream,
    read_samples,
    shard_plan,
    write_tar_shards,
)
from executors.schemas import ClipDoc
from executors.tuner import request_digest

PER_SHARD = 20


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: one image, one digest
    return buffer.getvalue()


def _pairs(n_images, captions_per_image=1, seed=0):
    """``[(key, png bytes, caption)]`` of synthetic scenes, the captions of one image one after another."""
    pairs = synthetic.generate(
        n_images, domain="generic", seed=seed, image_size=32, captions_per_image=captions_per_image
    )
    images = [_png(pixels) for pixels in pairs.images]
    return [(f"{p:06d}", images[i], caption) for p, (caption, i) in enumerate(zip(pairs.captions, pairs.image_index))]


def _write_shards(folder, n_shards, captions_per_image=1, stats=False, seed=0):
    pairs = _pairs(n_shards * PER_SHARD // captions_per_image, captions_per_image, seed)
    write_tar_shards(((k, b, "png", c) for k, b, c in pairs), folder, PER_SHARD, stats=stats)
    return pairs


def _read(source):
    return [(s.caption, s.image) for s in read_samples(source, range(source.num_shards)) if isinstance(s, Sample)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four tar shards of 20 pairs (two captions per image, side by side) and their pairs."""
    folder = tmp_path_factory.mktemp("stream") / "shards"
    pairs = _write_shards(folder, 4, captions_per_image=2)
    return folder, pairs


# -- naming and reading ----------------------------------------------------------------------------------------------
def test_brace_patterns_expand_as_a_shell_does():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{8..10}.tar") == ["8.tar", "9.tar", "10.tar"]
    assert expand_braces("{a,b{1..2}}-{x,y}") == ["a-x", "a-y", "b1-x", "b1-y", "b2-x", "b2-y"]
    assert expand_braces("{x}.tar") == ["{x}.tar"]  # neither a range nor a list: kept as written
    with pytest.raises(StreamError, match="more than"):
        expand_braces("{0..99999999}.tar")


def test_brace_shards_yield_their_pairs_counted_from_headers_or_stats(tmp_path, shards):
    folder, pairs = shards
    source = open_stream(f"{folder}/{{00000..00003}}.tar")
    assert source.kind == "tar" and [s.count for s in source.shards] == [PER_SHARD] * 4 and len(source) == 80
    assert sorted(_read(source)) == sorted((c, b) for _, b, c in pairs)
    assert open_stream(folder).names() == source.names()  # the folder holding them: the same shards
    assert sorted(_read(open_stream(f"{folder}/{{00001,00003}}.tar"))) == sorted(
        (c, b) for _, b, c in pairs[PER_SHARD : 2 * PER_SHARD] + pairs[3 * PER_SHARD :]
    )

    with_stats = tmp_path / "stats"
    _write_shards(with_stats, 2, stats=True)
    (with_stats / "00001_stats.json").write_text(json.dumps({"successes": 7}))  # img2dataset's count wins
    assert [s.count for s in open_stream(with_stats / "{00000..00001}.tar").shards] == [PER_SHARD, 7]
    assert count_tar(with_stats / "00001.tar") == 7
    (with_stats / "00001_stats.json").unlink()
    assert count_tar(with_stats / "00001.tar") == PER_SHARD  # headers counted without the stats file


def test_a_sample_without_image_or_caption_is_skipped(tmp_path):
    image = _png(synthetic.generate(1, seed=0, image_size=32).images[0])
    write_tar_shards([("a", image, "jpg", "a caption"), ("b", image, "webp", "   ")], tmp_path, per_shard=5)
    source = open_stream(tmp_path / "00000.tar")
    assert len(source) == 2  # counted from the headers: an image and a caption each
    assert _read(source) == [("a caption", image)]


@pytest.mark.parametrize("holds", ["path", "bytes", "struct"])
def test_parquet_with_a_path_bytes_or_struct_column_yields_its_pairs(tmp_path, holds):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = _pairs(30)
    if holds == "path":
        (tmp_path / "images").mkdir()
        for key, data, _ in pairs:
            (tmp_path / "images" / f"{key}.png").write_bytes(data)
        column = ("image_path", pa.array([f"images/{key}.png" for key, _, _ in pairs]))
    elif holds == "bytes":
        column = ("jpg", pa.array([data for _, data, _ in pairs], type=pa.binary()))
    else:  # as Hugging Face datasets write an Image feature
        column = ("image", pa.array([{"bytes": data, "path": None} for _, data, _ in pairs]))
    table = pa.table({column[0]: column[1], "text": [c for _, _, c in pairs], "extra": list(range(30))})
    pq.write_table(table, tmp_path / "pairs.parquet", row_group_size=10)

    source = open_stream(tmp_path / "pairs.parquet")
    assert source.kind == "parquet" and [s.count for s in source.shards] == [10, 10, 10]  # a shard per row group
    got = _read(source)
    if holds == "path":
        got = [(caption, open(path, "rb").read()) for caption, path in got]
    assert got == [(c, b) for _, b, c in pairs]
    assert len(load_split(tmp_path / "pairs.parquet", "test")) == 30  # a small stream read into memory


def test_parquet_without_known_columns_names_the_columns_found(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"picture": [b"x"], "label": ["a cat"]}), tmp_path / "odd.parquet")
    with pytest.raises(StreamError, match=r"no an image column.*no a text caption column.*picture \(binary\)"):
        open_stream(tmp_path / "odd.parquet")
    pq.write_table(pa.table({"url": ["https://example.com/a.jpg"], "caption": ["a cat"]}), tmp_path / "web.parquet")
    with pytest.raises(StreamError, match="holds URLs.*local images only"):
        open_stream(tmp_path / "web.parquet")


def test_a_pattern_naming_a_missing_shard_is_refused_by_name(shards):
    folder, _ = shards
    with pytest.raises(StreamError, match=r"00004.tar'?: no such file"):
        open_stream(f"{folder}/{{00003..00004}}.tar")


# -- the shuffle buffer --------------------------------------------------------------------------------------------
def test_the_buffer_holds_at_most_its_capacity_and_batches_hold_unique_images(shards):
    folder, pairs = shards
    source = open_stream(folder)
    buffer = ShuffleBuffer(8, 16, np.random.default_rng(0), prepare=lambda sample: sample)
    taken_at_first_batch = []
    batches = []
    for items, samples, done in buffer.batches(read_samples(source, range(4))):
        taken_at_first_batch.append(buffer.taken)
        batches.append(samples)
        assert len({s.digest for s in samples}) == len(samples) == 8  # no image twice in a batch
    assert buffer.peak == 16  # full, never fuller
    assert taken_at_first_batch[0] == 16  # read lazily: the first batch came once 16 samples were held
    trained = sum(len(b) for b in batches)
    assert trained + buffer.dropped_at_end + buffer.dropped_repeats == len(pairs) == 80
    assert trained >= 64  # the two captions of an image sit side by side; they go to different batches


def test_a_shard_is_done_with_the_batch_that_took_its_last_sample():
    def stream():
        for shard in range(3):
            for k in range(5):
                yield Sample(shard, f"{shard}:{k}", b"", "c", bytes([shard, k]))
            yield ShardEnd(shard)

    buffer = ShuffleBuffer(4, 6, np.random.default_rng(1), prepare=lambda sample: sample)
    trained: set[str] = set()
    done_after: list[int] = []
    for _, samples, done in buffer.batches(stream()):
        for shard in done:  # done: every sample of it was in this batch or before
            assert {f"{shard}:{k}" for k in range(5)} <= trained | {s.key for s in samples}
        trained |= {s.key for s in samples}
        done_after.extend(done)
    assert len(done_after) == len(set(done_after))
    assert set(done_after) <= {0, 1, 2} and done_after  # the last samples (15 = 3 batches + 3) may be left over


def test_a_full_buffer_of_one_image_drops_repeats_instead_of_growing():
    stream = [Sample(0, f"0:{k}", b"", "c", b"same" if k % 2 else bytes([k])) for k in range(40)]
    buffer = ShuffleBuffer(4, 6, np.random.default_rng(2), prepare=lambda sample: sample)
    batches = [samples for _, samples, _ in buffer.batches(stream)]
    assert buffer.peak <= 6 and buffer.dropped_repeats > 0
    assert all(len({s.digest for s in b}) == 4 for b in batches)


# -- dealing shards to ranks and workers -------------------------------------------------------------------------------
@pytest.mark.parametrize("shards_n,replicas,workers", [(4, 2, 1), (7, 2, 2), (10, 3, 3), (5, 1, 1)])
def test_the_shard_plan_is_disjoint_complete_and_new_each_epoch(shards_n, replicas, workers):
    orders = []
    for epoch in range(3):
        plan = shard_plan(shards_n, seed=5, epoch=epoch, num_replicas=replicas, num_workers=workers)
        slots = [shard for rank in plan for slot in rank for shard in slot]
        assert sorted(slots) == list(range(shards_n))
        assert all(len(rank) == workers for rank in plan) and len(plan) == replicas
        orders.append(slots)
    assert shard_plan(shards_n, 5, 1, replicas, workers) == shard_plan(shards_n, 5, 1, replicas, workers)
    if shards_n > 4:
        assert orders[0] != orders[1] or orders[1] != orders[2]


def test_dataloader_workers_read_disjoint_shards(tiny_bundle, shards):
    folder, _ = shards
    loader = StreamLoader(
        open_stream(folder), tiny_bundle.preprocess_val, tiny_bundle.tokenizer, 8, shuffle_buffer=16, num_workers=2
    )
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images, texts, index in loader:
            assert images.shape == (8, 3, 64, 64) and texts.shape[0] == 8
            assert len(set(index.tolist())) == 8  # the image ids of a batch are distinct
        first, second = loader.seen_by_worker[(epoch, 0)], loader.seen_by_worker[(epoch, 1)]
        assert first and second and not first & second
        assert first | second == set(open_stream(folder).names())


def test_too_few_shards_for_the_readers_and_a_small_buffer_are_refused(tiny_bundle, shards):
    folder, _ = shards
    source = open_stream(folder)
    with pytest.raises(ValueError, match=r"4 shard\(s\) but 2 process\(es\) x 3 reader"):
        StreamLoader(source, tiny_bundle.preprocess_val, tiny_bundle.tokenizer, 8, num_workers=3, num_replicas=2)
    with pytest.raises(ValueError, match="shuffle_buffer 4 is smaller than a batch of 8"):
        StreamLoader(source, tiny_bundle.preprocess_val, tiny_bundle.tokenizer, 8, shuffle_buffer=4)


def test_two_ddp_ranks_read_disjoint_shards_in_step(tmp_path):
    folder = tmp_path / "shards"
    _write_shards(folder, 4, seed=6)  # distinct images: every sample fits a batch, so every shard gets done
    mp.spawn(read_epochs, args=(2, str(tmp_path / "rendezvous"), str(folder), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    everything = sorted(open_stream(folder).names())
    for epoch in ("0", "1"):
        first, second = (set(r[epoch]["seen"]) for r in ranks)
        assert first and second and not first & second and sorted(first | second) == everything
        assert ranks[0][epoch]["batches"] == ranks[1][epoch]["batches"] >= 4  # in step: as many batches on each
        # shards done on either rank are known on both (rank 0 writes the checkpoint)
        assert sorted(ranks[0][epoch]["done"]) == sorted(ranks[1][epoch]["done"]) == everything
    assert ranks[0]["0"]["seen"] != ranks[0]["1"]["seen"]  # a new plan each epoch (seed 3)


# -- training on a stream, stopping and resuming by shard -------------------------------------------------------------
def _stream_fit(bundle, folder, cfg, **kwargs):
    loader = StreamLoader(
        open_stream(folder), bundle.preprocess_val, bundle.tokenizer, cfg.batch_size, seed=cfg.seed, shuffle_buffer=16
    )
    optimizer = build_optimizer(bundle.model, cfg)
    scheduler = build_scheduler(optimizer, cfg, planned_steps(loader, cfg.epochs))
    return loader, fit(bundle.model, loader, ClipLoss(), optimizer, scheduler, cfg, **kwargs)


def test_a_killed_run_resumes_at_the_next_shard(tiny_bundle, tmp_path):
    folder = tmp_path / "shards"
    _write_shards(folder, 6, seed=4)
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=5e-4, warmup_steps=1, seed=2, precision="fp32")
    everything = set(open_stream(folder).names())
    loaders = []

    def stop_after_two_shards():
        return len(loaders[0].done) >= 2

    bundle = dataclasses.replace(tiny_bundle, model=copy.deepcopy(tiny_bundle.model))
    original = StreamLoader.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        loaders.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StreamLoader, "__init__", keep)
        with pytest.raises(TrainingStopped):
            _stream_fit(bundle, folder, cfg, checkpoint_dir=tmp_path / "ckpt", should_stop=stop_after_two_shards)
        state = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)
        done_before = set(state["stream"]["done"])
        assert state["epoch"] == 0 and state["stream"]["epoch"] == 0 and len(done_before) >= 2
        assert done_before == set(loaders[0].done) and done_before < everything
        assert state["result"]["steps"] == loaders[0].batches[0] - 1  # trained: all but the batch the stop refused

        resumed = dataclasses.replace(tiny_bundle, model=copy.deepcopy(tiny_bundle.model))
        loader, result = _stream_fit(resumed, folder, cfg, resume_from=tmp_path / "ckpt" / "last.pt")
    assert loader.seen[0] == everything - done_before  # the rest of the killed epoch, and only that
    assert loader.seen[1] == everything  # the next epoch reads every shard
    assert result.epochs_run == 2 and len(result.epoch_losses) == 2
    assert result.steps == state["result"]["steps"] + loader.batches[0] + loader.batches[1]


def test_a_resume_with_other_shards_is_refused(tiny_bundle, shards):
    folder, _ = shards
    loader = StreamLoader(open_stream(folder), tiny_bundle.preprocess_val, tiny_bundle.tokenizer, 8, shuffle_buffer=16)
    with pytest.raises(ValueError, match="does not hold"):
        loader.resume({"epoch": 0, "done": ["elsewhere/00000.tar"]})


def test_finetune_on_a_stream_reports_its_shards_and_refuses_choosing_an_epoch(tiny_bundle, shards):
    folder, _ = shards
    train, eval_pairs = open_stream(folder), synthetic.generate(12, domain="generic", seed=9)
    cfg = TrainConfig(epochs=1, batch_size=8, learning_rate=5e-4, warmup_steps=1, precision="fp32", shuffle_buffer=16)
    report = finetune(dataclasses.replace(tiny_bundle, model=copy.deepcopy(tiny_bundle.model)), train, eval_pairs, cfg)
    assert report["split"]["train_shards"] == 4 and report["split"]["train_pairs"] == 80
    assert report["steps"] >= 8 and len(report["epoch_losses"]) == 1
    with pytest.raises(StreamError, match="cannot be split off a stream"):
        finetune(tiny_bundle, train, eval_pairs, dataclasses.replace(cfg, keep_best=True))


# -- the front doors -----------------------------------------------------------------------------------------------
def test_a_stream_without_eval_data_is_refused_with_the_reason(shards, tmp_path, capsys):
    folder, _ = shards
    pattern = f"{folder}/{{00000..00003}}.tar"
    with pytest.raises(StreamError) as refused:
        train_and_held_out(pattern, None, 0.2, 0)
    assert STREAM_NEEDS_EVAL in str(refused.value)
    assert main(["train", "--data", pattern, "--out", str(tmp_path / "o"), "--quiet", "--device", "cpu"]) == 2
    assert "cannot be split into training and held-out pairs" in capsys.readouterr().err
    held = synthetic.write_csv(tmp_path / "held", n_images=8, seed=1)
    code = main(
        ["train", "--data", pattern, "--eval-data", str(held), "--keep-best", "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert code == 2 and STREAM_CANNOT_CHOOSE[:40] in capsys.readouterr().err


def test_cliptuner_train_on_a_shard_pattern(shards, tmp_path):
    folder, _ = shards
    held = synthetic.write_csv(tmp_path / "held", n_images=10, domain="generic", seed=7)
    out = tmp_path / "model"
    args = ["train", "--data", f"{folder}/{{00000..00003}}.tar", "--eval-data", str(held), "--epochs", "1"]
    args += ["--batch-size", "8", "--shuffle-buffer", "16", "--warmup-steps", "1", "--out", str(out), "--quiet"]
    assert main(args + ["--device", "cpu", "--no-plots", "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["split"]["train_shards"] == 4 and report["split"]["eval_images"] == 10
    assert report["steps"] >= 8 and report["config"]["shuffle_buffer"] == 16
    assert torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)["epoch"] == 1


def test_train_accepts_a_shard_pattern_under_the_data_root_and_refuses_one_outside(tuner, shards, tmp_path):
    folder, _ = shards
    inside = tuner.data_root / "web"
    inside.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (inside / name).write_bytes((folder / name).read_bytes())
    request = tuner.parse_request({"data": "web/{00000..00001}.tar", "eval_data": "web/00001.tar", "batch_size": 8})
    assert request.data == tuner.data_root / "web/{00000..00001}.tar"
    folder_request = tuner.parse_request({"data": "web", "batch_size": 8})  # a folder of shards
    assert folder_request.data == tuner.data_root / "web"
    train, held_out, sources = tuner.split_pairs(request, DocList[ClipDoc]())
    assert isinstance(train, StreamSource) and train.num_shards == 2  # streamed by the run, not written out
    assert len(held_out) == PER_SHARD and sources == {"source": "web/{00000..00001}.tar", "held_out": "web/00001.tar"}
    assert request_digest({}, DocList[ClipDoc](), {"data": request.data}).startswith("derived-")  # each shard's stat
    with pytest.raises(DataError, match="'web': a stream .* cannot be split into training and held-out") as refused:
        tuner.split_pairs(folder_request, DocList[ClipDoc]())
    assert str(tuner.data_root) not in str(refused.value)

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "00000.tar").write_bytes((folder / "00000.tar").read_bytes())
    (inside / "00002.tar").symlink_to(outside / "00000.tar")
    for spec in ("web/../../outside/{00000..00000}.tar", "web/{00001..00002}.tar", f"{outside}/{{00000,00000}}.tar"):
        with pytest.raises(ValueError, match="outside the data root") as refused:
            tuner.parse_request({"data": spec, "eval_data": "web/00001.tar"})
        assert str(tuner.data_root) not in str(refused.value)  # the client never learns where the root is
    with pytest.raises(ValueError, match="no such file"):
        tuner.parse_request({"data": "web/{00000..00005}.tar"})


@pytest.mark.slow
def test_train_endpoint_trains_on_a_stream_under_the_data_root(tuner, shards):
    folder, _ = shards
    web = tuner.data_root / "web"
    web.mkdir()
    for k in range(4):
        (web / f"{k:05d}.tar").write_bytes((folder / f"{k:05d}.tar").read_bytes())
    held = synthetic.write_csv(tuner.data_root / "held", n_images=8, domain="generic", seed=3)
    parameters = {**QUICK, "data": "web/{00000..00002}.tar", "eval_data": str(held.relative_to(tuner.data_root))}
    report = run(tuner.train(docs=DocList[ClipDoc](), parameters=parameters))[0].tags["report"]
    assert report["split"]["source"] == "web/{00000..00002}.tar" and report["split"]["train_shards"] == 3
    assert report["split"]["train_pairs"] == 60 and report["split"]["eval_images"] == 8
    assert report["steps"] >= 5 and report["model_version"] == "v2"


def test_hostile_stream_requests_are_refused_by_name_and_the_tuner_goes_on(tuner, shards, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, _ = shards
    web = tuner.data_root / "web"
    web.mkdir()
    (web / "00000.tar").write_bytes((folder / "00000.tar").read_bytes())
    secret = tmp_path / "secret.png"  # an image outside the data root, named by a parquet file inside it
    secret.write_bytes(_pairs(1)[0][1])
    table = pa.table(
        {"image_path": [str(secret), "../../../../../../../../etc/hostname"], "caption": ["a secret", "another"]}
    )
    pq.write_table(table, web / "pairs.parquet")
    request = tuner.parse_request({"data": "web/pairs.parquet", "eval_data": "web/00000.tar", "batch_size": 2})
    with pytest.raises(DataError, match="web/pairs.parquet#0:1: image .* is not allowed") as refused:
        tuner.split_pairs(request, DocList[ClipDoc]())
    assert "#0:1: image '/etc/hostname' is not allowed" in str(refused.value)  # every row named, not only the first
    assert str(tuner.data_root) not in str(refused.value)

    too_many = "web/{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}.tar"  # a million names
    with pytest.raises(ValueError, match="100000|too many|at most") as refused:
        tuner.parse_request({"data": too_many, "eval_data": "web/00000.tar"})
    for name, value in (("loss", "triplet"), ("loss", 3), ("hard_negatives", "yes")):
        with pytest.raises(ValueError, match=name):
            tuner.parse_request({"data": "web/00000.tar", "eval_data": "web/00000.tar", name: value})
    # the next request is served
    status = run(tuner.report_status(docs=DocList[ClipDoc]()))[0].tags
    assert status["model_version"] == "v1"

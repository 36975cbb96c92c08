"""``cliptuner data check`` and the check /train runs first: every defect of a hand-made set is found at once.

Each set is a few small PNGs and a PAIRS file in ``tmp_path``; the held-out side a defect falls on is taken from
the trainer's own split (:func:`cliptuner.train.data.train_and_held_out`), not from the check, so that a leak is
judged against the split training would really make.
"""

import csv
import dataclasses
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from docarray import DocList
from PIL import Image
from support import QUICK, png, run

from cliptuner.cli import main
from cliptuner.train import synthetic
from cliptuner.train.data import DataError, from_memory, load_csv, train_and_held_out
from cliptuner.train.datacheck import (
    CaptionTokens,
    caption_tokens_of,
    check_before_training,
    check_pairs,
    version_caption_tokens,
)
from executors import ClipDoc
from executors.tuner import TrainingInputError

SCENES = synthetic.generate(16, domain="domain", seed=4)  # 16 distinct 64x64 images, one caption each
WORDS = CaptionTokens(lambda text: len(text.split()) + 2, context_length=8, name="words")  # start + words + end


def write_pairs(folder: Path, rows: list[tuple[str, str]], images: dict[str, bytes], name: str = "pairs.csv") -> Path:
    """``folder/name`` with ``image,caption`` rows, and each image file of ``images`` (relative name → bytes)."""
    for relative, data in images.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    path = folder / name
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path


def scene_set(folder: Path, n: int = 12, offset: int = 0, name: str = "pairs.csv") -> Path:
    """``n`` synthetic scenes (from ``offset``) as PNGs under ``folder/images`` and their pairs."""
    images = {f"images/s{offset + i}.png": png(SCENES.images[offset + i]) for i in range(n)}
    rows = [(f"images/s{offset + i}.png", SCENES.captions[offset + i]) for i in range(n)]
    return write_pairs(folder, rows, images, name)


def kinds(findings) -> set[str]:
    return {f.kind for f in findings}


def finding(report, kind):
    return next(f for f in report.problems + report.warnings if f.kind == kind)


def test_a_clean_set_passes_and_its_split_is_the_trainers(tmp_path):
    path = scene_set(tmp_path)
    report = check_pairs(path, eval_fraction=0.25, split_seed=3, tokens=dataclasses.replace(WORDS, context_length=77))
    train, held_out = train_and_held_out(path, None, 0.25, 3)
    assert report.ok and report.problems == []
    assert (report.pairs, report.images) == (12, 12)
    assert (report.train_images, report.held_out_images) == (train.num_images, held_out.num_images) == (9, 3)
    assert report.duplicates == {"groups": 0, "images": 0, "held_out_leaked": 0}
    assert report.image_sizes["width"] == {"min": 64, "median": 64, "max": 64}
    assert "no problems" in report.summary() and "0.25 of the images, seed 3" in report.summary()


def test_missing_corrupt_and_bad_rows_are_all_reported_at_once(tmp_path):
    good = png(SCENES.images[0])
    images = {
        "a.png": good,
        "b.png": png(SCENES.images[1]),
        "c.png": png(SCENES.images[2]),
        "corrupt.png": b"\x89PNG\r\n\x1a\n not a PNG at all",
        "cut.png": good[: len(good) // 2],  # a valid header, half the data
        "empty.png": b"",
    }
    rows = [
        ("a.png", "a scene"),
        ("b.png", "another scene"),
        ("c.png", "a third scene"),
        ("gone.png", "a missing file"),
        ("gone.png", "the same missing file again"),
        ("corrupt.png", "random bytes"),
        ("cut.png", "a truncated file"),
        ("empty.png", "an empty file"),
        ("a.png", ""),
    ]
    path = write_pairs(tmp_path, rows, images)
    with pytest.raises(DataError) as loader:  # the loader stops at the rows; it does not look at the bytes
        load_csv(path)
    assert "corrupt.png" not in str(loader.value)
    report = check_pairs(path, tokens=WORDS)
    assert not report.ok
    assert kinds(report.problems) == {"missing_images", "unreadable_images", "bad_rows"}
    missing = finding(report, "missing_images")
    assert missing.count == 1 and "(2 row(s))" in missing.message
    assert missing.examples == [f"line 5: image file 'gone.png' not found (looked at {tmp_path / 'gone.png'})"]
    unreadable = finding(report, "unreadable_images")
    assert unreadable.count == 3 and report.to_dict()["unreadable_images"] == 3
    text = "\n".join(unreadable.examples)
    assert "'corrupt.png'" in text and "'cut.png'" in text and "'empty.png'" in text and "cannot decode" in text
    assert finding(report, "bad_rows").examples == ["line 10: empty caption for image 'a.png'"]
    summary = report.summary()
    for expected in ("gone.png", "corrupt.png", "cut.png", "line 10"):
        assert expected in summary


def test_the_same_bytes_on_both_sides_of_the_split_is_a_leak(tmp_path):
    path = scene_set(tmp_path)
    train, held_out = train_and_held_out(path, None, 0.25, 3)
    held, copy = held_out.image_ids[0], train.image_ids[0]
    (tmp_path / copy).write_bytes((tmp_path / held).read_bytes())  # one picture under two names, split apart
    report = check_pairs(path, eval_fraction=0.25, split_seed=3)
    assert not report.ok and kinds(report.problems) == {"leak"}
    leak = finding(report, "leak")
    assert leak.count == 1 and leak.examples == [f"{held!r} (held out) has the bytes of {copy!r} (train)"]
    assert report.duplicates == {"groups": 1, "images": 2, "held_out_leaked": 1}
    other_seed = check_pairs(path, eval_fraction=0.25, split_seed=4)  # another split: judged on its own sides
    sides = train_and_held_out(path, None, 0.25, 4)
    apart = (held in sides[0].image_ids) != (copy in sides[0].image_ids)
    assert other_seed.ok is not apart


def test_the_same_bytes_on_one_side_is_a_warning_not_a_leak(tmp_path):
    path = scene_set(tmp_path)
    train, _ = train_and_held_out(path, None, 0.25, 3)
    first, second = train.image_ids[:2]
    (tmp_path / second).write_bytes((tmp_path / first).read_bytes())
    report = check_pairs(path, eval_fraction=0.25, split_seed=3)
    assert report.ok and report.count("leak") == 0
    duplicate = finding(report, "duplicate_images")
    assert duplicate.examples == [f"train: {first!r} = {second!r}"]
    assert report.duplicates == {"groups": 1, "images": 2, "held_out_leaked": 0}


def test_an_eval_data_image_with_the_bytes_of_a_training_image_is_a_leak(tmp_path):
    data = scene_set(tmp_path / "train", n=8)
    eval_data = scene_set(tmp_path / "eval", n=4, offset=8)
    assert check_pairs(data, eval_data).ok
    (tmp_path / "eval" / "images" / "s9.png").write_bytes((tmp_path / "train" / "images" / "s2.png").read_bytes())
    report = check_pairs(data, eval_data)
    assert (report.train_images, report.held_out_images) == (8, 4) and "the eval data" in report.held_out_from
    assert finding(report, "leak").examples == ["'images/s9.png' (held out) has the bytes of 'images/s2.png' (train)"]
    in_memory = from_memory(SCENES.images[:8], SCENES.captions[:8], name="request")  # pairs of a /train request
    assert check_pairs(in_memory, eval_data).count("leak") == 0  # an array is compared with arrays only
    blobs = from_memory([png(a) for a in SCENES.images[:8]], SCENES.captions[:8], name="request")
    assert finding(check_pairs(blobs, eval_data), "leak").examples == [
        "'images/s9.png' (held out) has the bytes of '2' (train)"
    ]


def test_a_karpathy_file_in_both_splits_is_a_leak_and_other_splits_are_noted(tmp_path):
    images = {f"images/s{i}.png": png(SCENES.images[i]) for i in range(6)}
    write_pairs(tmp_path, [], images)
    entries = [
        {"filepath": "images", "filename": f"s{i}.png", "split": split, "sentences": [{"raw": SCENES.captions[i]}]}
        for i, split in enumerate(["train", "train", "restval", "test", "val", "train"])
    ]
    entries.append({"filepath": "images", "filename": "s0.png", "split": "test", "sentences": [{"raw": "again"}]})
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": entries}), encoding="utf-8")
    report = check_pairs(path)
    assert (report.train_images, report.held_out_images) == (4, 2)
    assert report.held_out_from == "the JSON's test split"
    assert finding(report, "leak").examples == ["'images/s0.png' (held out) has the bytes of 'images/s0.png' (train)"]
    assert report.notes[0] == "1 entries of split(s) ['val'] are neither trained on nor held out"


def test_repeated_captions_are_counted_case_and_spacing_aside(tmp_path):
    images = {f"s{i}.png": png(SCENES.images[i]) for i in range(6)}
    captions = ["a red circle", "A red  circle", "a red circle", "a blue square", "a blue square", "unique"]
    path = write_pairs(tmp_path, [(f"s{i}.png", c) for i, c in enumerate(captions)], images)
    report = check_pairs(path, eval_fraction=0.3, split_seed=0)
    repeated = finding(report, "repeated_captions")
    assert report.ok and repeated.count == 2
    assert repeated.examples == ["'a red circle' x3", "'a blue square' x2"]
    assert report.captions["repeated_pairs"] == 5 and report.captions["distinct"] == 3


def test_captions_over_the_context_length_are_reported_with_their_share(tmp_path):
    images = {f"s{i}.png": png(SCENES.images[i]) for i in range(4)}
    captions = ["one two three four five six", "one two three four five six seven", "short", "two words"]
    path = write_pairs(tmp_path, [(f"s{i}.png", c) for i, c in enumerate(captions)], images)
    report = check_pairs(path, tokens=WORDS)  # 8 tokens: start, six words, end fit; seven words do not
    truncated = finding(report, "truncated_captions")
    assert report.ok and truncated.count == 1
    assert truncated.examples == ["'one two three four five six seven' (9 tokens)"]
    assert report.captions["truncated"] == 1 and report.captions["truncated_share"] == 0.25
    assert report.captions["longest_tokens"] == 9 and "25.0% of the pairs" in truncated.message
    no_tokenizer = check_pairs(path)
    assert no_tokenizer.count("truncated_captions") == 0 and "caption lengths not checked" in no_tokenizer.notes[0]


def test_the_model_tokenizers_count_tokens_without_truncation(tiny_model_dir):
    from cliptuner.model.tokenizer import ClipTokenizer

    long = " ".join(["a large striped magenta triangle"] * 10)
    version = version_caption_tokens(tiny_model_dir)  # the version's CLIP BPE, torch-free
    assert version.context_length == 32 and version.count(long) > 32
    bpe = ClipTokenizer(tiny_model_dir / "bpe_simple_vocab_16e6.txt.gz", context_length=77)
    short = "a small teal circle"
    assert version.count(short) == int(np.count_nonzero(bpe([short])[0]))  # start, tokens, end: nothing cut
    assert version.count(long) == int(np.count_nonzero(bpe([long])[0]))


def test_an_open_clip_hf_tokenizer_is_counted_with_its_special_tokens():
    from open_clip.tokenizer import HFTokenizer, get_clean_fn
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "a": 4, "red": 5, "circle": 6}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    hf = HFTokenizer.__new__(HFTokenizer)  # as open_clip builds it, without a hub to download from
    hf.tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", pad_token="[PAD]")
    hf.clean_fn, hf.context_length = get_clean_fn("whitespace"), 5
    tokens = caption_tokens_of(hf)
    assert tokens.context_length == 5
    assert tokens.count("a  red circle") == 5 and tokens.count("a red circle a red circle") == 8


def test_the_open_clip_tokenizer_of_an_arch_matches_the_exported_one(tiny_model_dir):
    from cliptuner.train.datacheck import arch_caption_tokens

    arch = arch_caption_tokens("cliptuner-tiny")
    version = version_caption_tokens(tiny_model_dir)
    assert arch.context_length == version.context_length == 32
    for text in (SCENES.captions[0], " ".join(SCENES.captions)):
        assert arch.count(text) == version.count(text)
    with pytest.raises(ValueError, match="unknown model .no-such-arch.; known: "):
        arch_caption_tokens("no-such-arch")


def test_the_spread_of_image_sizes_and_tiny_or_long_images(tmp_path):
    def encoded(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (width % 255, height % 255, 7)).save(buffer, format="PNG")
        return buffer.getvalue()

    sizes = [(64, 48), (64, 48), (640, 480), (16, 16), (300, 20), (100, 200)]
    images = {f"i{k}.png": encoded(w, h) for k, (w, h) in enumerate(sizes)}
    path = write_pairs(tmp_path, [(f"i{k}.png", f"image number {k}") for k in range(len(sizes))], images)
    report = check_pairs(path, eval_fraction=0.3)
    spread = report.image_sizes
    assert spread["count"] == 6 and spread["distinct"] == 5
    assert spread["width"] == {"min": 16, "median": 82, "max": 640}
    assert spread["height"] == {"min": 16, "median": 48, "max": 480}
    assert spread["aspect"]["max"] == 15.0 and spread["aspect"]["min"] == 0.5
    assert spread["most_common"][0] == {"size": "64x48", "images": 2}
    assert sorted(finding(report, "tiny_images").examples) == ["image 'i3.png': 16x16", "image 'i4.png': 300x20"]
    assert finding(report, "extreme_aspect").examples == ["image 'i4.png': 300x20"]
    assert report.ok and "image sizes: width 16–640" in report.summary()


def test_too_few_images_and_a_batch_larger_than_the_training_side_are_problems(tmp_path):
    one = write_pairs(tmp_path, [("a.png", "a scene"), ("a.png", "the same scene")], {"a.png": png(SCENES.images[0])})
    report = check_pairs(one)
    assert kinds(report.problems) == {"too_few_images"} and "cannot hold out 1 of 1 image(s)" in report.summary()
    path = scene_set(tmp_path / "twelve")
    assert kinds(check_pairs(path, batch_size=16).problems) == {"too_few_images"}
    assert check_pairs(path, batch_size=8).ok
    empty = write_pairs(tmp_path, [], {}, name="empty.csv")
    assert kinds(check_pairs(empty).problems) == {"no_pairs"}
    assert kinds(check_pairs(tmp_path / "nothing.csv").problems) == {"pairs_file"}


def test_sources_the_check_does_not_read_are_skipped(tmp_path, caplog):
    (tmp_path / "shards").mkdir()
    (tmp_path / "pairs.parquet").write_bytes(b"PAR1")
    for source in (tmp_path / "shards", tmp_path / "pairs.parquet"):
        report = check_pairs(source)
        assert report.skipped and report.ok and report.pairs == 0
    with caplog.at_level("INFO", logger="cliptuner.train.datacheck"):
        assert check_before_training(tmp_path / "pairs.parquet", None, 0.2, 0).skipped
    assert "data check skipped" in caplog.text


def test_the_cli_exits_0_on_a_clean_set_and_1_with_problems_as_text_or_json(tmp_path, tiny_model_dir, capsys):
    path = scene_set(tmp_path)
    model = ["--model-dir", str(tiny_model_dir)]
    assert main(["data", "check", str(path), "--eval-fraction", "0.25", "--seed", "3", *model]) == 0
    out = capsys.readouterr().out
    assert "12 pairs, 12 images (9 train, 3 held out" in out and "no problems" in out
    (tmp_path / "images" / "s5.png").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", str(path), "--json", *model])
    assert exit_info.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["missing_images"] == 1 and report["pairs"] == 11
    assert report["problems"][0]["kind"] == "missing_images" and "s5.png" in report["problems"][0]["examples"][0]
    assert report["captions"]["context_length"] == 32 and report["captions"]["tokenizer"].startswith("cliptuner-tiny")
    assert main(["data", "check", str(tmp_path / "images")]) == 2  # a folder: not a PAIRS file the check reads
    assert "cannot check" in capsys.readouterr().err


def test_train_refuses_pairs_with_problems_before_the_run_starts_and_keeps_serving(tuner, workspace):
    data = workspace / "data" / "set"
    scene_set(data)
    (data / "images" / "s4.png").write_bytes(b"not an image")
    (data / "images" / "s7.png").unlink()
    with pytest.raises(TrainingInputError) as caught:
        run(tuner.train(docs=DocList[ClipDoc](), parameters={**QUICK, "data": "set/pairs.csv"}))
    message = str(caught.value)
    assert caught.value.phase == "preparing" and "the data check found 2 problem(s)" in message
    assert "image 'images/s4.png' (" in message and "cannot decode" in message
    assert "line 9: image file 'images/s7.png' not found" in message
    assert str(workspace / "data") not in message  # rows are named by their paths under the data root only
    status = run(tuner.report_status(docs=DocList[ClipDoc]()))[0].tags
    assert status["model_version"] == "v1" and status["training"]["state"] == "failed"
    assert status["training"]["phase"] == "preparing" and "the data check found" in status["training"]["error"]
    assert tuner.runs._lock.acquire(blocking=False)  # the next run may start
    tuner.runs._lock.release()
    assert list(tuner.runs_dir.iterdir()) == []  # nothing of the run is left


def test_a_full_decode_finds_corrupt_pixel_data_behind_a_sound_header(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))  # 64x64 RGB, chunks with good CRCs
    broken = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")
    images = {f"s{i}.png": png(SCENES.images[i]) for i in range(5)}
    path = write_pairs(tmp_path, [(f"s{i}.png", SCENES.captions[i]) for i in range(6)], {**images, "s5.png": broken})
    assert check_pairs(path).ok  # the header, the chunk structure and the size are fine
    report = check_pairs(path, decode=True)
    assert finding(report, "unreadable_images").examples[0].startswith("image 's5.png' (")
    assert "cannot decode (OSError: " in finding(report, "unreadable_images").examples[0]

"""Feedback as training data (:mod:`cliptuner.serve.feedback_pairs`): query keys; positive pairs of text and image
queries; hard negatives skipped above the first choice or marked wrong, in the query's batch group with the query
first, capped; repeats kept once; chosen docs without content skipped; the split by time and query (the newest
share held out, the kept set reused as the regression set and never trained on); ``held_out.json`` written and read
back; the counts; and the error when nothing is left to train on."""

import hashlib
import json

import numpy as np
import pytest
from support import png

from cliptuner.serve.feedback import FEEDBACK_SUBDIR, DocContent, FeedbackEvent, FeedbackLog, RecordedEvent
from cliptuner.serve.feedback_pairs import (
    DEFAULT_HOLDOUT,
    HELD_OUT_FILE,
    MAX_HARD_NEGATIVES,
    feedback_pairs,
    held_out_count,
    query_key,
    read_kept,
    split_feedback,
)
from cliptuner.train.data import NO_GROUP, GroupedBatchSampler


def image(n: int) -> bytes:
    """A small PNG, distinct for each ``n``."""
    pixels = np.full((4, 4, 3), n % 256, dtype=np.uint8)
    pixels[0, 0] = (n // 256, 7, 9)
    return png(pixels)


QUERY_IMAGE = image(1000)


def doc(doc_id: str, text: bool = True, picture: bool = True) -> DocContent:
    """A doc whose text is ``"text of <id>"`` and whose image is ``image(<its number>)``."""
    number = sum(ord(c) * 31**i for i, c in enumerate(doc_id)) % 900
    return DocContent(doc_id, text=f"text of {doc_id}" if text else None, image=image(number) if picture else None)


def docs(*ids: str) -> dict[str, DocContent]:
    return {doc_id: doc(doc_id) for doc_id in ids}


def recorded(seq: int, shown, chosen=(), wrong=(), text="red shoe", query_image=None) -> RecordedEvent:
    event = FeedbackEvent(
        event_id=f"e{seq}",
        shown=tuple(shown),
        chosen=tuple(chosen),
        wrong=tuple(wrong),
        query_text=text,
        query_image=query_image,
    )
    return RecordedEvent(seq=seq, received_at=float(seq), event=event)


def rows(pairs):
    """A PairSet as ``(image id, caption, group)`` per pair, in order (group None when the set has none)."""
    if pairs is None:
        return []
    groups = pairs.groups if pairs.groups is not None else [None] * len(pairs)
    return [(pairs.image_ids[pairs.image_index[i]], pairs.captions[i], groups[i]) for i in range(len(pairs))]


def image_of(pairs, image_id: str) -> bytes:
    return pairs.images[pairs.image_ids.index(image_id)]


# -- query keys ------------------------------------------------------------------------------------------------------
def test_query_key_normalises_text_hashes_images_and_text_wins():
    def key(**query):
        return query_key(FeedbackEvent("e", shown=("a",), chosen=("a",), **query))

    assert key(query_text="  Red \t SHOE ") == "text:red shoe"
    assert key(query_text="Ｒｅｄ shoe") == "text:red shoe"  # full-width letters (NFKC)
    assert key(query_text="red shoes") != key(query_text="red shoe")
    assert key(query_image=QUERY_IMAGE) == f"image:{hashlib.sha256(QUERY_IMAGE).hexdigest()}"
    assert key(query_image=image(1)) != key(query_image=image(2))
    assert key(query_text="Red shoe", query_image=QUERY_IMAGE) == "text:red shoe"


# -- positive pairs --------------------------------------------------------------------------------------------------
def test_a_text_query_pairs_with_the_chosen_docs_images():
    contents = docs("a", "b") | {"c": doc("c", picture=False)}
    split = feedback_pairs([recorded(1, "abc", chosen="abc", text=" Red shoe ")], contents)
    assert rows(split.train) == [("doc:a", "Red shoe", NO_GROUP), ("doc:b", "Red shoe", NO_GROUP)]
    assert image_of(split.train, "doc:b") == contents["b"].image
    assert split.counts["skipped_no_content"] == 1  # c has no image to pair the text with
    assert split.held_out is None and split.regression is None


def test_an_image_query_pairs_with_the_chosen_docs_texts():
    contents = docs("a") | {"b": doc("b", text=False)}
    split = feedback_pairs([recorded(1, "ab", chosen="ab", text=None, query_image=QUERY_IMAGE)], contents)
    query_id = f"query:{hashlib.sha256(QUERY_IMAGE).hexdigest()[:12]}"
    assert rows(split.train) == [(query_id, "text of a", NO_GROUP)]
    assert image_of(split.train, query_id) == QUERY_IMAGE
    assert split.counts["skipped_no_content"] == 1  # b has no text to pair the image with


def test_a_query_with_text_and_image_gives_the_text_pairs():
    split = feedback_pairs([recorded(1, "a", chosen="a", text="red shoe", query_image=QUERY_IMAGE)], docs("a"))
    assert rows(split.train) == [("doc:a", "red shoe", NO_GROUP)]


def test_a_chosen_doc_without_stored_content_is_skipped():
    split = feedback_pairs([recorded(1, "ab", chosen="ab")], docs("b"))
    assert rows(split.train) == [("doc:b", "red shoe", NO_GROUP)]
    assert split.counts["skipped_no_content"] == 1


# -- hard negatives --------------------------------------------------------------------------------------------------
def test_hard_negatives_are_the_wrong_docs_then_those_skipped_above_the_choice_in_the_querys_group():
    contents = docs(*"abcdefg")
    split = feedback_pairs([recorded(1, "abcdefg", chosen="d", wrong="fb")], contents)
    # wrong ones first (in the order shown: b, f), then the ones skipped above d (a, c); e and g, below, are not
    assert rows(split.train) == [
        ("doc:d", "red shoe", 0),
        ("doc:b", "text of b", 0),
        ("doc:f", "text of f", 0),
        ("doc:a", "text of a", 0),
        ("doc:c", "text of c", 0),
    ]
    assert image_of(split.train, "doc:f") == contents["f"].image
    assert split.counts["hard_negatives"] == 4 and split.counts["pairs_train"] == 1


def test_each_chosen_doc_leads_a_group_of_its_own_and_only_docs_above_the_first_choice_are_skipped_ones():
    split = feedback_pairs([recorded(1, "axbyc", chosen="xy")], docs(*"axbyc"))
    # b sits between the two choices: below the first one, so not a negative
    assert rows(split.train) == [
        ("doc:x", "red shoe", 0),
        ("doc:a", "text of a", 0),
        ("doc:y", "red shoe", 1),
        ("doc:a", "text of a", 1),
    ]


def test_an_image_querys_negatives_share_its_group():
    split = feedback_pairs([recorded(1, "ab", chosen="b", text=None, query_image=QUERY_IMAGE)], docs("a", "b"))
    query_id = f"query:{hashlib.sha256(QUERY_IMAGE).hexdigest()[:12]}"
    assert rows(split.train) == [(query_id, "text of b", 0), ("doc:a", "text of a", 0)]


def test_negatives_lacking_text_or_image_are_passed_over_and_the_rest_capped():
    above = [f"n{i}" for i in range(MAX_HARD_NEGATIVES + 3)]
    contents = docs(*above, "hit") | {"n0": doc("n0", text=False), "n1": doc("n1", picture=False)}
    split = feedback_pairs([recorded(1, [*above, "hit"], chosen=["hit"])], contents)
    negatives = [image_id for image_id, _, _ in rows(split.train)[1:]]
    assert negatives == [f"doc:n{i}" for i in range(2, 2 + MAX_HARD_NEGATIVES)]
    assert split.counts["hard_negatives"] == MAX_HARD_NEGATIVES


def test_a_doc_chosen_for_the_query_in_any_event_is_never_its_negative():
    events = [recorded(1, "ab", chosen="b"), recorded(2, "ab", chosen="a", text="RED shoe")]
    split = feedback_pairs(events, docs("a", "b"))
    assert rows(split.train) == [("doc:b", "red shoe", NO_GROUP), ("doc:a", "RED shoe", NO_GROUP)]
    assert split.counts["hard_negatives"] == 0
    # another query may still have a as a negative
    other = feedback_pairs([*events, recorded(3, "ab", chosen="b", text="blue hat")], docs("a", "b"))
    assert rows(other.train)[2:] == [("doc:b", "blue hat", 0), ("doc:a", "text of a", 0)]


def test_train_groups_fit_the_grouped_sampler_with_the_query_leading():
    events = [recorded(seq, "abcdefgh"[seq - 1 :] + "z", chosen="z", text=f"query {seq}") for seq in range(1, 5)]
    train = feedback_pairs(events, docs(*"abcdefghz")).train
    leads = {}
    for pair, group in enumerate(train.groups):
        leads.setdefault(group, pair)
        assert (train.captions[pair] == train.captions[leads[group]]) == (pair == leads[group])
    sampler = GroupedBatchSampler(train.image_index, train.groups, batch_size=6, seed=0, drop_last=False)
    seen = 0
    for batch in sampler:
        for group in {train.groups[pair] for pair in batch}:
            assert leads[group] in batch  # a group's pairs never go without their query
        seen += len(batch)
    assert seen > 0


# -- skipped events and repeats --------------------------------------------------------------------------------------
def test_an_event_without_a_choice_gives_no_pair():
    split = feedback_pairs([recorded(1, "ab", wrong="a"), recorded(2, "ab", chosen="b", text="hat")], docs("a", "b"))
    assert [caption for _, caption, _ in rows(split.train)] == ["hat", "text of a"]
    assert split.counts["skipped_no_choice"] == 1 and split.counts["events_used"] == 1


def test_a_query_chosen_again_is_kept_once_with_the_first_events_negatives():
    events = [
        recorded(1, "xab", chosen="a"),
        recorded(2, "yab", chosen="a", text="Red  Shoe"),
        recorded(3, "zab", chosen="ab"),
    ]
    split = feedback_pairs(events, docs(*"xyzab"))
    assert rows(split.train) == [
        ("doc:a", "red shoe", 0),
        ("doc:x", "text of x", 0),
        ("doc:b", "red shoe", 1),  # new in event 3: kept, with event 3's negative
        ("doc:z", "text of z", 1),
    ]
    assert split.counts["duplicates"] == 2
    assert split.counts["events_used"] == 2  # event 2 only repeated a pair


def test_counts_of_a_mixed_log():
    events = [
        recorded(1, "abc", chosen="c", wrong="a"),  # 1 positive, negatives a and b
        recorded(2, "abc", chosen="c"),  # a repeat
        recorded(3, "ab", wrong="b", text="hat"),  # no choice
        recorded(4, "abq", chosen="bq", text="cap"),  # q has no content
        recorded(5, "ab", chosen="a", text="old"),
        recorded(6, "ab", chosen="b", text="new"),
    ]
    split = feedback_pairs(events, docs(*"abc"), held_out_keys={"text:new"}, regression_keys={"text:old", "text:gone"})
    assert split.counts == {
        "events": 6,
        "events_used": 4,
        "queries_train": 2,
        "queries_held_out": 1,
        "queries_regression": 1,
        "pairs_train": 2,
        "pairs_held_out": 1,
        "pairs_regression": 1,
        "hard_negatives": 3,  # a and b for the red shoe, a (above b) for the cap
        "skipped_no_choice": 1,
        "skipped_no_content": 1,
        "duplicates": 1,
        "through_seq": 6,
    }
    assert len(split.train) == split.counts["pairs_train"] + split.counts["hard_negatives"]
    assert rows(split.held_out) == [("doc:b", "new", None)]  # positives only, no groups
    assert rows(split.regression) == [("doc:a", "old", None)]
    assert split.held_out_keys == ("text:new",)


def test_a_key_both_held_out_and_in_regression_is_refused():
    with pytest.raises(ValueError, match=r"text:a.*both held out and in the regression set"):
        feedback_pairs([], {}, held_out_keys={"text:a"}, regression_keys={"text:a"})


# -- the split by time -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "holdout", "expected"),
    [
        (0, 0.2, 0),
        (1, 0.2, 0),
        (1, 0.9, 0),
        (2, 0.2, 1),
        (5, 0.2, 1),
        (6, 0.2, 2),
        (15, 0.2, 3),
        (50, 0.14, 7),
        (4, 0.9, 3),
        (4, 0, 0),
    ],
)
def test_held_out_count(n, holdout, expected):
    assert held_out_count(n, holdout) == expected


@pytest.mark.parametrize("holdout", [-0.1, 1.0, 1.5, True, "0.2", None])
def test_a_bad_holdout_is_refused(holdout, tmp_path):
    with pytest.raises(ValueError, match="holdout must be a number in"):
        held_out_count(3, holdout)
    with FeedbackLog(tmp_path / FEEDBACK_SUBDIR) as log, pytest.raises(ValueError, match="holdout must be"):
        split_feedback(log, holdout=holdout)


@pytest.fixture
def log(tmp_path):
    with FeedbackLog(tmp_path / FEEDBACK_SUBDIR) as opened:
        yield opened


def record(log, event_id: str, shown, chosen=(), wrong=(), text=None, query_image=None) -> None:
    """Record an event whose shown docs have :func:`doc` content."""
    event = FeedbackEvent(
        event_id, shown=tuple(shown), chosen=tuple(chosen), wrong=tuple(wrong), query_text=text, query_image=query_image
    )
    assert log.record(event, docs(*shown))


def queries(pairs) -> set[str]:
    """The query texts among a set's captions (captions of docs start with "text of")."""
    return {caption for _, caption, _ in rows(pairs) if not caption.startswith("text of")}


def test_the_newest_queries_are_held_out_kept_and_then_checked_as_the_regression_set(log):
    for i in range(5):  # q0 ... q4, newest last; q0 is asked again last of all, so it is the newest
        record(log, f"e{i}", "ab", chosen="b", text=f"q{i}")
    record(log, "e5", "ab", chosen="a", text="Q0")
    first = split_feedback(log)  # 5 queries: ceil(0.2 * 5) = 1 held out, the newest one
    assert queries(first.held_out) == {"q0", "Q0"}
    assert queries(first.train) == {"q1", "q2", "q3", "q4"}
    assert first.regression is None
    assert first.held_out_keys == ("text:q0",)
    assert read_kept(log.root) == {"text:q0"}
    assert json.loads((log.root / HELD_OUT_FILE).read_text()) == {"keys": ["text:q0"], "through_seq": 6}

    # later: new queries, and new events for the held-out query; it stays out of training
    for i in range(5, 10):
        record(log, f"e{i + 1}", "ab", chosen="b", text=f"q{i}")
    record(log, "e11", "abc", chosen="c", text="q0")  # a new pair for q0 too
    record(log, "e12", "ab", chosen="a", text="q1")  # q1 again: trained on by the first run, never held out now
    second = split_feedback(log)  # 5 queries first asked since the last split (q5 ... q9): 1 held out, q9
    assert queries(second.regression) == {"q0", "Q0"}
    assert rows(second.regression) == [("doc:b", "q0", None), ("doc:a", "Q0", None), ("doc:c", "q0", None)]
    assert second.held_out_keys == ("text:q9",)
    assert queries(second.train) == {f"q{i}" for i in range(1, 9)}
    assert second.counts["queries_regression"] == 1 and second.counts["queries_held_out"] == 1
    assert read_kept(log.root) == {"text:q0", "text:q9"}

    third = split_feedback(log, persist=False)  # no query is new since the second split: none held out
    assert queries(third.regression) == {"q0", "Q0", "q9"}
    assert third.held_out_keys == () and third.held_out is None
    assert json.loads((log.root / HELD_OUT_FILE).read_text())["through_seq"] == 13  # a dry run writes nothing


def test_held_out_and_regression_queries_are_ranked_against_every_stored_doc_image(log):
    for i in range(6):
        record(log, f"e{i}", "abc", chosen="abc"[i % 3], text=f"q{i}")
    first = split_feedback(log)  # 6 queries: 2 held out, ranked against the images of a, b and c
    assert first.held_out.gallery == first.held_out.num_images - first.held_out.num_captioned > 0
    assert sorted(first.held_out.image_ids) == ["doc:a", "doc:b", "doc:c"]
    assert first.train.gallery == 0  # training never sees a gallery
    record(log, "e6", "bd", chosen="d", text="q6")
    second = split_feedback(log)
    assert sorted(second.regression.image_ids) == ["doc:a", "doc:b", "doc:c", "doc:d"]


def test_image_queries_are_split_by_their_image(log):
    record(log, "e1", "ab", chosen="a", text="hat")
    record(log, "e2", "ab", chosen="b", query_image=QUERY_IMAGE)
    split = split_feedback(log, holdout=DEFAULT_HOLDOUT)
    key = f"image:{hashlib.sha256(QUERY_IMAGE).hexdigest()}"
    assert split.held_out_keys == (key,)
    assert image_of(split.held_out, split.held_out.image_ids[0]) == QUERY_IMAGE
    assert read_kept(log.root) == {key}


def test_one_query_alone_is_trained_on_and_never_held_out_later(log):
    record(log, "e1", "ab", chosen="b", wrong="a", text="hat")
    split = split_feedback(log)
    assert rows(split.train) == [("doc:b", "hat", 0), ("doc:a", "text of a", 0)]
    assert split.held_out is None and split.counts["through_seq"] == 1
    assert json.loads((log.root / HELD_OUT_FILE).read_text()) == {"keys": [], "through_seq": 1}  # trained on


def test_queries_without_a_pair_are_not_held_out(log):
    record(log, "e1", "ab", chosen="a", text="hat")
    record(log, "e2", "ab", chosen="b", text="cap")
    record(log, "e3", "ab", wrong="b", text="newest but without a choice")
    split = split_feedback(log, holdout=0.2)
    assert split.held_out_keys == ("text:cap",)
    assert queries(split.train) == {"hat"}


def test_nothing_to_train_on_is_an_error_that_names_the_counts_and_writes_nothing(log):
    record(log, "e1", "ab", wrong="b", text="hat")
    with pytest.raises(ValueError, match=r"no feedback to train on: 1 event\(s\), 1 without a chosen id"):
        split_feedback(log)
    assert not (log.root / HELD_OUT_FILE).exists()


def test_only_regression_queries_left_is_an_error(log):
    record(log, "e1", "ab", chosen="b", text="hat")
    (log.root / HELD_OUT_FILE).write_text(json.dumps({"keys": ["text:hat"]}))
    with pytest.raises(ValueError, match=r"1 query\(ies\) in the regression set"):
        split_feedback(log)
    assert read_kept(log.root) == {"text:hat"}


def test_an_empty_log_is_an_error(log):
    with pytest.raises(ValueError, match=r"no feedback to train on: 0 event\(s\)"):
        split_feedback(log)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "is not JSON"),
        ('["text:a"]', "must hold"),
        ('{"keys": ["a"]}', "must start with"),
        ('{"keys": [1]}', "must start"),
    ],
)
def test_a_bad_held_out_file_is_refused_by_name(log, content, problem):
    record(log, "e1", "ab", chosen="b", text="hat")
    (log.root / HELD_OUT_FILE).write_text(content)
    with pytest.raises(ValueError, match=f"{HELD_OUT_FILE}.*{problem}"):
        split_feedback(log)

"""Bad samples are skipped and counted; too many of them stop training with one line naming examples."""

import numpy as np
import pytest
import torch

from mmgen.data.captions import build_caption_dataset
from mmgen.data.robust import BadSample, BadSampleTracker, collate_captions
from mmgen.errors import UserError

from .helpers import image_bytes, random_caption, random_image, write_table


def make_table_with_bad_rows(folder, rng):
    """A CSV of good images plus a truncated JPEG, a missing file, a garbage .png and an empty caption."""
    rows = []
    for index in range(int(rng.integers(3, 7))):
        random_image(rng, "RGB").save(folder / f"good-{index}.jpg")
        rows.append({"image": f"good-{index}.jpg", "caption": random_caption(rng)})
    jpeg = image_bytes(random_image(rng, "RGB", size=(48, 48)), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "garbage.png").write_bytes(rng.integers(0, 256, size=300, dtype=np.uint8).tobytes())
    random_image(rng, "RGB").save(folder / "uncaptioned.png")
    bad_rows = [
        {"image": "truncated.jpg", "caption": random_caption(rng)},
        {"image": "gone.png", "caption": random_caption(rng)},
        {"image": "garbage.png", "caption": random_caption(rng)},
        {"image": "uncaptioned.png", "caption": "   "},
    ]
    order = rng.permutation(len(rows) + len(bad_rows))
    all_rows = [(rows + bad_rows)[i] for i in order]
    write_table(folder / "table.csv", all_rows)
    return all_rows, len(rows)


def test_bad_samples_are_skipped_and_counted_by_the_collate(tmp_path):
    rng = np.random.default_rng(0)
    rows, good_count = make_table_with_bad_rows(tmp_path, rng)
    dataset = build_caption_dataset(str(tmp_path / "table.csv"), image_size=16, train=True)
    items = [dataset[i] for i in range(len(dataset))]
    reasons = {item.source.rsplit("/", 1)[-1]: item.reason for item in items if isinstance(item, BadSample)}
    assert reasons == {"truncated.jpg": "truncated", "gone.png": "missing", "garbage.png": "not an image",
                       "uncaptioned.png": "empty caption"}
    batch = collate_captions(items + [None])
    assert batch["images"].shape == (good_count, 3, 16, 16)
    assert batch["captions"] == [row["caption"] for row in rows if row["image"].startswith("good")]
    assert batch["skipped"] == 5
    assert len(batch["skipped_examples"]) == 3
    assert all(example.endswith(")") and "(" in example for example in batch["skipped_examples"])


def test_a_batch_of_only_bad_samples_is_empty_not_an_error():
    batch = collate_captions([BadSample("a.png", "missing"), BadSample("b.png", "truncated")])
    assert batch["images"].shape[0] == 0 and batch["captions"] == [] and batch["skipped"] == 2
    assert batch["skipped_examples"] == ["a.png (missing)", "b.png (truncated)"]


def fake_batch(good: int, bad: list[str]) -> dict:
    return {"images": torch.zeros(good, 3, 2, 2), "captions": ["x"] * good, "skipped": len(bad),
            "skipped_examples": bad[:3]}


def test_tracker_warns_once_and_tolerates_a_small_fraction():
    messages = []
    tracker = BadSampleTracker(max_bad_fraction=0.05, min_samples=50, log=messages.append)
    tracker.update(fake_batch(31, ["x.jpg (truncated)"]))
    for _ in range(20):
        tracker.update(fake_batch(32, []))
    tracker.update(fake_batch(30, ["y.jpg (missing)", "z.png (not an image)"]))
    assert (tracker.seen, tracker.skipped) == (32 * 22, 3)
    assert len(messages) == 1 and "x.jpg (truncated)" in messages[0] and "5%" in messages[0]


def test_tracker_waits_for_min_samples_then_raises_naming_examples():
    rng = np.random.default_rng(1)
    names = [f"img-{int(n)}.jpg (truncated)" for n in rng.integers(0, 10_000, size=6)]
    tracker = BadSampleTracker(max_bad_fraction=0.01, min_samples=50, log=lambda message: None)
    tracker.update(fake_batch(6, names[:2]))  # 25% bad, but only 8 samples seen: keep going
    tracker.update(fake_batch(30, []))
    with pytest.raises(UserError) as error:
        tracker.update(fake_batch(14, names[2:4]))
    message = str(error.value)
    assert message.startswith("4 of 54 samples were unreadable (more than 1%)")
    assert names[0] in message and names[1] in message and names[2] in message and names[3] not in message
    assert "data.max_bad_fraction" in message and "\n" not in message


def test_tracker_with_a_zero_limit_raises_on_the_first_bad_sample_after_min_samples():
    tracker = BadSampleTracker(max_bad_fraction=0.0, min_samples=10, log=lambda message: None)
    tracker.update(fake_batch(20, []))
    with pytest.raises(UserError, match="1 of 21"):
        tracker.update(fake_batch(0, ["a.png (missing)"]))


def test_a_garbage_file_in_a_labelled_folder_is_skipped_and_labels_stay_aligned(tmp_path):
    rng = np.random.default_rng(2)
    for folder in ("cat", "dog"):
        (tmp_path / folder).mkdir()
        random_image(rng, "RGB").save(tmp_path / folder / "a.png")
    (tmp_path / "cat" / "b.png").write_bytes(b"not a png at all")
    dataset = build_caption_dataset(str(tmp_path), image_size=8, train=False)
    batch = collate_captions([dataset[i] for i in range(len(dataset))])
    assert batch["labels"].tolist() == [0, 1] and batch["captions"] == ["a photo of a cat.", "a photo of a dog."]
    assert batch["skipped"] == 1 and batch["skipped_examples"][0].endswith("b.png (not an image)")

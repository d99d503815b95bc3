import contextlib
import json

import pytest
import torch

from simfreeze.data.datamodule import TaskDataModule
from simfreeze.data.images import ImageFolderSource, open_source, prepare_batch
from simfreeze.data.splits import balanced_split, class_permutation, task_labels
from simfreeze.errors import DataConfigError
from tests.helpers import make_image_folder


def test_split_is_balanced_stratified_and_disjoint():
    split = balanced_split({"a": 100, "b": 57, "c": 80}, per_class=50, val_fraction=0.2, seed=3)
    for name in "abc":
        train, val = split.train[name], split.val[name]
        assert len(train) == 40 and len(val) == 10
        assert not set(train) & set(val)
        assert len(set(train)) == 40


def test_split_is_deterministic_and_seed_dependent():
    sizes = {"a": 100, "b": 100}
    assert balanced_split(sizes, 20, 0.25, seed=1) == balanced_split(sizes, 20, 0.25, seed=1)
    assert balanced_split(sizes, 20, 0.25, seed=1) != balanced_split(sizes, 20, 0.25, seed=2)


def test_class_indices_do_not_depend_on_the_other_classes():
    # The paper's cat and dog tasks must see the same cat images whatever else the task holds.
    alone = balanced_split({"cat": 500, "dog": 500}, 80, 0.2, seed=0)
    more = balanced_split({"bird": 300, "cat": 500, "dog": 500}, 80, 0.2, seed=0)
    assert alone.train["cat"] == more.train["cat"] and alone.val["dog"] == more.val["dog"]
    assert class_permutation(10, "cat", 0) != class_permutation(10, "dog", 0)


def test_training_caps_nest_and_keep_one_validation_set():
    # The data-size axis: each smaller training set is a subset of the larger, all validated alike.
    sizes = {"a": 100, "b": 90}
    full = balanced_split(sizes, 50, 0.2, seed=4)
    capped = {cap: balanced_split(sizes, 50, 0.2, seed=4, train_quotas={"a": cap, "b": cap}) for cap in (5, 20, 40)}
    for name in sizes:
        assert capped[40].train[name] == full.train[name]
        assert all(len(capped[cap].train[name]) == cap and capped[cap].val[name] == full.val[name] for cap in capped)
        assert set(capped[5].train[name]) < set(capped[20].train[name]) < set(capped[40].train[name])
    with pytest.raises(DataConfigError, match=r"data.train_per_class=41 must lie in \[1, 40\]"):
        balanced_split(sizes, 50, 0.2, seed=4, train_quotas={"a": 41})


@pytest.mark.parametrize("kwargs, message", [
    ({"per_class": 200}, "has only 100 images"),
    ({"val_fraction": 1.0}, "must lie in (0, 1)"),
    ({"val_fraction": 0.001}, "both must be > 0"),
])
def test_split_rejects_impossible_settings(kwargs, message):
    args = {"per_class": 50, "val_fraction": 0.2, "seed": 0, **kwargs}
    with pytest.raises(DataConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        balanced_split({"a": 100}, **args)


def test_positive_class_gives_binary_labels():
    assert task_labels(["cat", "dog"], None) == {"cat": 0, "dog": 1}
    assert task_labels(["cat", "dog"], "dog") == {"cat": 0, "dog": 1}
    assert task_labels(["cat", "dog", "bird"], "cat") == {"cat": 1, "dog": 0, "bird": 0}
    with pytest.raises(DataConfigError, match="data.positive='fox'"):
        task_labels(["cat", "dog"], "fox")


def test_datamodule_caps_training_images_per_class(image_folder):
    dm = TaskDataModule(root=str(image_folder), classes=["bee", "ant"], per_class=20, val_fraction=0.25,
                        train_per_class=4)
    dm.setup("fit")
    assert dm.tensors["train"][0].shape[0] == 8 and dm.tensors["val"][0].shape[0] == 10
    assert dm.split_record()["train_per_class"] == 4


def test_datamodule_builds_the_task_in_memory(image_folder, tmp_path):
    dm = TaskDataModule(root=str(image_folder), classes=["bee", "ant"], positive="bee", per_class=20,
                        val_fraction=0.25, batch_size=8)
    dm.setup("fit")
    images, labels = dm.tensors["train"]
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 16, 16)
    assert labels.bincount().tolist() == [15, 15]
    assert dm.sizes == {"train": 30, "val": 10}
    assert dm.num_classes == 2 and dm.labels == {"bee": 1, "ant": 0}
    dm.save_split(tmp_path / "split.json")
    record = json.loads((tmp_path / "split.json").read_text())
    assert len(record["files"]["train"]["bee"]) == 15
    assert not set(record["files"]["train"]["ant"]) & set(record["files"]["val"]["ant"])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,)


def test_same_seed_same_images_whatever_the_positive_class(image_folder):
    def files(positive):
        dm = TaskDataModule(root=str(image_folder), classes=["ant", "bee"], positive=positive, per_class=20,
                            batch_size=64)
        dm.setup()
        return dm.split_record()["files"]
    assert files("ant") == files("bee") == files(None)


def test_layout_detection_and_test_split(image_folder, image_folder_with_test):
    assert isinstance(open_source("cifar10", str(image_folder), False, ""), ImageFolderSource)
    flat = open_source("folder", str(image_folder / "train"), False, "")  # root/<class>/ also works
    assert flat.classes == ["ant", "bee", "cow"] and not flat.has_test
    dm = TaskDataModule(root=str(image_folder_with_test), classes=["ant", "bee"], per_class=20)
    dm.setup()
    assert dm.sizes["test"] == 12


def test_missing_root_and_unknown_class_are_clear_errors(image_folder, tmp_path):
    with pytest.raises(DataConfigError, match="does not exist.*CIFAR10_ROOT"):
        open_source("cifar10", str(tmp_path / "nowhere"), False, "")
    with pytest.raises(DataConfigError, match="data.download=true"):
        open_source("cifar10", None, False, "")
    dm = TaskDataModule(root=str(image_folder), classes=["ant", "yak"], per_class=5)
    with pytest.raises(DataConfigError, match=r"unknown class \['yak'\]"):
        dm.setup()


def test_corrupt_image_is_named(tmp_path):

    root = make_image_folder(tmp_path, {"a": 4, "b": 4})
    bad = root / "train" / "a" / "a_0001.png"
    bad.write_bytes(b"not an image")
    dm = TaskDataModule(root=str(root), classes=["a", "b"], per_class=4, val_fraction=0.5)
    with pytest.raises(DataConfigError, match="a_0001.png"):
        dm.setup()


def test_prepare_batch_normalises_resizes_and_flips():
    images = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    images[..., :4] = 255  # left half white
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.5)
    x = prepare_batch(images, mean, std)
    assert x.dtype == torch.float32 and x[..., 0].eq(1).all() and x[..., -1].eq(-1).all()
    assert prepare_batch(images, mean, std, image_size=16).shape == (64, 3, 16, 16)
    flipped = prepare_batch(images, mean, std, flip=True, generator=torch.Generator().manual_seed(0))
    turned = flipped[..., 0].eq(-1).all(dim=(1, 2))
    assert 10 < int(turned.sum()) < 54  # about half the batch, each image whole
    assert torch.equal(flipped[turned], x[turned].flip(-1)) and torch.equal(flipped[~turned], x[~turned])


def test_a_group_class_draws_its_images_evenly_from_its_members(tmp_path):

    root = make_image_folder(tmp_path, {"ant": 20, "bee": 20, "cow": 20, "elk": 20}, test_per_class=4)
    dm = TaskDataModule(root=str(root), classes=["ant", "bee", "noise"], groups={"noise": ["cow", "elk"]},
                        per_class=10, val_fraction=0.2)
    dm.setup()
    assert dm.num_classes == 3 and dm.labels == {"ant": 0, "bee": 1, "noise": 2}
    assert dm.tensors["train"][1].bincount().tolist() == [8, 8, 8] and dm.sizes["val"] == 6
    assert {name: len(idx) for name, idx in dm.split.train.items()} == {"ant": 8, "bee": 8, "cow": 4, "elk": 4}
    assert dm.tensors["test"][1].bincount().tolist() == [4, 4, 4]  # a group holds one class's share
    assert len(dm.class_images("noise")) == 8
    # a member's images are a prefix of what a task on that class alone takes: its validation
    # images stay validation images there, so no stage of a chain trains on them
    alone = TaskDataModule(root=str(root), classes=["cow", "elk"], per_class=10, val_fraction=0.2).plan_split()
    assert set(dm.split.val["cow"]) <= set(alone.val["cow"])
    assert dm.split_record()["groups"] == {"noise": ["cow", "elk"]}


@pytest.mark.parametrize("groups, message", [
    ({"fox": ["cow"]}, "every group must be one of data.classes"),
    ({"noise": ["ant"]}, "a member class is also a class or in two groups"),
    ({"noise": []}, "name at least one member class"),
])
def test_bad_groups_are_refused(groups, message):
    with pytest.raises(DataConfigError, match=message):
        TaskDataModule(classes=["ant", "noise"], groups=groups)


def test_16_bit_pngs_are_scaled_to_the_8_bit_range(tmp_path):
    from torchvision.io import decode_image

    from tests.helpers import write_png16

    root = make_image_folder(tmp_path, {"a": 4, "b": 4})
    eight_bit = decode_image(str(root / "train" / "b" / "b_0000.png"))
    write_png16(root / "train" / "b" / "b_0000.png", eight_bit.to(torch.int32) * 257)  # the same picture, 16 bits
    dm = TaskDataModule(root=str(root), classes=["a", "b"], per_class=4, val_fraction=0.25)
    dm.setup()
    stored = dm.tensors["train"][0].dtype, dm.tensors["val"][0].dtype
    assert stored == (torch.uint8, torch.uint8)
    everything = torch.cat([dm.tensors["train"][0], dm.tensors["val"][0]])
    assert any(torch.equal(image, eight_bit) for image in everything)  # not 257× too bright, not a crash


def test_classes_whose_images_differ_in_size_load_at_one_size(tmp_path):
    root = make_image_folder(tmp_path / "a", {"ant": 6}, size=16)
    make_image_folder(tmp_path / "b", {"bee": 6}, size=24)
    (tmp_path / "b" / "train" / "bee").rename(root / "train" / "bee")
    (root / "train" / "bee" / "bee_0000.png").write_bytes((root / "train" / "ant" / "ant_0000.png").read_bytes())
    dm = TaskDataModule(root=str(root), classes=["ant", "bee"], per_class=6, val_fraction=0.5, image_size=32)
    dm.setup()
    assert dm.tensors["train"][0].shape[1:] == dm.tensors["val"][0].shape[1:] == (3, 16, 16)
    assert dm.prepare(dm.tensors["train"][0][:2]).shape == (2, 3, 32, 32)


def test_one_large_image_first_does_not_make_every_image_that_large(tmp_path):
    root = make_image_folder(tmp_path / "a", {"ant": 6, "bee": 6}, size=16)
    make_image_folder(tmp_path / "big", {"ant": 1}, size=200)
    (tmp_path / "big" / "train" / "ant" / "ant_0000.png").replace(root / "train" / "ant" / "ant_0000.png")
    dm = TaskDataModule(root=str(root), classes=["ant", "bee"], per_class=6, val_fraction=0.5, image_size=32, seed=0)
    dm.setup()
    # held at the size the network sees (data.image_size), not 200×200; smaller first images keep their own size
    assert dm.stored_size == (32, 32) and dm.tensors["train"][0].shape[1:] == (3, 32, 32)
    assert TaskDataModule(root=str(root), classes=["ant", "bee"], per_class=6, val_fraction=0.5,
                          image_size=None).plan_split() is not None


def test_a_last_training_batch_of_one_joins_the_batch_before(image_folder):
    import lightning as L
    import torchvision

    from tests.helpers import sgd_classifier

    dm = TaskDataModule(root=str(image_folder), classes=["ant", "bee", "cow"], per_class=14, batch_size=32, image_size=32)
    dm.setup()
    assert len(dm.tensors["train"][1]) == 33
    loader = dm.train_dataloader()
    assert len(loader) == 1 and [len(batch[1]) for batch in loader] == [33]
    # BatchNorm in training mode: a batch of one image would raise "Expected more than 1 value per channel"
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    dm.batch_size = 16  # 33 = 16 + 17
    trainer.fit(sgd_classifier(torchvision.models.resnet18(num_classes=3), 3), datamodule=dm)
    assert trainer.global_step == 2


def test_batches_are_drawn_as_a_plain_shuffled_loader_draws_them():
    from torch.utils.data import DataLoader, RandomSampler

    from simfreeze.data.images import NoBatchOfOne

    data = list(range(70))
    torch.manual_seed(3)
    plain = [batch.tolist() for batch in DataLoader(data, batch_size=32, shuffle=True)]
    torch.manual_seed(3)
    ours = [batch.tolist() for batch in DataLoader(data, batch_sampler=NoBatchOfOne(RandomSampler(data), 32))]
    assert ours == plain and [len(b) for b in ours] == [32, 32, 6]
    assert [len(b) for b in NoBatchOfOne(range(65), 32)] == [32, 33] and len(NoBatchOfOne(range(65), 32)) == 2
    assert [len(b) for b in NoBatchOfOne(range(1), 32)] == [1]  # nothing to join


def test_a_folder_named_like_an_image_is_not_an_image(tmp_path):
    root = make_image_folder(tmp_path, {"a": 4, "b": 4})
    (root / "train" / "a" / "x.jpg").mkdir()
    assert ImageFolderSource(root).class_size("a") == 4


def test_the_holdout_is_never_trained_or_validated_on_and_is_the_test_split(tmp_path):
    from simfreeze.data.splits import shared_images

    root = make_image_folder(tmp_path, {"a": 20, "b": 20}, test_per_class=3)
    dm = TaskDataModule(root=str(root), classes=["a", "b"], per_class=10, holdout_per_class=6)
    split = dm.plan_split()
    for name in ("a", "b"):
        assert len(split.holdout[name]) == 6
        assert not set(split.holdout[name]) & (set(split.train[name]) | set(split.val[name]))
    # the end of the permutation: a task with more images still leaves it alone, as long as both fit
    bigger = balanced_split({"a": 20, "b": 20}, 14, 0.2, 0)
    assert not any(set(bigger.train[n] + bigger.val[n]) & set(split.holdout[n]) for n in ("a", "b"))
    too_big = balanced_split({"a": 20, "b": 20}, 18, 0.2, 0)
    assert shared_images(too_big, split)  # a source that trains on it is caught by the leakage check
    dm.setup()
    # the data's own test/ split comes first, named; the slice stays out of training all the same
    assert len(dm.tensors["test"][1]) == 6 and dm.test_from == "the data's test split (test/)"
    assert dm.split_record()["test_from"] == dm.test_from and dm.split_record()["test_images"] == 6
    sliced = TaskDataModule(root=str(root), classes=["a", "b"], per_class=10, holdout_per_class=6, use_test=False)
    sliced.setup()  # asked for the slice (or a root without test/): the held-out slice, named as such
    assert len(sliced.tensors["test"][1]) == 12 and sliced.test_from.startswith("the training folder's held-out slice")
    with pytest.raises(DataConfigError, match=r"data.per_class=16 \+ data.holdout_per_class=6 exceed the 20 images"):
        TaskDataModule(root=str(root), classes=["a", "b"], per_class=16, holdout_per_class=6).plan_split()


def test_skip_per_class_takes_the_images_after_another_tasks():
    sizes = {"a": 50, "b": 50}
    task = balanced_split(sizes, per_class=10, val_fraction=0.2, seed=0, holdout={"a": 10, "b": 10})
    base = balanced_split(sizes, per_class=20, val_fraction=0.2, seed=0, skip=10)
    for name in sizes:
        used = set(task.train[name]) | set(task.val[name]) | set(task.holdout[name])
        assert not used & (set(base.train[name]) | set(base.val[name]))
        assert len(base.train[name]) == 16 and len(base.val[name]) == 4
    # the images after the skip are the same ones a larger task takes after its first 10
    larger = balanced_split(sizes, per_class=30, val_fraction=0.5, seed=0)
    assert set(base.train["a"]) | set(base.val["a"]) == set(larger.train["a"] + larger.val["a"]) - set(
        task.train["a"] + task.val["a"])
    with pytest.raises(DataConfigError, match=r"after data.skip_per_class=45 but class 'a' has only 50"):
        balanced_split(sizes, per_class=10, val_fraction=0.2, seed=0, skip=45)
    with pytest.raises(DataConfigError, match=r"\+ data.skip_per_class=30 exceed the 50 images"):
        balanced_split(sizes, per_class=10, val_fraction=0.2, seed=0, skip=30, holdout={"a": 20, "b": 20})


def test_random_crops_shift_each_image_by_its_own_offset_with_zero_fill():
    from simfreeze.data.images import random_crops

    x = torch.arange(1, 2 * 3 * 6 * 6 + 1, dtype=torch.float32).view(2, 3, 6, 6).repeat(20, 1, 1, 1)
    out = random_crops(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    shifts = set()
    for image, shifted in zip(x, out):
        # the one offset (dy, dx) in [-2, 2]² that explains the output; outside the image, zeros
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(shifted, torch.nn.functional.pad(image, (2, 2, 2, 2))[:, 2 + dy:8 + dy, 2 + dx:8 + dx])]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 5  # offsets are drawn per image, not per batch


def test_crops_apply_to_training_batches_only_and_turn_the_prefix_cache_off(image_folder):
    from simfreeze.speed.prefix import fill_prefix_cache

    dm = TaskDataModule(root=str(image_folder), classes=["bee", "ant"], per_class=20, val_fraction=0.25,
                        crop=3, flip=False, image_size=None)
    dm.setup("fit")
    images = dm.tensors["val"][0][:4]
    assert torch.equal(dm.prepare(images), dm.prepare(images))  # evaluation: no shift
    torch.manual_seed(0)
    assert not torch.equal(dm.prepare(images, crop=3), dm.prepare(images))
    units = [("a", torch.nn.Conv2d(3, 3, 1)), ("b", torch.nn.Conv2d(3, 3, 1))]
    units[0][1].requires_grad_(False)
    cache, record = fill_prefix_cache(units, dm, torch.device("cpu"), contextlib.nullcontext, "32-true", 2**30, 8, 3)
    assert cache is None and "data.crop=3" in record["reason"]

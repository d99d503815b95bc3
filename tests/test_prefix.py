import lightning as L
import pytest
import torch
import torchvision

from simfreeze.data import TaskDataModule
from simfreeze.freeze import FreezeCallback, freeze_leading
from simfreeze.layers import layer_map
from simfreeze.model import Classifier
from simfreeze.prefix import PrefixCacheCallback, frozen_prefix_length, run_units, sequential_units


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_units_compose_to_the_network(arch):
    torch.manual_seed(0)
    net = torchvision.models.get_model(arch, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(run_units(sequential_units(net), x), net(x), atol=1e-5)


@pytest.mark.parametrize("n_frozen, boundary", [(0, None), (3, "maxpool"), (37, "layer3.4"), (40, "layer3.5"),
                                                (45, "layer4.0"), (49, "layer4.2")])
def test_the_prefix_ends_at_the_last_fully_frozen_block(n_frozen, boundary):
    net = torchvision.models.resnet50(num_classes=2)
    freeze_leading(net, layer_map(net, "resnet50"), n_frozen)
    units = sequential_units(net)
    k = frozen_prefix_length(units)
    if n_frozen == 3:  # conv1 and layer1.0's first two convs: only the stem is whole
        assert units[k - 1][0] == "bn1"
    else:
        assert (units[k - 1][0] if k else None) == boundary


def fit(folder, cache: bool, budget_gb: float = 4.0, seed: int = 0, max_epochs: int = 2):
    L.seed_everything(seed, verbose=False)
    dm = TaskDataModule(root=str(folder), classes=["ant", "bee"], per_class=24, batch_size=8, image_size=32)
    dm.setup()
    net = torchvision.models.resnet18(num_classes=2)
    layers = layer_map(net, "resnet18")
    callbacks = [FreezeCallback(layers, "static", k=9)]
    prefix = PrefixCacheCallback(dm, budget_gb=budget_gb)
    if cache:
        callbacks.append(prefix)
    module = Classifier(net, 2)
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return net, float(trainer.callback_metrics["val/loss"]), prefix.record, dm, trainer


@pytest.fixture
def float64():
    # Cached and uncached paths differ only by float rounding (the cache runs channels-last), which
    # training amplifies; in float64 that stays far below any real difference (a wrong boundary or
    # flip), so the comparison can be tight.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_cached_and_uncached_training_agree(image_folder_with_test, float64):
    plain, plain_loss, *_ = fit(image_folder_with_test, cache=False)
    cached, cached_loss, record, dm, _ = fit(image_folder_with_test, cache=True)
    assert record["used"] and record["boundary"] == "layer2.1" and record["views"] == 2
    assert dm.features["train"].shape[:2] == (38, 2) and dm.features["val"].shape[1] == 1
    assert dm.features["train"].dtype == torch.float64
    assert plain_loss == pytest.approx(cached_loss, abs=1e-9)
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-7, atol=1e-9), name


def test_over_budget_falls_back_to_the_uncached_path(image_folder_with_test):
    _, _, record, dm, _ = fit(image_folder_with_test, cache=True, budget_gb=1e-6)
    assert not record["used"] and "budget_gb" in record["reason"] and not dm.features


def test_cached_views_are_the_prefix_outputs_of_the_image_and_its_mirror(image_folder_with_test):
    net, _, record, dm, _ = fit(image_folder_with_test, cache=True)
    net.eval()
    units = sequential_units(net)
    images = dm.prepare(dm.tensors["train"][0][:8])
    with torch.no_grad():
        for view, x in enumerate((images, images.flip(-1))):
            expected = run_units(units[:record["units"]], x)
            assert torch.allclose(dm.features["train"][:8, view], expected, atol=1e-4)


def test_the_similarity_pass_fills_view_zero_of_the_cache(image_folder_with_test):
    from simfreeze.similarity import SimilarityCallback

    L.seed_everything(0, verbose=False)
    dm = TaskDataModule(root=str(image_folder_with_test), classes=["ant", "bee"], per_class=24, batch_size=8,
                        image_size=32)
    dm.setup()
    net = torchvision.models.resnet18(num_classes=2)
    layers = layer_map(net, "resnet18")
    similarity = SimilarityCallback(dm.class_images, dm.prepare, ["ant"], ["bee"], "fc")
    freezer = FreezeCallback(layers, "threshold", low=0.0, high=0.0, similarity=similarity)  # always L_total
    cache = PrefixCacheCallback(dm, similarity=similarity)
    cache.request_captures(net, [freezer.frozen_parameter_ids(net, d) for d in range(layers.l_total + 1)])
    assert sorted(similarity.capture) == [9, 10]  # the two deepest prefixes: up to layer3.0, layer3.1
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[similarity, freezer, cache], num_sanity_val_steps=0)
    trainer.fit(Classifier(net, 2), datamodule=dm)
    assert cache.record["used"] and cache.record["reused_similarity_pass"] and cache.record["units"] == 10
    net.eval()
    with torch.no_grad():
        expected = run_units(sequential_units(net)[:10], dm.prepare(dm.tensors["train"][0]))
    assert torch.allclose(dm.features["train"][:, 0], expected, atol=1e-4)


def test_the_cache_is_used_only_when_its_fill_saves_prefix_passes():
    from simfreeze.prefix import prefix_passes

    sizes = {"train": 100, "val": 25}
    assert prefix_passes(sizes, views=2, epochs=3, reused=False) == (225, 375)
    assert prefix_passes(sizes, views=2, epochs=1, reused=False) == (225, 125)  # too short: uncached
    assert prefix_passes(sizes, views=2, epochs=1, reused=True) == (125, 125)   # the similarity pass did view 0
    assert prefix_passes({**sizes, "test": 10}, views=1, epochs=2, reused=False) == (135, 260)
    assert prefix_passes(sizes, views=2, epochs=None, reused=False)[1] == float("inf")


def test_a_one_epoch_run_with_flips_trains_uncached(image_folder_with_test):
    _, _, record, dm, _ = fit(image_folder_with_test, cache=True, max_epochs=1)
    assert not record["used"] and "more than the" in record["reason"] and not dm.features


def test_the_cache_key_covers_weights_images_and_preparation():
    from simfreeze.prefix import prefix_key

    net = torchvision.models.resnet18(num_classes=2)
    prefix = sequential_units(net)[:5]
    images = [torch.zeros(4, 3, 8, 8, dtype=torch.uint8)]
    key = prefix_key(prefix, images, (32, True))
    assert prefix_key(prefix, images, (32, True)) == key
    assert prefix_key(prefix, images, (32, False)) != key                        # flips
    assert prefix_key(prefix, [images[0] + 1], (32, True)) != key                # images
    with torch.no_grad():
        net.layer1[0].bn1.running_mean += 1e-3                                   # a buffer
    assert prefix_key(prefix, images, (32, True)) != key


def test_a_changed_prefix_is_refilled_at_fit_start(image_folder_with_test):
    net, _, record, dm, trainer = fit(image_folder_with_test, cache=True)
    stale = dm.features["train"].clone()
    cache = next(c for c in trainer.callbacks if isinstance(c, PrefixCacheCallback))
    with torch.no_grad():  # what a checkpoint with other frozen weights would bring
        net.conv1.weight.mul_(1.5)
    trainer.ckpt_path = "restored.ckpt"  # as when fit(ckpt_path=...) restored it after setup
    cache.on_fit_start(trainer, trainer.lightning_module)
    net.eval()
    with torch.no_grad():
        expected = run_units(sequential_units(net)[:record["units"]], dm.prepare(dm.tensors["train"][0][:8]))
    assert not torch.allclose(stale[:8, 0], expected, atol=1e-4)
    assert torch.allclose(dm.features["train"][:8, 0], expected, atol=1e-4)

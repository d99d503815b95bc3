import lightning as L
import pytest
import torch
import torchvision

from simfreeze.data.datamodule import TaskDataModule
from simfreeze.method.freeze import freeze_leading, frozen_parameter_ids
from simfreeze.method.plan import FreezeSpec
from simfreeze.method.similarity import SimilarityTask
from simfreeze.networks.layers import layer_map
from simfreeze.networks.units import run_units, sequential_units
from simfreeze.runs.transfer import TransferSetup
from simfreeze.speed.prefix import deepest_prefixes, frozen_prefix_length, prefix_key, prefix_passes
from tests.helpers import sgd_classifier


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_units_compose_to_the_network(arch):
    torch.manual_seed(0)
    net = torchvision.models.get_model(arch, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(run_units(sequential_units(net), x), net(x), atol=1e-5)


@pytest.mark.parametrize("l_freeze, boundary", [(0, None), (3, "maxpool"), (37, "layer3.4"), (40, "layer3.5"),
                                                (45, "layer4.0"), (49, "layer4.2")])
def test_the_prefix_ends_at_the_last_fully_frozen_block(l_freeze, boundary):
    net = torchvision.models.resnet50(num_classes=2)
    freeze_leading(net, layer_map(net, "resnet50"), l_freeze)
    units = sequential_units(net)
    k = frozen_prefix_length(units)
    if l_freeze == 3:  # conv1 and layer1.0's first two convs: only the stem is whole
        assert units[k - 1][0] == "bn1"
    else:
        assert (units[k - 1][0] if k else None) == boundary


def fit(folder, cache: bool, budget_gb: float = 4.0, seed: int = 0, max_epochs: int = 2):
    L.seed_everything(seed, verbose=False)
    dm = TaskDataModule(root=str(folder), classes=["ant", "bee"], per_class=24, batch_size=8, eval_batch_size=8,
                        image_size=32)
    dm.setup()
    net = torchvision.models.resnet18(num_classes=2)
    setup = TransferSetup(dm, FreezeSpec("static", k=9), layer_map(net, "resnet18"), cache_budget_gb=budget_gb if cache else None)
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[setup], num_sanity_val_steps=0)
    trainer.fit(sgd_classifier(net), datamodule=dm)
    return net, float(trainer.callback_metrics["val/loss"]), setup.cache_record, dm, setup


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
    assert record["used"] and record["boundary"] == "layer2.1" and record["views"] == 2 and not record["reused_similarity_pass"]
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
    L.seed_everything(0, verbose=False)
    dm = TaskDataModule(root=str(image_folder_with_test), classes=["ant", "bee"], per_class=24, batch_size=8,
                        image_size=32)
    dm.setup()
    net = torchvision.models.resnet18(num_classes=2)
    layers = layer_map(net, "resnet18")
    spec = FreezeSpec("threshold", low=0.0, high=0.0)  # always L_total
    units = sequential_units(net)
    plans = [frozen_parameter_ids(net, layers, n) for n in spec.reachable(len(layers), layers.l_total)]
    assert deepest_prefixes(units, plans) == [10, 9]  # the two deepest prefixes: up to layer3.1, layer3.0
    similarity = SimilarityTask(dm.class_images, dm.prepare, ["ant"], ["bee"], "fc")
    setup = TransferSetup(dm, spec, layers, similarity, cache_budget_gb=4.0)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[setup], num_sanity_val_steps=0)
    trainer.fit(sgd_classifier(net), datamodule=dm)
    record = setup.cache_record
    assert record["used"] and record["reused_similarity_pass"] and record["units"] == 10
    assert setup.l_freeze == layers.l_total and setup.similarity.captured == {}  # handed over, then freed
    net.eval()
    with torch.no_grad():
        expected = run_units(sequential_units(net)[:10], dm.prepare(dm.tensors["train"][0]))
    assert torch.allclose(dm.features["train"][:, 0], expected, atol=1e-4)


def test_the_cache_is_used_only_when_its_fill_saves_prefix_passes():
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
    net, _, record, dm, setup = fit(image_folder_with_test, cache=True)
    stale = dm.features["train"].clone()
    with torch.no_grad():  # what a checkpoint with other frozen weights would bring
        net.conv1.weight.mul_(1.5)
    restored = type("Trainer", (), {"ckpt_path": "restored.ckpt", "precision": "32-true"})()  # as after fit(ckpt_path=...)
    setup.on_fit_start(restored, None)
    net.eval()
    with torch.no_grad():
        expected = run_units(sequential_units(net)[:record["units"]], dm.prepare(dm.tensors["train"][0][:8]))
    assert not torch.allclose(stale[:8, 0], expected, atol=1e-4)
    assert torch.allclose(dm.features["train"][:8, 0], expected, atol=1e-4)

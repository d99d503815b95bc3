"""bf16-true and 16-true (weights and activations in half precision, no autocast) through every path
that runs the network before Lightning converts it: the similarity pass, the prefix-cache fill, and
the batches made on the device after Lightning converted the (uint8) batch."""

from __future__ import annotations

import json

from tests.helpers import run_train


def test_true_half_precision_runs_the_source_the_similarity_pass_and_the_cache(cat_dog_folder, tmp_path):
    sweep = tmp_path / "sweep"
    run_train("-m", "trainer.precision=bf16-true,16-true", "arm=dynamic", "data.positive=dog",
              "data.classes=[bird,cat,dog]", "source.task={positive:cat}", "model.arch=resnet18",
              "data.image_size=null", "data.per_class=20", "trainer.max_epochs=2", "progress=lines",
              "trainer.accelerator=cpu", "+optimizer.eps=1e-4",  # 1e-8 is 0 in fp16 (a refusal for 16-true)
              f"data.root={cat_dog_folder}", f"source.cache_dir={tmp_path / 'sources'}",
              f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    for job, dtype in (("0", "bfloat16"), ("1", "float16")):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "ok" and results["precision"] == f"{'bf16' if job == '0' else '16'}-true"
        assert results["S"] is not None and results["best_val_acc"] is not None
        assert results["prefix_cache"]["used"] and results["prefix_cache"]["dtype"] == dtype
        assert results["source"]["best_val_acc"] is not None  # the source trained uncached in that precision


def test_16_mixed_on_a_cpu_runs_as_bf16_and_gets_its_fp32_convolutions(image_folder, tmp_path):
    """Lightning runs ``16-mixed`` as bf16 on a CPU: oneDNN's bf16 weight gradient of a convolution whose
    stride exceeds its input must be kept in fp32 then too. Asked for by the precision's name only, it was
    not, and layer4.0.conv1's weights became NaN in about 1 run of 6 (from memory oneDNN never wrote)."""
    from omegaconf import OmegaConf

    from simfreeze.runs.build import build_run, prepare_sources, resolve
    from simfreeze.runs.fit import fit
    from tests.helpers import compose_config

    cfg = OmegaConf.to_container(compose_config(
        ["data.classes=[ant,bee]", "model.arch=resnet18", "data.image_size=null", "data.per_class=20",
         "trainer.precision=16-mixed", "trainer.accelerator=cpu", f"data.root={image_folder}", "logger=none"]), resolve=True)
    plan = resolve(cfg, tmp_path / "run")
    run = build_run(plan, prepare_sources(plan, train_source=fit))
    assert str(run.trainer.precision) == "bf16-mixed"  # set above; Lightning's mapping on any CPU (emulated on AVX2)
    assert run.fp32_convs == ["layer4.0.conv1", "layer4.0.downsample.0"]  # 16×16 images: layer4 sees 1×1 maps

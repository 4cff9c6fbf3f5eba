"""Training items read from the preprocessed cache (memory-mapped, copied out per item)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl3d_cli.data.cache import Cache


class CacheCases(Dataset):
    """Cases of a cache as training items.

    Item: the image (C, D, H, W) in the cache dtype (float16/float32), or with ``labels`` the pair
    (image, label (D, H, W) uint8 class indices).
    """

    def __init__(self, cache: Cache, case_ids: list[str], *, labels: bool = False) -> None:
        self.cache, self.case_ids, self.labels = cache, case_ids, labels

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        case_id = self.case_ids[i]
        image = torch.from_numpy(np.array(self.cache.image(case_id)))  # copy out of the memory map
        if not self.labels:
            return image
        return image, torch.from_numpy(self.cache.label(case_id))

"""The detector: the only package that imports mmdet, mmcv and mmengine.

``extractor``: Faster R-CNN ResNet C4 as a region feature extractor (``RegionFeatureExtractor``);
``parts``: its building blocks (the mmdet model dicts, Caffe anchors, the CPU RoIPool, the
frozen BatchNorm). Checkpoint reading and conversion, which need no mmdet, are in
``vlbert.model.detector.convert``.
"""

from vlbert.model.detector.extractor import (HEAD_PREFIXES, RegionFeatureExtractor, apply_region_masks,
                                             zero_masked_regions)

__all__ = ["HEAD_PREFIXES", "RegionFeatureExtractor", "apply_region_masks", "zero_masked_regions"]

"""The colour probe: can the model fill in a masked colour word, and does it need the image?

For every colour word in a caption, one query masks exactly that word (all its
pieces) and nothing else: no other MLM masking, no masked RoIs. The model's MLM
prediction over the whole vocabulary must equal the colour. The same queries
are asked again with the image blanked; a model that uses the image falls to
chance there, one that guesses from the text does not. Blanked means: on pixels,
every pixel set to 0 (the detector then sees a black image); on stored region
features (``detector.source: features``), every box feature set to 0, so the
whole-image region, their mean, is 0 too. Either way the boxes' geometry stays and
nothing of the image's appearance is left.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import torch

from vlbert.batch import IGNORE_INDEX, CaptionBatch, PretrainBatch


@dataclass
class ProbeResult:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def colour_queries(captions: CaptionBatch, colour_ids: torch.Tensor, mask_id: int, blank: bool) -> CaptionBatch | None:
    """One query per colour token: a copy of its sample with only that token masked.

    captions: an unmasked batch (``input_ids`` hold the original words).
    colour_ids: long [K], the vocabulary ids of the colour words.
    Returns a batch of Q queries (Q = colour tokens in the batch) or None when
    there are none. ``blank`` zeroes every pixel of the images, or every stored box
    feature [Q, R, D] when the batch carries features instead of images.
    """
    hits = torch.isin(captions.input_ids, colour_ids.to(captions.input_ids.device)) & captions.attention_mask
    b, t = hits.nonzero(as_tuple=True)
    if b.numel() == 0:
        return None
    q = torch.arange(b.numel(), device=b.device)
    fields = {f.name: getattr(captions, f.name) for f in dataclasses.fields(captions)}
    queries = {k: (v[b] if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
    original = queries["input_ids"][q, t].clone()
    queries["input_ids"][q, t] = mask_id
    labels = torch.full_like(queries["input_ids"], IGNORE_INDEX)
    labels[q, t] = original
    queries["mlm_labels"] = labels
    queries["roi_masked"] = torch.zeros_like(queries["roi_masked"])
    queries["roi_labels_mask"] = torch.zeros_like(queries["roi_labels_mask"])
    if blank:
        for name in ("images", "features"):
            if queries[name] is not None:
                queries[name] = torch.zeros_like(queries[name])
    return CaptionBatch(**queries)


@torch.no_grad()
def colour_fill_accuracy(
    model: torch.nn.Module,
    batches: Iterable[PretrainBatch],
    colour_ids: torch.Tensor,
    mask_id: int,
    device: torch.device | str = "cpu",
) -> dict[str, ProbeResult]:
    """Accuracy at filling in masked colour words, with the image and with it blanked.

    ``model`` is a VLBertForPretraining (its forward reports MLM accuracy and
    the number of labelled tokens); ``batches`` hold unmasked captions.
    Returns {"with_image": ..., "blanked": ...}.
    """
    was_training = model.training
    model.eval()
    results = {"with_image": ProbeResult(), "blanked": ProbeResult()}
    try:
        for batch in batches:
            if batch.captions is None:
                continue
            captions = batch.captions.to(device)
            for name, blank in (("with_image", False), ("blanked", True)):
                queries = colour_queries(captions, colour_ids, mask_id, blank)
                if queries is None:
                    continue
                out = model(PretrainBatch(captions=queries))
                count = int(out.mlm_caption_count)
                results[name].correct += round(float(out.mlm_caption_acc) * count)
                results[name].total += count
    finally:
        model.train(was_training)
    return results

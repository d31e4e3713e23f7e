"""Forward + backward of the VL-BERT encoder vs Hugging Face VisualBERT, same process, CPU.

Both get the same shapes: B samples of T caption tokens (all real) and R regions
with 2048-d visual features given as tensors (the detector is excluded from
both), float32, train mode (dropout on). Two comparisons:

- pretraining step: ours = VLBertModel + tied MLM head on the masked tokens;
  baseline = ``VisualBertForPreTraining`` with MLM labels (its head runs over every
  position, as HF's pretraining models do).
- encoder only: ``VLBertModel`` vs ``VisualBertModel``, loss = mean of squares of
  the last hidden states.

Each iteration times all four runs back to back, alternating which model goes
first, so that load from other processes hits both alike. ratio = median over
iterations of baseline time / ours time (> 1: ours faster); the ratio of the
fastest runs is printed too.

    python bench/model_step.py                 # BASE: hidden 768, 12 layers, 12 heads
    python bench/model_step.py --tiny          # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import VisualBertConfig, VisualBertForPreTraining

from vlbert.config import DetectorConfig, ModelConfig
from vlbert.batch import IGNORE_INDEX
from vlbert.model.embeddings import VisualInputs
from vlbert.model.pretraining import VLBertForPretraining

VISUAL_DIM = 2048


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32, help="caption tokens per sample, [CLS] and [SEP] included")
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--iters", type=int, default=6, help="timed iterations per model and comparison")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mlm-prob", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny sizes that run in seconds")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.tokens, args.regions, args.layers = 2, 8, 4, 2
        args.hidden, args.heads, args.vocab, args.iters, args.warmup = 64, 2, 500, 2, 1
    return args


def make_inputs(args):
    g = torch.Generator().manual_seed(args.seed)
    B, T, R = args.batch, args.tokens, args.regions
    ids = torch.randint(1000 % args.vocab, args.vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    chosen = torch.rand(B, T, generator=g) < args.mlm_prob
    chosen[:, 1] = True  # at least one per sample
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    feats = torch.randn(B, R, VISUAL_DIM, generator=g).relu()
    xy = torch.rand(B, R, 2, generator=g) * 300
    wh = torch.rand(B, R, 2, generator=g) * 300 + 10
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, 0] = torch.tensor([0.0, 0.0, 640.0, 480.0])
    sizes = torch.tensor([[480, 640]]).expand(B, 2)
    return ids, mask, labels, feats, boxes, sizes


def build_ours(args) -> VLBertForPretraining:
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      intermediate_size=4 * args.hidden)
    # A ResNet-50 C4 detector gives 2048-d features; it is built because the model holds one, never run here.
    model = VLBertForPretraining(cfg, DetectorConfig(depth=50, num_classes=2))
    assert model.detector.out_channels == VISUAL_DIM
    with torch.no_grad():  # a trained model's image path is live; at init it is gated to 0
        model.vlbert.embeddings.visual_layer_norm.weight.fill_(1.0)
    return model.train()


def build_baseline(args):
    config = VisualBertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                              num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                              visual_embedding_dim=VISUAL_DIM)
    return VisualBertForPreTraining(config).train()


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ids, mask, labels, feats, boxes, sizes = make_inputs(args)
    B, T, R = args.batch, args.tokens, args.regions
    ours, base = build_ours(args), build_baseline(args)
    visual = VisualInputs(feats, boxes, sizes, torch.ones(B, R, dtype=torch.bool), torch.zeros(B, R, dtype=torch.bool))
    base_kwargs = dict(
        input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids), visual_embeds=feats,
        visual_attention_mask=torch.ones(B, R, dtype=torch.long),
        visual_token_type_ids=torch.ones(B, R, dtype=torch.long),
    )
    base_labels = torch.cat([labels, torch.full((B, R), IGNORE_INDEX)], 1)

    def ours_step():
        out = ours.vlbert(ids, mask, visual)
        ours.mlm_loss(out.last_hidden_state, out.layout.text_index, labels)[0].backward()

    def base_step():
        base(**base_kwargs, labels=base_labels).loss.backward()

    def ours_encoder():
        ours.vlbert(ids, mask, visual).last_hidden_state.square().mean().backward()

    def base_encoder():
        base.visual_bert(**base_kwargs).last_hidden_state.square().mean().backward()

    # Every iteration runs all four, baseline and ours alternating first, so that a change of
    # machine load hits each pair alike; a pair's ratio compares runs seconds apart.
    variants = {"pretraining": ((ours, ours_step), (base, base_step)),
                "encoder": ((ours, ours_encoder), (base, base_encoder))}
    times = {(k, who): [] for k in variants for who in ("ours", "baseline")}
    for i in range(args.warmup + args.iters):
        for key, pair in variants.items():
            order = (("ours", pair[0]), ("baseline", pair[1]))
            for who, (model, fn) in order if i % 2 == 0 else order[::-1]:
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                fn()
                if i >= args.warmup:
                    times[key, who].append(time.perf_counter() - t0)
    results = {}
    for key, title in (("pretraining", "pretraining step"), ("encoder", "encoder only")):
        t_ours, t_base = times[key, "ours"], times[key, "baseline"]
        ratio = statistics.median(b / o for o, b in zip(t_ours, t_base))
        results[f"{key}_ours_s"], results[f"{key}_baseline_s"] = statistics.median(t_ours), statistics.median(t_base)
        results[f"{key}_ratio"] = ratio
        results[f"{key}_ratio_of_min"] = min(t_base) / min(t_ours)
        print(f"{title:17s} ours {results[f'{key}_ours_s'] * 1e3:9.1f} ms   "
              f"VisualBERT {results[f'{key}_baseline_s'] * 1e3:9.1f} ms   ratio {ratio:.2f}x "
              f"(ratio of fastest runs {results[f'{key}_ratio_of_min']:.2f}x)")
    print(f"(batch {B}, tokens {T}, regions {R}, hidden {args.hidden}, layers {args.layers}, heads {args.heads}, "
          f"float32, {args.threads} threads, {args.iters} timed iterations: median times, median of paired ratios; "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f})")
    return results

if __name__ == "__main__":
    main()

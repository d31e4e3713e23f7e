"""The learning-rate schedule: linear warmup, then linear decay to 0 (BERT / VL-BERT)."""

from __future__ import annotations


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    0 -> 1 linearly over ``warmup_steps`` (step 0 has factor 0, as in Hugging
    Face's ``get_linear_schedule_with_warmup``), then 1 -> 0 linearly at
    ``total_steps``; 0 after that.
    """
    if step < warmup_steps:
        return step / warmup_steps
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - warmup_steps))

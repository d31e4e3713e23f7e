"""The learning-rate schedule: linear warmup, then linear decay to 0 (BERT / VL-BERT), optionally
after holding the peak (warmup-stable-decay); or linear warmup, then steps down by a factor at
fixed points of the run (VL-BERT's VCR recipe: x0.1 at epochs 14 and 18 of 20)."""

from __future__ import annotations


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int, decay_steps: int = 0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    0 -> 1 linearly over ``warmup_steps`` (step 0 has factor 0, as in Hugging
    Face's ``get_linear_schedule_with_warmup``), then 1 -> 0 linearly at
    ``total_steps``; 0 after that. The decay spans every step after the warmup
    when ``decay_steps`` is 0 (or more than those steps); otherwise the factor
    holds at 1 until the last ``decay_steps`` steps and decays over those.
    """
    if step < warmup_steps:
        return step / warmup_steps
    after_warmup = max(1, total_steps - warmup_steps)
    decay = decay_steps if 0 < decay_steps < after_warmup else after_warmup
    return max(0.0, min(1.0, (total_steps - step) / decay))


def warmup_step_decay(step: int, warmup_steps: int, total_steps: int, decay_at: list[float],
                      factor: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): 0 -> 1 linearly
    over ``warmup_steps``, then ``factor`` to the power of the number of points of ``decay_at``
    (fractions of ``total_steps``) already reached."""
    if step < warmup_steps:
        return step / warmup_steps
    return factor ** sum(step >= round(f * total_steps) for f in decay_at)


def lr_factor(step: int, optim) -> float:
    """The schedule an ``OptimConfig`` names: step decay when ``step_decay_at`` lists points,
    else linear decay."""
    if optim.step_decay_at:
        return warmup_step_decay(step, optim.warmup_steps, optim.total_steps, optim.step_decay_at,
                                 optim.step_decay_factor)
    return warmup_linear_decay(step, optim.warmup_steps, optim.total_steps, optim.decay_steps)

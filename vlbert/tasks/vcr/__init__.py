"""VCR fine-tuning: the release's jsonl + metadata, object-reference tokens, region masks, 4-choice scoring."""

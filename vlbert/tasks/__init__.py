"""Downstream tasks: VQA v2 and RefCOCO+ fine-tuning and evaluation."""

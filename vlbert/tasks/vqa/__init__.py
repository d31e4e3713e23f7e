"""VQA v2 fine-tuning: answers, data, the official metric, the model head and the task."""

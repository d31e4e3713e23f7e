"""RefCOCO+ fine-tuning: expressions and boxes, the region-scoring head and the task."""

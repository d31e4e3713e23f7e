"""vlbert: pretrain VL-BERT with a jointly trained MMDetection Faster R-CNN, DeepSpeed and MLflow."""

__version__ = "0.1.0"

"""Evaluation apart from the models: the COCO and VOC metrics (metrics.py) and the pictures of detections and
precision-recall curves (visualization.py)."""

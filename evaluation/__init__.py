"""Evaluation apart from the models: the validation metrics (detection_metrics.py: the COCO suite of coco.py and
VOC AP of voc.py, over the flat states of flat_states.py) and the pictures of detections and precision-recall
curves (visualization.py)."""

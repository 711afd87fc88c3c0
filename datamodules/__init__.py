"""LightningDataModules that feed detectors ``DetectionBatch``es: shapes (built in); VOC and COCO to come."""

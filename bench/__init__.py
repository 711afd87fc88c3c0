"""Side-by-side speed measurements against torchvision's detectors: ``python -m bench``."""

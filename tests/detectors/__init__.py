"""Tests of detectors/."""

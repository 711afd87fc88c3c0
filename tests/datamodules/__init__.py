"""Tests of datamodules/."""

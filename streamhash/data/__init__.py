"""Datasets and image folders that feed the producer and the eval harness."""

"""Tests of the store package (daemon/store/)."""

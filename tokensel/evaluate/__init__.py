"""Evaluation: leave-one-out full-ranking metrics and downstream recommenders."""

"""Training loops: stage 1 (InfoNCE pretraining of f and g) and stage 2 (policy learning)."""

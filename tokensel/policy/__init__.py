"""The learned token-selection policy: the Q-K head, its bundle format, and the scoring strategies."""

"""Which tokens to keep: the pure budget rule (rule.py) and the strategies that score chunks (strategies.py)."""

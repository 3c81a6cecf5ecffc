"""Models: the item LLM f, the user model g (the policy head lives in tokensel.policy)."""

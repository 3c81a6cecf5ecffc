"""Models: the item LLM f and its top readout, the user model g, used by the policy (tokensel.policy) and the recommenders."""

"""Models: the item LLM f and its top readout, the user model g, the policy head, and the bundle that saves them."""

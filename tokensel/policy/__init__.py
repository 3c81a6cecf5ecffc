"""The policy: the head that scores chunks and the bundle that ships it with its item LLM and user model."""

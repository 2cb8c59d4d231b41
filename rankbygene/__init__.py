"""rankbygene."""

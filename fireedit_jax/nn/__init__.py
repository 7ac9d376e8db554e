"""Building blocks shared by every network."""

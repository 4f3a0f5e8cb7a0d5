"""Tables (paper vs ours) and figures of the reproduction."""

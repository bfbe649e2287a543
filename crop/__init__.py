"""Step 4 of the flow: cut each face to a square crop, label it, give it a split."""

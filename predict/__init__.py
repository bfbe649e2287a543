"""Step 6 of the flow: name the faces of an image with the current model."""

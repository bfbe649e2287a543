"""Step 3 of the flow: find the faces in a stored illustration."""

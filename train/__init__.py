"""Step 5 of the flow: train the classifier on labelled crops, keep the model registry."""

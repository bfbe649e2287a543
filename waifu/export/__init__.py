"""Taking a collection out: the dataset (dataset.py) and the model (model.py) in formats other tools read."""

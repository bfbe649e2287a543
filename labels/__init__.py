"""Labels: the rules that label and split a crop (rules), a person's labels and undo (manual), and the labels
inferred from a post's tags and the doubt about tag labels (weak). Below train: a model's outputs come in as
arrays or callables, never as an import of train."""

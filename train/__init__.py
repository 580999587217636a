"""`python -m train`: training, evaluation, cross-validation and statistics for xnorconv models on skin-lesion
image folders (paper 000's BinaryDNet53 recipe by default). Run from the repository root; see docs/training.md."""

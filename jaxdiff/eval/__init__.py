"""Evaluation of samples and models.

  metrics       FD, improved precision/recall, Inception Score over feature arrays.
  digits        the built-in feature network for the 8x8 digits (weights: digits_features.npz;
                trained by `python -m jaxdiff.eval.train_digits`).
  inception     the FID Inception-v3, weights from a local file.
  quality       features, real data, bits/dim and NFE counts for a trained model.
  plots         quality-vs-NFE tables and figures, training curves.
"""

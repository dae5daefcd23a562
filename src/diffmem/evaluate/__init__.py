"""Evaluation of generated samples: metrics (pixel L2, LPIPS), nearest neighbours, the
memorized / spurious / generalized classifier, the two-model agreement, and the analysis stages."""

"""Where to split (`ediff-advise`): cheap signals, measured at a trained node, that say whether
and where its σ band gains from children, before a cluster is spent on them.

- intervals.py: contiguous clustering of ordered σ bins by dynamic programming;
- optimal.py: the closed-form optimal denoiser of a data sample and its similarity across σ
  (Zhang et al., CVPR 2024);
- affinity.py: gradient-cosine task affinity between σ bins (Go et al., NeurIPS 2023);
- probe.py: short training probes: each bin's headroom (a wider net) and the measured
  negative-transfer gap (a specialist against the shared model, equal steps);
- advice.py: candidate splits, predicted gain, the recommendation; picture.py: the matrix drawn
  with the tree's boundaries.
"""

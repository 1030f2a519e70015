"""jaxdeblur: self-supervised blind motion deblurring in JAX/Flax.

Two CVPR 2023 methods, reimplemented functionally:

* UFPNet (Fang et al.): a RealNVP flow prior over 19x19 motion kernels, a kernel-estimation
  network trained by re-blurring, and a kernel-attention NAFNet.
* Deep EM (Li et al.): Monte Carlo EM with Langevin E-steps over a deep image prior and a
  multi-head kernel network on an efficient-filter-flow blur model.

Conventions: images are float32 in [0, 1] with layout ``(H, W, C)`` (``(B, H, W, C)`` for a
batch); kernels are ``(k, k)`` with odd ``k``; every blur is a cross-correlation.
"""

__version__ = "0.1.0"

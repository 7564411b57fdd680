"""Our Triton kernels: ``@triton.jit`` code, launch heuristics and launchers.

* :mod:`.common`: small shared jit helpers (sequence lookup, score modifiers, the
  online-softmax step) so a fix lands in every kernel;
* :mod:`.unified`: the unified paged-attention kernel (2D and split-KV 3D);
* :mod:`.reduce`: the merge of split-KV segments;
* :mod:`.stage`: a long prefill's keys gathered into 128-slot 16-bit blocks (the staged
  prefill, read with descriptor loads);
* :mod:`.heuristics`: pure-Python launch decisions from a problem and the SM count
  (importable without Triton);
* :mod:`.launch`: Python launchers computing grids and meta-parameters.

Importing this package does no work and does not import Triton; the modules holding
kernels import it when they are imported (the backend does that lazily).
"""

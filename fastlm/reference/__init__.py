"""Plain PyTorch implementations: the CPU fallback, the test oracle, the benchmark baseline.

Written for clarity and computed in at least fp32 (pass fp64 tensors for an fp64 oracle);
outputs are cast back to the input dtype. One module per op; import from the module
(``from fastlm.reference import layer_norm as ref_ln``).
"""

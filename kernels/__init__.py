"""bt_fast.kernels: the Barlow Twins loss, a torch reference and Triton kernels."""

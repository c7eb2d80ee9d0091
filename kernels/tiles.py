"""Tile sizes of the Triton kernels, apart from the kernels so that the cost model
(cost.py) reads the very numbers the kernels launch with, without importing triton.

dense.py: a program computes one [DENSE_BLOCK_D, DENSE_BLOCK_D] tile of c, walking
the N rows DENSE_BLOCK_N at a time; 64 x 64 fp32 accumulators fit a GPU SM's
registers, and 32 rows keep the two [32, 64] operand tiles in shared memory.
colnorm.py: a program owns COLNORM_BLOCK_D columns and walks N in COLNORM_BLOCK_N rows.
"""

DENSE_BLOCK_N = 32
DENSE_BLOCK_D = 64
COLNORM_BLOCK_N = 64
COLNORM_BLOCK_D = 64

"""Reference codec and Triton kernels. Depends on torch and triton only."""

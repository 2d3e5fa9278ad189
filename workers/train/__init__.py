"""Training: the loop (``trainer``) and the non-finite guard with its checks of weights, buffers and learning rate
(``numerics``)."""

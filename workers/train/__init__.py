"""Training: the loop (``trainer``), the parts it trains with, built in one piece (``parts``), where a start
begins — resume or ``train.init_from`` (``start``), the step and the state a checkpoint holds (``progress``), and the
non-finite guard with its checks of weights, buffers and learning rate (``numerics``), and the ``profile`` window
(``profiling``)."""

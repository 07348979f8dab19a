"""Training: the loop (`loop.train`), one micro-batch's losses (`objective_step`) and the metrics log."""

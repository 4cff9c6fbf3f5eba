"""The only place that touches devices, precision, seeds, threads, torch.distributed and progress display."""

"""Training machinery shared by pretraining and fine-tuning: run folders, batches, schedules, resume, signals."""

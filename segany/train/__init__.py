"""Training and fine-tuning: feature caches, prompt simulation, losses, the trainer."""

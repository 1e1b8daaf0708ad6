"""A Flower app: federated LoRA fine-tuning with compeft-rs compressed updates."""

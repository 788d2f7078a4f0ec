"""Pictures of what a trained model does: routing maps."""

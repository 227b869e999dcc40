"""daae: decorrelated semi-supervised adversarial autoencoders."""
__version__ = "0.1.0"

"""Time-frequency images of signal windows."""

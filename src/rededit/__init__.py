"""rededit: a reproduction of the FireRed-Image-Edit-1.0 training system."""

__version__ = "0.1.0"

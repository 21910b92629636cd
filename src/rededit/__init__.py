"""rededit: a reproduction of the FireRed-Image-Edit-1.0 training system."""

from rededit.utils.offline import set_offline_switches

# Before anything imports huggingface_hub (it reads these at import): nothing downloads at run time.
set_offline_switches()

__version__ = "0.1.0"

"""tli: Targeted Lexical Injection, with honest measurement.

Shape letters used across the package (fixed once, as in nanoGPT):
    B batch (strings or pairs), T tokens, L layers, D hidden size, V vocabulary, C candidates.
"""

from tli.errors import TLIError

__version__ = "0.1.0"
__all__ = ["TLIError", "__version__"]

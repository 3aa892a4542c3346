"""PEFT methods, one file each: the method's config class and its per-module functions, registered together.

``jpeft.methods.base`` defines the protocol and holds the table; importing this package imports every method
file, which fills it. Look methods up through :mod:`jpeft.registry`.
"""

from jpeft.methods import adalora  # noqa: F401
from jpeft.methods import base  # noqa: F401
from jpeft.methods import beft  # noqa: F401
from jpeft.methods import boft  # noqa: F401
from jpeft.methods import fourierft  # noqa: F401
from jpeft.methods import hra  # noqa: F401
from jpeft.methods import ia3  # noqa: F401
from jpeft.methods import lily  # noqa: F401
from jpeft.methods import ln_tuning  # noqa: F401
from jpeft.methods import loha  # noqa: F401
from jpeft.methods import lokr  # noqa: F401
from jpeft.methods import lora  # noqa: F401
from jpeft.methods import miss  # noqa: F401
from jpeft.methods import oft  # noqa: F401
from jpeft.methods import vera  # noqa: F401

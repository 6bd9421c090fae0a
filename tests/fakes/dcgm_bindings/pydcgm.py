"""Fake of DCGM's `pydcgm` module (mirrors DCGM 4.6.0, testing/python3/pydcgm.py).

Like the real module it brings the wrapper classes into one namespace and defines DcgmException.
Of the wrappers only DcgmHandle is mirrored (DcgmGroup, DcgmFieldGroup, DcgmSystem, DcgmStatus and
DcgmLogging are not: the exporter calls dcgm_agent directly for groups, watches and health).
"""

from DcgmHandle import *  # noqa: E402,F401,F403


class DcgmException(Exception):
    pass

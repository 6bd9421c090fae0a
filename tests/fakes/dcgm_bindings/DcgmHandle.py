"""Fake of DCGM's `DcgmHandle` module (mirrors DCGM 4.6.0, testing/python3/DcgmHandle.py).

`DcgmHandle(handle=None, ipAddress=None, opMode=DCGM_OPERATION_MODE_AUTO, persistAfterDisconnect=False,
unixSocketPath=None, timeoutMs=0, decoratorHandle=None)`: with neither ipAddress nor unixSocketPath it
starts an embedded host engine (dcgmStartEmbedded), otherwise it connects with dcgmConnect_v3 to
"tcp://<ipAddress>" or "unix://<unixSocketPath>". `.handle` is what dcgm_agent functions take;
`Shutdown()` stops the embedded engine or disconnects. `GetSystem()` (DcgmSystem) is not mirrored.
"""

import threading

import dcgm_agent
import dcgm_structs


class DcgmHandle:
    handleLock = threading.Lock()
    handles = []

    def __init__(self, handle=None, ipAddress=None, opMode=dcgm_structs.DCGM_OPERATION_MODE_AUTO,
                 persistAfterDisconnect=False, unixSocketPath=None, timeoutMs=0, decoratorHandle=None):
        self._handleCreated = False
        self._persistAfterDisconnect = persistAfterDisconnect
        if handle is not None:
            self.handle = handle
            self._fromDecorator = True if decoratorHandle is None else decoratorHandle
            return
        self._fromDecorator = False if decoratorHandle is None else decoratorHandle
        self._ipAddress = ipAddress
        if ipAddress is not None and unixSocketPath is not None:
            raise dcgm_structs.dcgmExceptionClass(dcgm_structs.DCGM_ST_BADPARAM)

        dcgm_structs._dcgmInit()
        dcgm_agent.dcgmInit()

        if ipAddress is None and unixSocketPath is None:
            self.handle = dcgm_agent.dcgmStartEmbedded(opMode)
            self.isEmbedded = True
        else:
            params = dcgm_structs.c_dcgmConnectV3Params_v1()
            params.version = dcgm_structs.c_dcgmConnectV3Params_version
            params.timeoutMs = timeoutMs
            params.persistAfterDisconnect = 1 if persistAfterDisconnect else 0
            address = "tcp://" + ipAddress if ipAddress is not None else "unix://" + unixSocketPath
            self.handle = dcgm_agent.dcgmConnect_v3(address, params)
            self.isEmbedded = False
        self._handleCreated = True
        if not self._fromDecorator:
            with DcgmHandle.handleLock:
                DcgmHandle.handles.append(self)

    @classmethod
    def reset(cls):
        with cls.handleLock:
            cleanup, cls.handles = cls.handles[:], []
        for handle in cleanup:
            if handle._handleCreated:
                handle.Shutdown()

    def __del__(self):
        if getattr(self, "_handleCreated", False):
            self.Shutdown()

    def __StopDcgm__(self):
        if self.isEmbedded:
            dcgm_agent.dcgmStopEmbedded(self.handle)
        else:
            dcgm_agent.dcgmDisconnect(self.handle)

    def FromDecorator(self):
        return self._fromDecorator

    def Shutdown(self):
        if not self._handleCreated:
            return
        try:
            self.__StopDcgm__()
        except AttributeError:
            pass
        self._handleCreated = False
        self.handle = None

    @staticmethod
    def Unload():
        dcgm_agent.dcgmShutdown()

    def GetIpAddress(self):
        return self._ipAddress

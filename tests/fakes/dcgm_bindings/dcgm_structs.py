"""Fake of DCGM's `dcgm_structs` module (mirrors DCGM 4.6.0, testing/python3/dcgm_structs.py).

Same names for what the exporter and its tests use: the DCGM_ST_* return codes, `DCGMError` with one
generated subclass per code (`DCGMError_ConnectionNotValid`, ...) and `dcgmExceptionClass`, the
health-watch and health-result constants, NvLink link states, fabric-manager states, and ctypes
structures with the same field names and layouts (`c_dcgmFieldValue_v1`, `c_dcgmHealthResponse_v5`,
`c_dcgmDeviceAttributes_v3`, `c_dcgmNvLinkStatus_v5`, ...). Like the real module, reading a `char[]`
field of a structure returns `str`, not `bytes`.

Not mirrored: the C library. `_LoadDcgmLibrary` / `_dcgmInit` only consult the fake engine
(`dcgm_fake_engine.ENGINE.library_missing`), and `_dcgmGetFunctionPointer` finds no function;
`dcgm_agent` calls the fake engine directly. Structures the exporter never sees (diagnostics,
policy, profiling, vGPU, MIG hierarchy, ...) are left out.
"""

import string
import sys
import threading
from ctypes import (
    Structure, Union, c_byte, c_char, c_double, c_int, c_int64, c_short, c_uint, c_uint16,
    c_uint32, c_uint8, c_ushort, c_void_p, sizeof,
)
from inspect import isclass

import dcgmvalue  # noqa: F401  (the real module imports it too)

DCGM_MAX_STR_LENGTH = 256
DCGM_MAX_NUM_DEVICES = 32
DCGM_MAX_NUM_SWITCHES = 12
DCGM_NVLINK_MAX_LINKS_PER_GPU = 36
DCGM_NVLINK_MAX_LINKS_PER_GPU_LEGACY1 = 6
DCGM_NVLINK_MAX_LINKS_PER_GPU_LEGACY2 = 12
DCGM_NVLINK_MAX_LINKS_PER_GPU_LEGACY3 = 18
DCGM_NVLINK_MAX_LINKS_PER_NVSWITCH_V1 = 36
DCGM_NVLINK_MAX_LINKS_PER_NVSWITCH = 256
DCGM_MAX_CLOCKS = 256
DCGM_MAX_NUM_GROUPS = 64
DCGM_MAX_BLOB_LENGTH = 4096
DCGM_GROUP_MAX_ENTITIES_V2 = 1024
DCGM_MAX_NUM_FIELD_GROUPS = 64
DCGM_MAX_FIELD_IDS_PER_FIELD_GROUP = 128

DCGM_OPERATION_MODE_AUTO = 1
DCGM_OPERATION_MODE_MANUAL = 2

# Return codes (dcgm_structs.h dcgmReturn_t).
DCGM_ST_OK = 0
DCGM_ST_BADPARAM = -1
DCGM_ST_GENERIC_ERROR = -3
DCGM_ST_MEMORY = -4
DCGM_ST_NOT_CONFIGURED = -5
DCGM_ST_NOT_SUPPORTED = -6
DCGM_ST_INIT_ERROR = -7
DCGM_ST_NVML_ERROR = -8
DCGM_ST_PENDING = -9
DCGM_ST_UNINITIALIZED = -10
DCGM_ST_TIMEOUT = -11
DCGM_ST_VER_MISMATCH = -12
DCGM_ST_UNKNOWN_FIELD = -13
DCGM_ST_NO_DATA = -14
DCGM_ST_STALE_DATA = -15
DCGM_ST_NOT_WATCHED = -16
DCGM_ST_NO_PERMISSION = -17
DCGM_ST_GPU_IS_LOST = -18
DCGM_ST_RESET_REQUIRED = -19
DCGM_ST_FUNCTION_NOT_FOUND = -20
DCGM_ST_CONNECTION_NOT_VALID = -21
DCGM_ST_GPU_NOT_SUPPORTED = -22
DCGM_ST_GROUP_INCOMPATIBLE = -23
DCGM_ST_MAX_LIMIT = -24
DCGM_ST_LIBRARY_NOT_FOUND = -25
DCGM_ST_DUPLICATE_KEY = -26
DCGM_ST_GPU_IN_SYNC_BOOST_GROUP = -27
DCGM_ST_GPU_NOT_IN_SYNC_BOOST_GROUP = -28
DCGM_ST_REQUIRES_ROOT = -29
DCGM_ST_NVVS_ERROR = -30
DCGM_ST_INSUFFICIENT_SIZE = -31
DCGM_ST_FIELD_UNSUPPORTED_BY_API = -32
DCGM_ST_MODULE_NOT_LOADED = -33
DCGM_ST_IN_USE = -34
DCGM_ST_GROUP_IS_EMPTY = -35
DCGM_ST_PROFILING_NOT_SUPPORTED = -36
DCGM_ST_PROFILING_LIBRARY_ERROR = -37
DCGM_ST_PROFILING_MULTI_PASS = -38
DCGM_ST_DIAG_ALREADY_RUNNING = -39
DCGM_ST_DIAG_BAD_JSON = -40
DCGM_ST_DIAG_BAD_LAUNCH = -41
DCGM_ST_DIAG_UNUSED = -42
DCGM_ST_DIAG_THRESHOLD_EXCEEDED = -43
DCGM_ST_INSUFFICIENT_DRIVER_VERSION = -44
DCGM_ST_INSTANCE_NOT_FOUND = -45
DCGM_ST_COMPUTE_INSTANCE_NOT_FOUND = -46
DCGM_ST_CHILD_NOT_KILLED = -47
DCGM_ST_3RD_PARTY_LIBRARY_ERROR = -48
DCGM_ST_INSUFFICIENT_RESOURCES = -49
DCGM_ST_PLUGIN_EXCEPTION = -50
DCGM_ST_NVVS_ISOLATE_ERROR = -51
DCGM_ST_NVVS_BINARY_NOT_FOUND = -52
DCGM_ST_NVVS_KILLED = -53
DCGM_ST_PAUSED = -54
DCGM_ST_ALREADY_INITIALIZED = -55
DCGM_ST_NVML_NOT_LOADED = -56
DCGM_ST_NVML_DRIVER_TIMEOUT = -57
DCGM_ST_NVVS_NO_AVAILABLE_TEST = -58
DCGM_ST_MNDIAG_CONNECTION_NOT_AVAILABLE = -59
DCGM_ST_MNDIAG_CONNECTION_UNAUTHORIZED = -60
DCGM_ST_REMOTE_SSH_CONNECTION_FAILED = -61
DCGM_ST_CHILD_SPAWN_FAILED = -62
DCGM_ST_FILE_IO_ERROR = -63
DCGM_ST_CHILD_SIGNAL_RECEIVED = -64
DCGM_ST_CALLER_ALREADY_STOPPED = -65
DCGM_ST_DIAG_STOPPED = -66
DCGM_ST_GPUS_DETACHED = -67

DCGM_GROUP_DEFAULT = 0
DCGM_GROUP_EMPTY = 1
DCGM_GROUP_DEFAULT_NVSWITCHES = 2
DCGM_GROUP_DEFAULT_INSTANCES = 3
DCGM_GROUP_DEFAULT_COMPUTE_INSTANCES = 4
DCGM_GROUP_DEFAULT_ENTITIES = 5
DCGM_GROUP_ALL_GPUS = 0x7FFFFFFF
DCGM_GROUP_ALL_NVSWITCHES = 0x7FFFFFFE
DCGM_GROUP_ALL_INSTANCES = 0x7FFFFFFD
DCGM_GROUP_ALL_COMPUTE_INSTANCES = 0x7FFFFFFC
DCGM_GROUP_ALL_ENTITIES = 0x7FFFFFFB
DCGM_GROUP_NULL = 0x7FFFFFFA

# Lib loading state, as in the real module.
dcgmLib = None
libLoadLock = threading.Lock()
_dcgmLib_refcount = 0

_MESSAGES = {
    DCGM_ST_OK: "Success",
    DCGM_ST_BADPARAM: "Bad parameter passed to function",
    DCGM_ST_GENERIC_ERROR: "Generic unspecified error",
    DCGM_ST_NOT_SUPPORTED: "Feature not supported",
    DCGM_ST_INIT_ERROR: "DCGM initialization error",
    DCGM_ST_UNINITIALIZED: "Object is in an undefined state",
    DCGM_ST_TIMEOUT: "Timeout",
    DCGM_ST_VER_MISMATCH: "API version mismatch",
    DCGM_ST_NO_DATA: "No data is available",
    DCGM_ST_NOT_WATCHED: "Field is not being updated",
    DCGM_ST_NO_PERMISSION: "Not permissioned",
    DCGM_ST_GPU_IS_LOST: "GPU is unreachable",
    DCGM_ST_RESET_REQUIRED: "GPU requires a reset",
    DCGM_ST_FUNCTION_NOT_FOUND: "Unable to find function",
    DCGM_ST_CONNECTION_NOT_VALID: "The connection to the host engine is not valid any longer",
    DCGM_ST_LIBRARY_NOT_FOUND: "DCGM library could not be found",
    DCGM_ST_MAX_LIMIT: "Max limit reached for the object",
}


class DCGMError(Exception):
    """A DCGM return code as an exception; DCGMError(code) gives the code's own subclass."""

    _valClassMapping = dict()
    _error_code_to_string = dict(_MESSAGES)

    def __new__(typ, value):
        if typ == DCGMError:
            typ = DCGMError._valClassMapping.get(value, typ)
        obj = Exception.__new__(typ)
        obj.info = None
        obj.value = value
        return obj

    def __str__(self):
        msg = DCGMError._error_code_to_string.get(self.value, "DCGM Error with code %d" % self.value)
        if self.info is not None:
            msg = msg.rstrip(".") + ": '%s'" % self.info
        return msg

    def __eq__(self, other):
        return self.value == other.value

    def __hash__(self):
        return hash(self.value)

    def SetAdditionalInfo(self, msg):
        self.info = msg


def dcgmExceptionClass(error_code):
    return DCGMError._valClassMapping.get(error_code)


def _extractDCGMErrorsAsClasses():
    """DCGM_ST_CONNECTION_NOT_VALID -> DCGMError_ConnectionNotValid, and so on for every code."""
    module = sys.modules[__name__]
    for name in [n for n in dir(module) if n.startswith("DCGM_ST_")]:
        value = getattr(module, name)
        class_name = "DCGMError_" + string.capwords(name[len("DCGM_ST_"):], "_").replace("_", "")

        def make_new(val):
            def new(typ):
                return DCGMError.__new__(typ, val)
            return new

        cls = type(class_name, (DCGMError,), {"__new__": make_new(value)})
        cls.__module__ = __name__
        setattr(module, class_name, cls)
        DCGMError._valClassMapping[value] = cls


_extractDCGMErrorsAsClasses()


class _WrappedStructure:
    def __init__(self, obj):
        self.__dict__["_obj"] = obj

    def __getattr__(self, key):
        value = getattr(self._obj, key)
        return value.decode("utf-8") if isinstance(value, bytes) else value


class _DcgmStructure(Structure):
    """Returns char[] fields as str and accepts str for them, as the real bindings do."""

    def __getattribute__(self, key):
        value = super().__getattribute__(key)
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isclass(value):
            return _WrappedStructure(value)
        return value

    def __setattr__(self, key, value):
        if isinstance(value, str):
            value = value.encode("utf-8")
        return super().__setattr__(key, value)


class DcgmUnion(Union):
    def __getattribute__(self, key):
        value = super().__getattribute__(key)
        return value.decode("utf-8") if isinstance(value, bytes) else value

    def __setattr__(self, key, value):
        if isinstance(value, str):
            value = value.encode("utf-8")
        return super().__setattr__(key, value)


class _PrintableStructure(_DcgmStructure):
    _fmt_ = {}

    def __str__(self):
        parts = ", ".join("%s: %s" % (name, getattr(self, name)) for name, _ in self._fields_)
        return "%s(%s)" % (self.__class__.__name__, parts)


def make_dcgm_version(struct, ver):
    return sizeof(struct) | (ver << 24)


# --- library loading (the fake has no C library) ---------------------------------------------


def _dcgmGetFunctionPointer(name):
    raise DCGMError(DCGM_ST_FUNCTION_NOT_FOUND)


def _LoadDcgmLibrary(libDcgmPath=None):
    global dcgmLib
    import dcgm_fake_engine

    with libLoadLock:
        if dcgm_fake_engine.ENGINE.library_missing:
            raise DCGMError(DCGM_ST_LIBRARY_NOT_FOUND)
        if dcgmLib is None:
            dcgmLib = dcgm_fake_engine.ENGINE


def _dcgmInit(libDcgmPath=None):
    global _dcgmLib_refcount
    _LoadDcgmLibrary(libDcgmPath)
    with libLoadLock:
        _dcgmLib_refcount += 1


def _dcgmCheckReturn(ret):
    if ret != DCGM_ST_OK:
        raise DCGMError(ret)
    return ret


def _dcgmShutdown():
    global _dcgmLib_refcount
    with libLoadLock:
        if _dcgmLib_refcount > 0:
            _dcgmLib_refcount -= 1


# --- structures ------------------------------------------------------------------------------


class c_dcgmConnectV2Params_v2(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("persistAfterDisconnect", c_uint),
        ("timeoutMs", c_uint),
        ("addressIsUnixSocket", c_uint),
    ]


c_dcgmConnectV2Params_version2 = make_dcgm_version(c_dcgmConnectV2Params_v2, 2)
c_dcgmConnectV2Params_version = c_dcgmConnectV2Params_version2


class c_dcgmConnectV3Params_v1(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("persistAfterDisconnect", c_uint),
        ("timeoutMs", c_uint),
    ]


c_dcgmConnectV3Params_version1 = make_dcgm_version(c_dcgmConnectV3Params_v1, 1)
c_dcgmConnectV3Params_version = c_dcgmConnectV3Params_version1


class c_dcgmGroupEntityPair_t(_PrintableStructure):
    _fields_ = [("entityGroupId", c_uint32), ("entityId", c_uint32)]

    def __eq__(self, other):
        return self.entityGroupId == other.entityGroupId and self.entityId == other.entityId


class c_dcgmGroupInfo_v3(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("count", c_uint),
        ("groupName", c_char * DCGM_MAX_STR_LENGTH),
        ("entityList", c_dcgmGroupEntityPair_t * DCGM_GROUP_MAX_ENTITIES_V2),
    ]


c_dcgmGroupInfo_version3 = make_dcgm_version(c_dcgmGroupInfo_v3, 3)


class c_dcgmClockSet_v1(_PrintableStructure):
    _fields_ = [("version", c_uint), ("memClock", c_uint), ("smClock", c_uint)]


class c_dcgmDeviceSupportedClockSets_v1(_PrintableStructure):
    _fields_ = [("version", c_uint), ("count", c_uint), ("clockSet", c_dcgmClockSet_v1 * DCGM_MAX_CLOCKS)]


class c_dcgmDeviceThermals_v1(_PrintableStructure):
    _fields_ = [("version", c_uint), ("slowdownTemp", c_uint), ("shutdownTemp", c_uint)]


class c_dcgmDevicePowerLimits_v1(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("curPowerLimit", c_uint),
        ("defaultPowerLimit", c_uint),
        ("enforcedPowerLimit", c_uint),
        ("minPowerLimit", c_uint),
        ("maxPowerLimit", c_uint),
    ]


class c_dcgmDeviceIdentifiers_v1(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("brandName", c_char * DCGM_MAX_STR_LENGTH),
        ("deviceName", c_char * DCGM_MAX_STR_LENGTH),
        ("pciBusId", c_char * DCGM_MAX_STR_LENGTH),
        ("serial", c_char * DCGM_MAX_STR_LENGTH),
        ("uuid", c_char * DCGM_MAX_STR_LENGTH),
        ("vbios", c_char * DCGM_MAX_STR_LENGTH),
        ("inforomImageVersion", c_char * DCGM_MAX_STR_LENGTH),
        ("pciDeviceId", c_uint32),
        ("pciSubSystemId", c_uint32),
        ("driverVersion", c_char * DCGM_MAX_STR_LENGTH),
        ("virtualizationMode", c_uint32),
    ]


class c_dcgmDeviceMemoryUsage_v1(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("bar1Total", c_uint),
        ("fbTotal", c_uint),
        ("fbUsed", c_uint),
        ("fbFree", c_uint),
    ]


class c_dcgmDeviceSettings_v2(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("persistenceModeEnabled", c_uint),
        ("migModeEnabled", c_uint),
        ("confidentialComputeMode", c_uint),
    ]


class c_dcgmDeviceAttributes_v3(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("clockSets", c_dcgmDeviceSupportedClockSets_v1),
        ("thermalSettings", c_dcgmDeviceThermals_v1),
        ("powerLimits", c_dcgmDevicePowerLimits_v1),
        ("identifiers", c_dcgmDeviceIdentifiers_v1),
        ("memoryUsage", c_dcgmDeviceMemoryUsage_v1),
        ("settings", c_dcgmDeviceSettings_v2),
    ]


dcgmDeviceAttributes_version3 = make_dcgm_version(c_dcgmDeviceAttributes_v3, 3)


class c_dcgmFieldValue_v1_value(DcgmUnion):
    _fields_ = [
        ("i64", c_int64),
        ("dbl", c_double),
        ("str", c_char * DCGM_MAX_STR_LENGTH),
        ("blob", c_byte * DCGM_MAX_BLOB_LENGTH),
    ]


class c_dcgmFieldValue_v1(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("fieldId", c_ushort),
        ("fieldType", c_short),
        ("status", c_int),
        ("ts", c_int64),
        ("value", c_dcgmFieldValue_v1_value),
    ]


dcgmFieldValue_version1 = make_dcgm_version(c_dcgmFieldValue_v1, 1)


class c_dcgmFieldValue_v2(_PrintableStructure):
    _fields_ = [
        ("version", c_uint),
        ("entityGroupId", c_uint),
        ("entityId", c_uint),
        ("fieldId", c_ushort),
        ("fieldType", c_short),
        ("status", c_int),
        ("unused", c_uint),
        ("ts", c_int64),
        ("value", c_dcgmFieldValue_v1_value),
    ]


dcgmFieldValue_version2 = make_dcgm_version(c_dcgmFieldValue_v2, 2)

DCGM_FV_FLAG_LIVE_DATA = 0x00000001

DCGM_HEALTH_WATCH_PCIE = 0x1
DCGM_HEALTH_WATCH_NVLINK = 0x2
DCGM_HEALTH_WATCH_PMU = 0x4
DCGM_HEALTH_WATCH_MCU = 0x8
DCGM_HEALTH_WATCH_MEM = 0x10
DCGM_HEALTH_WATCH_SM = 0x20
DCGM_HEALTH_WATCH_INFOROM = 0x40
DCGM_HEALTH_WATCH_THERMAL = 0x80
DCGM_HEALTH_WATCH_POWER = 0x100
DCGM_HEALTH_WATCH_DRIVER = 0x200
DCGM_HEALTH_WATCH_NVSWITCH_NONFATAL = 0x400
DCGM_HEALTH_WATCH_NVSWITCH_FATAL = 0x800
DCGM_HEALTH_WATCH_CONNECTX = 0x1000
DCGM_HEALTH_WATCH_ALL = 0xFFFFFFFF
DCGM_HEALTH_WATCH_COUNT_V1 = 10
DCGM_HEALTH_WATCH_COUNT_V2 = 12
DCGM_HEALTH_WATCH_COUNT_V3 = 13

DCGM_HEALTH_RESULT_PASS = 0
DCGM_HEALTH_RESULT_WARN = 10
DCGM_HEALTH_RESULT_FAIL = 20


class c_dcgmDiagErrorDetail_t(_PrintableStructure):
    _fields_ = [("msg", c_char * 1024), ("code", c_uint)]


DCGM_HEALTH_WATCH_MAX_INCIDENTS_V2 = DCGM_GROUP_MAX_ENTITIES_V2


class c_dcgmIncidentInfo_t(_PrintableStructure):
    _fields_ = [
        ("system", c_uint),
        ("health", c_uint32),
        ("error", c_dcgmDiagErrorDetail_t),
        ("entityInfo", c_dcgmGroupEntityPair_t),
    ]


class c_dcgmHealthResponse_v5(_PrintableStructure):
    _fields_ = [
        ("version", c_uint32),
        ("overallHealth", c_uint32),
        ("incidentCount", c_uint32),
        ("incidents", c_dcgmIncidentInfo_t * DCGM_HEALTH_WATCH_MAX_INCIDENTS_V2),
    ]


dcgmHealthResponse_version5 = make_dcgm_version(c_dcgmHealthResponse_v5, 5)


class c_dcgmHealthSetParams_v2(_PrintableStructure):
    _fields_ = [
        ("version", c_uint32),
        ("groupId", c_void_p),
        ("systems", c_uint32),
        ("updateInterval", c_int64),
        ("maxKeepAge", c_double),
    ]


dcgmHealthSetParams_version2 = make_dcgm_version(c_dcgmHealthSetParams_v2, 2)


class c_dcgm_link_t(_PrintableStructure):
    _fields_ = [("type", c_uint8), ("index", c_uint16), ("id", c_uint8)]


DcgmNvLinkLinkStateNotSupported = 0
DcgmNvLinkLinkStateDisabled = 1
DcgmNvLinkLinkStateDown = 2
DcgmNvLinkLinkStateUp = 3


class c_dcgmNvLinkGpuLinkStatus_v4(_PrintableStructure):
    _fields_ = [("entityId", c_uint32), ("linkState", c_uint32 * DCGM_NVLINK_MAX_LINKS_PER_GPU)]


class c_dcgmNvLinkNvSwitchLinkStatus_v2(_PrintableStructure):
    _fields_ = [("entityId", c_uint32), ("linkState", c_uint32 * DCGM_NVLINK_MAX_LINKS_PER_NVSWITCH)]


class c_dcgmNvLinkStatus_v5(_PrintableStructure):
    _fields_ = [
        ("version", c_uint32),
        ("numGpus", c_uint32),
        ("gpus", c_dcgmNvLinkGpuLinkStatus_v4 * DCGM_MAX_NUM_DEVICES),
        ("numNvSwitches", c_uint32),
        ("nvSwitches", c_dcgmNvLinkNvSwitchLinkStatus_v2 * DCGM_MAX_NUM_SWITCHES),
    ]


dcgmNvLinkStatus_version5 = make_dcgm_version(c_dcgmNvLinkStatus_v5, 5)
dcgmNvLinkStatus_version = dcgmNvLinkStatus_version5
c_dcgmNvLinkStatus_t = c_dcgmNvLinkStatus_v5

DcgmFMStatusNotSupported = 0
DcgmFMStatusNotStarted = 1
DcgmFMStatusInProgress = 2
DcgmFMStatusSuccess = 3
DcgmFMStatusFailure = 4
DcgmFMStatusUnrecognized = 5
DcgmFMStatusNvmlTooOld = 6
DcgmFMStatusCount = 7



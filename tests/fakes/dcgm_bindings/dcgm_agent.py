"""Fake of DCGM's `dcgm_agent` module (mirrors DCGM 4.6.0, testing/python3/dcgm_agent.py).

Same function names, argument order and return types as the real bindings for the calls listed in
__all__: handles, group and field-group ids come back as ctypes.c_void_p, values as the ctypes
structures of the fake `dcgm_structs`, errors as `dcgm_structs.DCGMError` subclasses. Like the real
module, str arguments are turned into UTF-8 bytes before the call (`ensure_byte_strings`). Instead of
calling libdcgm, each function asks the in-memory host engine in `dcgm_fake_engine`.
"""

import functools
from ctypes import c_void_p

import dcgm_fake_engine
import dcgm_fields
import dcgm_structs

__all__ = [
    "dcgmInit", "dcgmShutdown", "dcgmStartEmbedded", "dcgmStopEmbedded", "dcgmConnect_v2", "dcgmConnect_v3",
    "dcgmDisconnect", "dcgmGetAllSupportedDevices", "dcgmGetAllDevices", "dcgmGetDeviceAttributes",
    "dcgmGetEntityGroupEntities", "dcgmGetNvLinkLinkStatus", "dcgmGroupCreate", "dcgmGroupDestroy",
    "dcgmGroupAddDevice", "dcgmGroupAddEntity", "dcgmGroupGetInfo", "dcgmFieldGroupCreate", "dcgmFieldGroupDestroy",
    "dcgmWatchFields", "dcgmUnwatchFields", "dcgmUpdateAllFields", "dcgmEntityGetLatestValues",
    "dcgmEntitiesGetLatestValues", "dcgmHealthSet", "dcgmHealthSet_v2", "dcgmHealthGet", "dcgmHealthCheck",
]

_E = dcgm_fake_engine.ENGINE


def ensure_byte_strings():
    """str arguments become UTF-8 bytes, as the real decorator does before calling into C."""
    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            args = tuple(a.encode("utf-8") if isinstance(a, str) else a for a in args)
            kwargs = {k: v.encode("utf-8") if isinstance(v, str) else v for k, v in kwargs.items()}
            return fn(*args, **kwargs)
        return wrapper
    return decorator


def _id(obj):
    return obj.value if isinstance(obj, c_void_p) else int(obj)


@ensure_byte_strings()
def dcgmInit():
    _E.enter("dcgmInit")
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmShutdown():
    _E.enter("dcgmShutdown")
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmStartEmbedded(opMode):
    _E.enter("dcgmStartEmbedded")
    if opMode not in (dcgm_structs.DCGM_OPERATION_MODE_AUTO, dcgm_structs.DCGM_OPERATION_MODE_MANUAL):
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_BADPARAM)
    return c_void_p(_E.open_session(embedded=True))


@ensure_byte_strings()
def dcgmStopEmbedded(dcgm_handle):
    _E.enter("dcgmStopEmbedded")
    _E.close_session(dcgm_handle)
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmConnect_v2(ip_address, connectParams, version=dcgm_structs.c_dcgmConnectV2Params_version):
    _E.enter("dcgmConnect_v2")
    connectParams.version = version
    return c_void_p(_E.open_session(embedded=False, address=ip_address.decode()))


@ensure_byte_strings()
def dcgmConnect_v3(connection_string, connectParams, version=dcgm_structs.c_dcgmConnectV3Params_version):
    _E.enter("dcgmConnect_v3")
    connectParams.version = version
    address = connection_string.decode()
    if not address.startswith(("tcp://", "unix://")):
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_BADPARAM)
    return c_void_p(_E.open_session(embedded=False, address=address))


@ensure_byte_strings()
def dcgmDisconnect(dcgm_handle):
    _E.enter("dcgmDisconnect")
    _E.close_session(dcgm_handle)
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmGetAllSupportedDevices(dcgm_handle):
    _E.enter("dcgmGetAllSupportedDevices", dcgm_handle)
    return _E.gpu_ids()


@ensure_byte_strings()
def dcgmGetAllDevices(dcgm_handle):
    _E.enter("dcgmGetAllDevices", dcgm_handle)
    return _E.gpu_ids()


@ensure_byte_strings()
def dcgmGetDeviceAttributes(dcgm_handle, gpuId, version=dcgm_structs.dcgmDeviceAttributes_version3):
    _E.enter("dcgmGetDeviceAttributes", dcgm_handle)
    if version != dcgm_structs.dcgmDeviceAttributes_version3:
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_VER_MISMATCH)
    if gpuId not in _E.gpu_ids():
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_BADPARAM)
    return _E.attributes(gpuId)


@ensure_byte_strings()
def dcgmGetEntityGroupEntities(dcgm_handle, entityGroup, flags):
    _E.enter("dcgmGetEntityGroupEntities", dcgm_handle)
    if entityGroup == dcgm_fields.DCGM_FE_GPU:
        return list(_E.gpu_ids())
    if entityGroup == dcgm_fields.DCGM_FE_SWITCH:
        return list(_E.nvswitches)
    return []


@ensure_byte_strings()
def dcgmGetNvLinkLinkStatus(dcgm_handle):
    _E.enter("dcgmGetNvLinkLinkStatus", dcgm_handle)
    status = dcgm_structs.c_dcgmNvLinkStatus_v5()
    status.version = dcgm_structs.dcgmNvLinkStatus_version
    gpus = _E.gpu_ids()
    status.numGpus = len(gpus)
    for slot, gpu in enumerate(gpus):
        status.gpus[slot].entityId = gpu
        for link, state in enumerate(_E.link_states(gpu)):
            status.gpus[slot].linkState[link] = state
    status.numNvSwitches = len(_E.nvswitches)
    for slot, switch in enumerate(_E.nvswitches):
        status.nvSwitches[slot].entityId = switch
    return status


@ensure_byte_strings()
def dcgmGroupCreate(dcgm_handle, type, groupName):
    session = _E.enter("dcgmGroupCreate", dcgm_handle)
    group = next(_E.ids)
    if type == dcgm_structs.DCGM_GROUP_EMPTY:
        members = []
    elif type == dcgm_structs.DCGM_GROUP_DEFAULT:
        members = [(dcgm_fields.DCGM_FE_GPU, g) for g in _E.gpu_ids()]
    elif type == dcgm_structs.DCGM_GROUP_DEFAULT_NVSWITCHES:
        members = [(dcgm_fields.DCGM_FE_SWITCH, s) for s in _E.nvswitches]
    else:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_NOT_SUPPORTED)
    session.groups[group] = members
    return c_void_p(group)


@ensure_byte_strings()
def dcgmGroupDestroy(dcgm_handle, group_id):
    session = _E.enter("dcgmGroupDestroy", dcgm_handle)
    if session.groups.pop(_id(group_id), None) is None:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_NOT_CONFIGURED)
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmGroupAddDevice(dcgm_handle, group_id, gpu_id):
    return dcgmGroupAddEntity(dcgm_handle, group_id, dcgm_fields.DCGM_FE_GPU, gpu_id)


@ensure_byte_strings()
def dcgmGroupAddEntity(dcgm_handle, group_id, entityGroupId, entityId):
    session = _E.enter("dcgmGroupAddEntity", dcgm_handle)
    members = session.groups.get(_id(group_id))
    if members is None:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_NOT_CONFIGURED)
    known = _E.gpu_ids() if entityGroupId == dcgm_fields.DCGM_FE_GPU else (
        _E.nvswitches if entityGroupId == dcgm_fields.DCGM_FE_SWITCH else [])
    if entityId not in known:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_BADPARAM)
    if (entityGroupId, entityId) in members:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_DUPLICATE_KEY)
    members.append((entityGroupId, entityId))
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmGroupGetInfo(dcgm_handle, group_id, version=dcgm_structs.c_dcgmGroupInfo_version3):
    session = _E.enter("dcgmGroupGetInfo", dcgm_handle)
    members = session.groups.get(_id(group_id))
    if members is None:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_NOT_CONFIGURED)
    info = dcgm_structs.c_dcgmGroupInfo_v3()
    info.version = version
    info.count = len(members)
    for slot, (group, entity) in enumerate(members):
        info.entityList[slot].entityGroupId = group
        info.entityList[slot].entityId = entity
    return info


@ensure_byte_strings()
def dcgmFieldGroupCreate(dcgm_handle, fieldIds, fieldGroupName):
    session = _E.enter("dcgmFieldGroupCreate", dcgm_handle)
    if not fieldIds or len(fieldIds) > dcgm_structs.DCGM_MAX_FIELD_IDS_PER_FIELD_GROUP:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_BADPARAM)
    if len(session.field_groups) >= dcgm_structs.DCGM_MAX_NUM_FIELD_GROUPS:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_MAX_LIMIT)
    fg = next(_E.ids)
    session.field_groups[fg] = [int(f) for f in fieldIds]
    return c_void_p(fg)


@ensure_byte_strings()
def dcgmFieldGroupDestroy(dcgm_handle, fieldGroupId):
    session = _E.enter("dcgmFieldGroupDestroy", dcgm_handle)
    if session.field_groups.pop(_id(fieldGroupId), None) is None:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_NO_DATA)
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmWatchFields(dcgm_handle, groupId, fieldGroupId, updateFreq, maxKeepAge, maxKeepSamples):
    session = _E.enter("dcgmWatchFields", dcgm_handle)
    group, fg = _id(groupId), _id(fieldGroupId)
    if group not in session.groups or fg not in session.field_groups:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_BADPARAM)
    if updateFreq <= 0:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_BADPARAM)
    session.watches[(group, fg)] = (int(updateFreq), float(maxKeepAge), int(maxKeepSamples))
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmUnwatchFields(dcgm_handle, groupId, fieldGroupId):
    session = _E.enter("dcgmUnwatchFields", dcgm_handle)
    session.watches.pop((_id(groupId), _id(fieldGroupId)), None)
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmUpdateAllFields(dcgm_handle, waitForUpdate):
    _E.enter("dcgmUpdateAllFields", dcgm_handle)
    return dcgm_structs.DCGM_ST_OK


def _fill(fv, kind, value, status, field_id):
    fv.fieldId = field_id
    fv.fieldType = ord(kind)
    fv.status = status
    # When the host engine sampled it, in microseconds since the epoch (0 for a value it never sampled).
    fv.ts = int(_E.sample_time() * 1e6) if status == dcgm_structs.DCGM_ST_OK else 0
    if kind == "d":
        fv.value.dbl = value
    elif kind == "s":
        fv.value.str = value
    else:
        fv.value.i64 = value


@ensure_byte_strings()
def dcgmEntityGetLatestValues(dcgmHandle, entityGroup, entityId, fieldIds):
    session = _E.enter("dcgmEntityGetLatestValues", dcgmHandle)
    values = (dcgm_structs.c_dcgmFieldValue_v1 * len(fieldIds))()
    for fv, field_id in zip(values, fieldIds, strict=True):
        fv.version = dcgm_structs.dcgmFieldValue_version1
        _fill(fv, *_E.read(session, entityGroup, entityId, field_id, live=False), field_id)
    return values


@ensure_byte_strings()
def dcgmEntitiesGetLatestValues(dcgmHandle, entities, fieldIds, flags):
    session = _E.enter("dcgmEntitiesGetLatestValues", dcgmHandle)
    live = bool(flags & dcgm_structs.DCGM_FV_FLAG_LIVE_DATA)
    values = (dcgm_structs.c_dcgmFieldValue_v2 * (len(fieldIds) * len(entities)))()
    slot = 0
    for entity in entities:
        for field_id in fieldIds:
            fv = values[slot]
            fv.version = dcgm_structs.dcgmFieldValue_version2
            fv.entityGroupId, fv.entityId = entity.entityGroupId, entity.entityId
            _fill(fv, *_E.read(session, entity.entityGroupId, entity.entityId, field_id, live=live), field_id)
            slot += 1
    return values


@ensure_byte_strings()
def dcgmHealthSet(dcgm_handle, groupId, systems):
    session = _E.enter("dcgmHealthSet", dcgm_handle)
    if _id(groupId) not in session.groups:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_BADPARAM)
    session.health[_id(groupId)] = int(systems)
    return dcgm_structs.DCGM_ST_OK


@ensure_byte_strings()
def dcgmHealthSet_v2(dcgm_handle, groupId, systems, updateInterval, maxKeepAge):
    return dcgmHealthSet(dcgm_handle, groupId, systems)


@ensure_byte_strings()
def dcgmHealthGet(dcgm_handle, groupId):
    session = _E.enter("dcgmHealthGet", dcgm_handle)
    return session.health.get(_id(groupId), 0)


@ensure_byte_strings()
def dcgmHealthCheck(dcgm_handle, groupId, version=dcgm_structs.dcgmHealthResponse_version5):
    session = _E.enter("dcgmHealthCheck", dcgm_handle)
    if version != dcgm_structs.dcgmHealthResponse_version5:
        dcgm_structs._dcgmCheckReturn(dcgm_structs.DCGM_ST_VER_MISMATCH)
    incidents = _E.health_check(session, _id(groupId))
    response = dcgm_structs.c_dcgmHealthResponse_v5()
    response.version = dcgm_structs.dcgmHealthResponse_version5
    response.incidentCount = len(incidents)
    response.overallHealth = max([i.health for i in incidents], default=dcgm_structs.DCGM_HEALTH_RESULT_PASS)
    for slot, incident in enumerate(incidents):
        info = response.incidents[slot]
        info.system = incident.system
        info.health = incident.health
        info.error.code = incident.code
        info.error.msg = incident.msg
        info.entityInfo.entityGroupId = incident.entity_group
        info.entityInfo.entityId = incident.entity_id
    return response

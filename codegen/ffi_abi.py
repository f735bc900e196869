"""The few structs of XLA's typed FFI C API that optgen's CPU kernel reads and writes.

A kernel is called by XLA as ``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)``; the layouts
below mirror ``xla/ffi/api/c_api.h`` (API version 0.x, which XLA promises to keep binary
compatible), written as ctypes structs so that the generated LLVM IR reads each field at
the offset the C compiler would give it, with no offset written by hand.
"""

from __future__ import annotations

import ctypes

# the FFI API version the kernel is written against (c_api.h's XLA_FFI_API_MAJOR/MINOR)
API_VERSION = (
    0,
    1,
)
METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata
EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_P, _SIZE = ctypes.c_void_p, ctypes.c_size_t


class ExtensionBase(ctypes.Structure):
    _fields_ = [("struct_size", _SIZE), ("type", ctypes.c_int), ("next", _P)]


class ApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", _SIZE),
        ("extension_start", _P),
        ("major_version", ctypes.c_int),
        ("minor_version", ctypes.c_int),
    ]


class Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", _SIZE),
        ("api_version", ApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),
    ]


class MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", ExtensionBase), ("metadata", _P)]


class Args(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets have one layout
    _fields_ = [
        ("struct_size", _SIZE),
        ("extension_start", _P),
        ("size", ctypes.c_int64),
        ("types", _P),
        ("args", _P),
    ]


class CallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", _SIZE),
        ("extension_start", _P),
        ("api", _P),
        ("ctx", _P),
        ("stage", ctypes.c_int),
        ("args", Args),
        ("rets", Args),
        ("attrs", Args),
        ("future", _P),
    ]


class Buffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", _SIZE),
        ("extension_start", _P),
        ("dtype", ctypes.c_int),
        ("data", _P),
        ("rank", ctypes.c_int64),
        ("dims", _P),
    ]


class Api(ctypes.Structure):
    """The head of XLA_FFI_Api: its function pointers, in order, up to the thread pool's."""

    _fields_ = [
        ("struct_size", _SIZE),
        ("extension_start", _P),
        ("api_version", ApiVersion),
        ("internal_api", _P),
        ("Error_Create", _P),
        ("Error_GetMessage", _P),
        ("Error_Destroy", _P),
        ("Handler_Register", _P),
        ("Stream_Get", _P),
        ("Type_Register", _P),
        ("ExecutionContext_Get", _P),
        ("State_Set", _P),
        ("State_Get", _P),
        ("DeviceMemory_Allocate", _P),
        ("DeviceMemory_Free", _P),
        ("ThreadPool_Schedule", _P),
        ("ThreadPool_NumThreads", _P),
    ]


ERROR_INTERNAL = 13  # XLA_FFI_Error_Code_INTERNAL


class ErrorCreateArgs(ctypes.Structure):  # XLA_FFI_Error_Create_Args
    _fields_ = [
        ("struct_size", _SIZE),
        ("extension_start", _P),
        ("message", _P),
        ("errc", ctypes.c_int),
    ]


class ErrorDestroyArgs(ctypes.Structure):
    _fields_ = [("struct_size", _SIZE), ("extension_start", _P), ("error", _P)]


class ScheduleArgs(ctypes.Structure):  # XLA_FFI_ThreadPool_Schedule_Args
    _fields_ = [
        ("struct_size", _SIZE),
        ("extension_start", _P),
        ("ctx", _P),
        ("task", _P),
        ("data", _P),
    ]


class NumThreadsArgs(ctypes.Structure):  # XLA_FFI_ThreadPool_NumThreads_Args
    _fields_ = [("struct_size", _SIZE), ("extension_start", _P), ("ctx", _P), ("num_threads", _P)]


def offset(struct: type[ctypes.Structure], path: str) -> int:
    """The byte offset of a (dotted) field: ``offset(CallFrame, "args.args")``."""
    total = 0
    for name in path.split("."):
        field = getattr(struct, name)
        total += field.offset
        struct = dict(struct._fields_)[name]
    return total
